"""Wide-head attention on CUDA: the fused Triton kernel (perceiver_core/wide_attention.py) against the two GEMMs
around an fp32 softmax (attention._explicit), call by call and head by head, in one process.

    python benchmarks/wide_attention.py --json w.json --markdown w.md   # on a GPU (benchmarks/gpu.sh: WIDEATTN)
    python benchmarks/wide_attention.py --smoke                         # no GPU: checks the script in Triton's
                                                                        # interpreter, on cut-down shapes
    python benchmarks/wide_attention.py --compile-check 90              # no GPU: compiles every autotune
                                                                        # configuration for sm_90 (registers,
                                                                        # spills, shared memory)

1. Every attention call wider than 256 channels that the published configs make (recorded from a forward on the
   meta device, with CUDA's padding), at full size and the batch benchmarks/models.py uses, in bf16: median ms of
   each path, kernel ÷ GEMMs, the peak memory each allocates, and how far apart their outputs are (max |Δ| over
   max |output|).
2. Each published head's whole forward in bf16 with PERCEIVER_WIDE_ATTENTION=gemm and =fused, timed in alternation.

The kernel becomes the default for the widths where part 2 shows it faster (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.kernels import compiled_resources, env_choice, heads_either_way, run, sync, timed  # noqa: E402
from benchmarks.models import GPU_CASES, Case  # noqa: E402
from perceiver_core import aligned, attention  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402


def published_wide_calls(cases: list[Case] = GPU_CASES) -> list[dict[str, Any]]:
    """Every distinct attention call wider than 256 channels that ``cases`` make on CUDA: shapes at batch 1,
    mask kind (None, "bool", "additive"), whether keys and values are one tensor, and the scale."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    real = attention._attend
    case = cases[0]

    def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> Any:
        if max(q.shape[-1], v.shape[-1]) > 256:
            kind = None if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
            key = (case.name, q.shape[-1], v.shape[-1], kind, tuple(k.shape[:2]), v is k)
            seen.setdefault(
                key,
                dict(
                    case=case.name,
                    batch=case.batch,
                    q=tuple(q.shape),
                    k=tuple(k.shape),
                    v=tuple(v.shape),
                    mask=kind,
                    shared_kv=v is k,
                    scale=scale,
                ),
            )
        return real(q, k, v, mask, scale)

    for case in cases:
        config = config_from_dict({**case.config, "architectures": [case.arch]})
        with torch.device("meta"):
            model = perceiver_core.build_model(config)
            inputs = case.make_inputs(1, torch.device("meta"))
        attention._attend = record
        try:
            with torch.no_grad(), aligned.force():
                model(**inputs)
        finally:
            attention._attend = real
    return list(seen.values())


