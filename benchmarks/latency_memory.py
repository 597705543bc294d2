"""Latency and memory per head at the model level: batch 1 and the saturating batch, p50 and p99 of single
forward passes, throughput, and the peak memory a pass allocates.

    python benchmarks/latency_memory.py --json lm.json --markdown lm.md   # on a GPU, bf16 (gpu.sh: LATMEM)
    python benchmarks/latency_memory.py --smoke                           # CPU, tiny latent stacks (checks the script)

The published configs of benchmarks/models.py with random weights (speed and memory do not depend on their
values), each pass timed alone with a device sync, after warm-up. The saturating batch is the one models.py
measures throughput at (64 images, 64 sequences, 8 flow pairs, 1 video). Peak memory is what the pass
allocates on top of the weights and inputs (torch.cuda.max_memory_allocated), on CUDA only.
PERCEIVER_WIDE_ATTENTION applies as everywhere (gpu.sh runs this with the default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.models import GPU_CASES, OUR_CHUNKS, Case, smoke  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402


def cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors (in dicts too) to ``dtype``; token ids and masks stay as they are."""
    if isinstance(x, dict):
        return {key: cast_floats(value, dtype) for key, value in x.items()}
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def forward(case: Case, model: Any, inputs: dict[str, Any]) -> Callable[[], Any]:
    """One pass as benchmarks/models.py times ours: the whole video in OUR_CHUNKS decoder chunks for the
    multimodal autoencoder, the head's forward otherwise."""
    if case.chunks:
        return lambda: model.autoencode(inputs["inputs"], num_chunks=OUR_CHUNKS)
    mine = {k: v.cpu() if k == "attention_mask" else v for k, v in inputs.items()}
    return lambda: model(**mine)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    case: Case, batch: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Any]:
    config = config_from_dict({**case.config, "architectures": [case.arch]})
    torch.manual_seed(0)
    model = perceiver_core.build_model(config).to(device=device, dtype=dtype).eval()
    inputs = cast_floats(case.make_inputs(batch, device), dtype)
    call = forward(case, model, inputs)
    with torch.inference_mode():
        for _ in range(args.warmup):
            call()
        _sync(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            _sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        times = []
        start = time.perf_counter()
        while len(times) < args.reps and (len(times) < 5 or time.perf_counter() - start < args.budget):
            t0 = time.perf_counter()
            call()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    q = statistics.quantiles(times, n=100) if len(times) > 1 else times * 99
    return dict(
        case=case.name,
        batch=batch,
        passes=len(times),
        p50_ms=q[49],
        p99_ms=q[98],
        per_s=batch * 1000 / q[49],
        unit=case.unit,
        peak_mib=peak,
    )


def markdown(device_name: str, dtype: str, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Latency and memory per head, {dtype}, on {device_name} (benchmarks/latency_memory.py)",
        "",
        "| head | batch | passes | p50 ms | p99 ms | throughput | peak MiB a pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['passes']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['per_s']:,.1f} {r['unit']}/s | {peak} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32, tiny latent stacks: checks the script")
    parser.add_argument("--only", default=None, help="substring filter on case names, e.g. flow,mlm")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=50, help="passes per row at most")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per row at most (after 5 passes)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    cases = GPU_CASES
    if args.only:
        cases = [c for c in cases if any(part in c.name for part in args.only.split(","))]
    if args.smoke:
        device, dtype, cases = torch.device("cpu"), torch.float32, [smoke(c) for c in cases]
        args.reps, args.warmup = min(args.reps, 3), 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    else:
        sys.exit("needs a CUDA device (or --smoke)")
    rows = []
    for case in cases:
        saturating = 1 if args.smoke else case.batch
        for batch in sorted({1, saturating}):
            rows.append(measure(case, batch, device, dtype, args))
            print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny latent stacks)"
    table = markdown(name, str(dtype).removeprefix("torch."), rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
