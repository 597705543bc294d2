"""LayerNorm at odd widths on CUDA: the Triton kernel (perceiver_core/layer_norm.py) against PyTorch's, call by
call and head by head, in one process.

    python benchmarks/layer_norm.py --json n.json --markdown n.md   # on a GPU (benchmarks/gpu.sh: LAYERNORM)
    python benchmarks/layer_norm.py --smoke                         # no GPU: checks the script in Triton's
                                                                    # interpreter, on cut-down row counts
    python benchmarks/layer_norm.py --compile-check 90              # no GPU: compiles the kernel for sm_90
                                                                    # at every published width (registers,
                                                                    # spills, shared memory)

1. Every LayerNorm call at a width that is not a multiple of 8 that the published configs make (recorded from a
   forward on the meta device, with CUDA's padding), at full size and the batch benchmarks/models.py uses, in
   bf16: median ms of each, the bandwidth each reaches (one read and one write of the rows), and how far each is
   from an fp32 LayerNorm (max |Δ| over max |output|).
2. Each of those heads' whole forward in bf16 with PERCEIVER_LAYER_NORM=torch and =triton, timed in alternation.

The kernel becomes the default for the widths where part 2 shows it faster (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.kernels import compiled_resources, env_choice, heads_either_way, run, timed  # noqa: E402
from benchmarks.models import GPU_CASES, Case  # noqa: E402
from perceiver_core import aligned, attention  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402

SMOKE_ROWS = 300  # rows per call under --smoke: the interpreter runs each program in numpy


def published_odd_norms(cases: list[Case] = GPU_CASES) -> list[dict[str, Any]]:
    """Every distinct LayerNorm call at a width that is not a multiple of 8 that ``cases`` make on CUDA: the
    case, its batch, the width and the rows one sample gives (all leading dimensions at batch 1)."""
    seen: dict[tuple[str, int, int], dict[str, Any]] = {}
    real = attention.LayerNorm.forward
    case = cases[0]

    def record(norm: attention.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if width % aligned.MULTIPLE:
            rows = x.numel() // width
            seen.setdefault((case.name, width, rows), dict(case=case.name, batch=case.batch, width=width, rows=rows))
        return real(norm, x)

    for case in cases:
        config = config_from_dict({**case.config, "architectures": [case.arch]})
        with torch.device("meta"):
            model = perceiver_core.build_model(config)
            inputs = case.make_inputs(1, torch.device("meta"))
        attention.LayerNorm.forward = record  # type: ignore[method-assign]
        try:
            with torch.no_grad(), aligned.force():
                model(**inputs)
        finally:
            attention.LayerNorm.forward = real  # type: ignore[method-assign]
    return list(seen.values())


def call_operands(
    call: dict[str, Any], dtype: torch.dtype, device: torch.device, rows: int
) -> tuple[torch.Tensor, attention.LayerNorm]:
    """Rows of ``call``'s width, off-centre as inputs with position features are, and a LayerNorm of that
    width with random weights, both in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(call["width"] * 1000 + call["rows"] % 1000)
    x = (torch.randn(rows, call["width"], generator=gen, device=device) * 2 + 0.5).to(dtype)
    norm = attention.LayerNorm(call["width"]).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(call["width"], generator=gen, device=device))
        norm.bias.copy_(0.1 * torch.randn(call["width"], generator=gen, device=device))
    return x, norm.to(dtype)


def measure_calls(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for call in published_odd_norms():
        if args.only and not any(part in call["case"] for part in args.only.split(",")):
            continue
        rows = SMOKE_ROWS if args.smoke else call["rows"] * call["batch"]
        x, norm = call_operands(call, torch.bfloat16, device, rows)

        def run(choice: str, x: torch.Tensor = x, norm: attention.LayerNorm = norm) -> torch.Tensor:
            with env_choice(attention.LAYER_NORM_ENV, choice), torch.no_grad(), aligned.force():
                return norm(x)  # type: ignore[no-any-return]

        ms = timed({c: (lambda c=c: run(c)) for c in ("torch", "triton")}, device, args.reps, args.budget)
        fp32 = F.layer_norm(x.float(), (call["width"],), norm.weight.float(), norm.bias.float(), norm.eps)
        top = fp32.abs().max().item()
        error = {c: (run(c).float() - fp32).abs().max().item() / top for c in ("torch", "triton")}
        moved = 2 * x.numel() * x.element_size() / 1e9  # GB read and written
        out.append(
            dict(
                case=call["case"],
                shape=f"{rows} × {call['width']}",
                torch_ms=ms["torch"],
                triton_ms=ms["triton"],
                ratio=ms["triton"] / ms["torch"],
                torch_gb_s=moved / ms["torch"] * 1000,
                triton_gb_s=moved / ms["triton"] * 1000,
                torch_err=error["torch"],
                triton_err=error["triton"],
            )
        )
        out[-1]["error_ok"] = error["triton"] <= error["torch"] + 2**-8  # no worse than one more bf16 step
        print(json.dumps(out[-1]), flush=True)
        del x, norm, fp32
    return out


def measure_heads(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    return heads_either_way(
        args, device, {call["case"] for call in published_odd_norms()}, attention.LAYER_NORM_ENV, ("torch", "triton")
    )


def markdown(device_name: str, calls: list[dict[str, Any]], heads: list[dict[str, Any]]) -> str:
    lines = [
        f"LayerNorm at odd widths, bf16, on {device_name} (benchmarks/layer_norm.py)",
        "",
        "| call | rows × width | PyTorch ms | kernel ms | kernel ÷ PyTorch | GB/s PyTorch / kernel "
        "| error PyTorch / kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in calls:
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['ratio']:.2f} "
            f"| {r['torch_gb_s']:,.0f} / {r['triton_gb_s']:,.0f} | {r['torch_err']:.1e} / {r['triton_err']:.1e} |"
        )
    if heads:
        lines += ["", "| head | batch | PyTorch's /s | kernel /s | speed-up |", "|---|---|---|---|---|"]
        for r in heads:
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['torch_per_s']:.1f} | {r['triton_per_s']:.1f} "
                f"| {r['speedup']:.2f}× |"
            )
    return "\n".join(lines)


def compile_check(arch: int) -> list[dict[str, Any]]:
    """Compile the kernel ahead of time for ``sm_<arch>`` at every published odd width and the widest it takes, in
    bf16 and fp32, as ``layer_norm.layer_norm`` launches it (rows per program and warps from the width), and read
    each cubin's registers, spills and shared memory (``kernels.compiled_resources``)."""
    from perceiver_core import layer_norm

    kernel = layer_norm._layer_norm_kernel
    widths = sorted({call["width"] for call in published_odd_norms()} | {layer_norm.MAX_WIDTH - 1})
    out = []
    for width in widths:
        for dtype in ("bf16", "fp32"):
            block_w, per_program, warps = layer_norm.launch_shape(width, rows=1 << 20)
            constants: dict[str, Any] = dict(BLOCK_W=block_w, ROWS=per_program, EMULATE_BF16=False)
            types = {name: "fp32" if name == "eps" else "i32" for name in kernel.arg_names}
            types.update(dict.fromkeys(("X", "W", "B", "Y"), f"*{dtype}"))
            out.append(
                dict(
                    width=width,
                    dtype=dtype,
                    block_w=block_w,
                    rows_per_program=per_program,
                    num_warps=warps,
                    **compiled_resources(kernel, types, constants, arch, dict(num_warps=warps)),
                )
            )
    return out


def main() -> None:
    run(__doc__ or "", measure_calls, measure_heads, markdown, compile_check, against="PyTorch's")


if __name__ == "__main__":
    main()