def call_operands(
    call: dict[str, Any], dtype: torch.dtype, device: torch.device, batch: int, queries: int = 0, keys: int = 0
) -> tuple[Any, ...]:
    """Random operands of ``call``'s widths at ``batch``; ``queries``/``keys`` cut N and M when given."""
    gen = torch.Generator(device=device).manual_seed(hash((call["q"], call["v"])) % 2**31)
    n = min(call["q"][2], queries) if queries else call["q"][2]
    m = min(call["k"][2], keys) if keys else call["k"][2]
    d, dv = call["q"][3], call["v"][3]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    q, k = normal(batch, 1, n, d), normal(batch, 1, m, d)
    v = k if call["shared_kv"] else normal(batch, 1, m, dv)
    mask = None
    if call["mask"] == "additive":  # as the decoders build it: a bias per key, dropped keys at the minimum
        mask = 3 * torch.randn(batch, 1, 1, m, generator=gen, device=device)
        mask[0, ..., : m // 3] = torch.finfo(mask.dtype).min
    elif call["mask"] == "bool":
        mask = torch.rand(batch, 1, 1, m, generator=gen, device=device) > 0.2
    return q, k, v, mask


def wide_choice(choice: str) -> contextlib.AbstractContextManager[None]:
    return env_choice(attention.WIDE_ATTENTION_ENV, choice)


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure_calls(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for call in published_wide_calls():
        if args.only and not any(part in call["case"] for part in args.only.split(",")):
            continue
        batch = 1 if args.smoke else call["batch"]
        cut = (40, 150) if args.smoke else (0, 0)
        q, k, v, mask = call_operands(call, torch.bfloat16, device, batch, *cut)
        scale = call["scale"]

        def gemm(q: Any = q, k: Any = k, v: Any = v, mask: Any = mask, scale: float = scale) -> torch.Tensor:
            with wide_choice("gemm"):
                return attention._attend(q, k, v, mask, scale)

        def fused(q: Any = q, k: Any = k, v: Any = v, mask: Any = mask, scale: float = scale) -> torch.Tensor:
            with wide_choice("fused"):
                return attention._attend(q, k, v, mask, scale)

        with aligned.force(), torch.no_grad():
            ms = timed({"gemm": gemm, "fused": fused}, device, args.reps, args.budget)
            memory = {name: peak_mib(fn, device) for name, fn in (("gemm", gemm), ("fused", fused))}
            fp32 = attention._explicit(q.float(), k.float(), v.float(), mask, scale)
            scale_out = fp32.abs().max().item()
            error = {
                name: ((fn().float() - fp32).abs().max().item() / scale_out)
                for name, fn in (("gemm", gemm), ("fused", fused))
            }
        rows.append(
            dict(
                case=call["case"],
                shape=f"B{batch} N{q.shape[2]} M{k.shape[2]} D{q.shape[3]} DV{v.shape[3]}"
                + (f" {call['mask']} mask" if call["mask"] else ""),
                gemm_ms=ms["gemm"],
                fused_ms=ms["fused"],
                ratio=ms["fused"] / ms["gemm"],
                gemm_mib=memory["gemm"],
                fused_mib=memory["fused"],
                gemm_err=error["gemm"],
                fused_err=error["fused"],
            )
        )
        rows[-1]["error_ok"] = error["fused"] <= error["gemm"] + 2**-8  # no worse than one more bf16 step
        print(json.dumps(rows[-1]), flush=True)
        del q, k, v, mask, fp32
    return rows


def measure_heads(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    return heads_either_way(
        args, device, {call["case"] for call in published_wide_calls()}, attention.WIDE_ATTENTION_ENV, ("gemm", "fused")
    )


def markdown(device_name: str, calls: list[dict[str, Any]], heads: list[dict[str, Any]]) -> str:
    def mib(x: float | None) -> str:
        return "–" if x is None else f"{x:,.0f}"

    lines = [
        f"Wide-head attention, bf16, on {device_name} (benchmarks/wide_attention.py)",
        "",
        "| call | shape | two GEMMs ms | kernel ms | kernel ÷ GEMMs | MiB GEMMs / kernel | error GEMMs / kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in calls:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['gemm_ms']:.3f} | {r['fused_ms']:.3f} | {r['ratio']:.2f} "
            f"| {mib(r['gemm_mib'])} / {mib(r['fused_mib'])} | {r['gemm_err']:.1e} / {r['fused_err']:.1e} |"
        )
    if heads:
        lines += ["", "| head | batch | two GEMMs /s | kernel /s | speed-up |", "|---|---|---|---|---|"]
        for r in heads:
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['gemm_per_s']:.1f} | {r['fused_per_s']:.1f} | {r['speedup']:.2f}× |"
            )
    return "\n".join(lines)


def compile_check(arch: int) -> list[dict[str, Any]]:
    """Compile the kernel ahead of time for ``sm_<arch>`` in every autotune configuration, in bf16 with an
    additive mask and without one, and in fp16 with a boolean one (CUDA runs it in bf16 and fp16 only: see
    attention._wide_kernel), with this machine's Triton (a GPU image's own may allocate registers otherwise), and
    read each cubin's registers, spills and shared memory (``kernels.compiled_resources``)."""
    from perceiver_core import wide_attention

    kernel = wide_attention._wide_attention_kernel
    contiguous = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mm")  # as the JIT specialises 1s
    rows = []
    for config in wide_attention._CUDA_CONFIGS:
        for dtype, mask_kind in (("bf16", 2), ("bf16", 0), ("fp16", 1)):
            constants: dict[str, Any] = dict(config.kwargs, MASK_KIND=mask_kind, EMULATE_BF16=False)
            constants.update(dict.fromkeys(contiguous, 1))
            types = {name: "fp32" if name == "scale" else "i32" for name in kernel.arg_names}
            types.update(dict.fromkeys(("Q", "K", "V", "OUT"), f"*{dtype}"), MASK="*u8" if mask_kind == 1 else "*fp32")
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            rows.append(
                dict(
                    config=config.kwargs,
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                    dtype=dtype,
                    mask_kind=mask_kind,
                    **compiled_resources(kernel, types, constants, arch, options),
                )
            )
    return rows


def main() -> None:
    run(__doc__ or "", measure_calls, measure_heads, markdown, compile_check, against="the two GEMMs'")


if __name__ == "__main__":
    main()
