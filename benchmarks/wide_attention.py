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
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.latency_memory import cast_floats, forward  # noqa: E402
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


@contextlib.contextmanager
def wide_choice(choice: str) -> Iterator[None]:
    previous = os.environ.get(attention.WIDE_ATTENTION_ENV)
    os.environ[attention.WIDE_ATTENTION_ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            del os.environ[attention.WIDE_ATTENTION_ENV]
        else:
            os.environ[attention.WIDE_ATTENTION_ENV] = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, budget_s: float) -> dict[str, float]:
    """Median ms of each function, timed in alternation after a warm-up call each (which autotunes the kernel)."""
    for fn in fns.values():
        fn()
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - start > budget_s:
            break
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
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
    rows = []
    widest = {call["case"] for call in published_wide_calls()}
    for case in GPU_CASES:
        if case.name not in widest or (args.only and not any(part in case.name for part in args.only.split(","))):
            continue
        config = config_from_dict({**case.config, "architectures": [case.arch]})
        torch.manual_seed(0)
        model = perceiver_core.build_model(config).to(device=device, dtype=torch.bfloat16).eval()
        inputs = cast_floats(case.make_inputs(case.batch, device), torch.bfloat16)

        call = forward(case, model, inputs)  # as benchmarks/models.py times ours (the whole video for multimodal)

        def timed_forward(choice: str, call: Callable[[], Any] = call) -> Any:
            with wide_choice(choice), torch.no_grad():
                return call()

        ms = timed({c: (lambda c=c: timed_forward(c)) for c in ("gemm", "fused")}, device, args.reps, args.budget)
        rows.append(
            dict(
                case=case.name,
                batch=case.batch,
                gemm_per_s=case.batch * 1000 / ms["gemm"],
                fused_per_s=case.batch * 1000 / ms["fused"],
                speedup=ms["gemm"] / ms["fused"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        del model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


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
    attention._wide_kernel), with this machine's Triton (a GPU image's own may allocate registers otherwise) and
    its bundled ptxas (no GPU needed), and read each cubin's
    registers, stack (spilled registers) and shared memory with its bundled cuobjdump. Needs TRITON_INTERPRET
    unset: the interpreter's kernels do not compile."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from perceiver_core import wide_attention

    kernel = wide_attention._wide_attention_kernel
    names = list(kernel.arg_names)
    contiguous = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mm")  # as the JIT specialises 1s
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for config in wide_attention._CUDA_CONFIGS:
        for dtype, mask_kind in (("bf16", 2), ("bf16", 0), ("fp16", 1)):
            constants: dict[str, Any] = dict(config.kwargs, MASK_KIND=mask_kind, EMULATE_BF16=False)
            constants.update(dict.fromkeys(contiguous, 1))
            signature = {}
            for name in names:
                if name in constants:
                    signature[name] = "constexpr"
                elif name in ("Q", "K", "V", "OUT"):
                    signature[name] = f"*{dtype}"
                elif name == "MASK":
                    signature[name] = "*u8" if mask_kind == 1 else "*fp32"
                else:
                    signature[name] = "fp32" if name == "scale" else "i32"
            source = ASTSource(
                fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
            )
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run(
                    [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
                ).stdout
            resources = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
            rows.append(
                dict(
                    config=config.kwargs,
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                    dtype=dtype,
                    mask_kind=mask_kind,
                    registers=int(resources["REG"]),
                    stack_bytes=int(resources["STACK"]),
                    local_bytes=int(resources["LOCAL"]),
                    shared_bytes=int(compiled.metadata.shared),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="cut-down shapes on the CPU, in Triton's interpreter")
    parser.add_argument("--only", default=None, help="substring filter on case names, e.g. flow,multimodal")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget", type=float, default=3.0, help="max seconds of timed reps per row")
    parser.add_argument("--no-heads", action="store_true", help="only the calls (part 1)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH", help="compile for sm_ARCH and print resources")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.compile_check:
        print(json.dumps(compile_check(args.compile_check)))
        return
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's module imports triton
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("needs a CUDA device (or --smoke, which runs the kernel in Triton's interpreter)")
    calls = measure_calls(args, device)
    heads = [] if args.smoke or args.no_heads else measure_heads(args, device)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton's interpreter, cut-down shapes)"
    )
    table = markdown(name, calls, heads)
    print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "torch": torch.__version__, "calls": calls, "heads": heads}, indent=1)
        )
    if args.markdown:
        args.markdown.write_text(table + "\n")
    wrong = [f"{r['case']} {r['shape']}" for r in calls if not r["error_ok"]]
    if wrong:
        sys.exit(f"the kernel's output is further from fp32 than the two GEMMs' by more than 2^-8: {wrong}")


if __name__ == "__main__":
    main()
