"""Where the GPU time goes: one profiled forward per head (published configs, bf16), top kernels.

python benchmarks/profile_gpu.py --out benchmarks/results/gpu --only flow,multimodal,image-learned
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import perceiver_core  # noqa: E402
from benchmarks.models import GPU_CASES, OUR_CHUNKS, smoke  # noqa: E402
from perceiver_core.checkpoint import config_from_dict  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward(model: Any, x: dict[str, Any], chunks: int) -> None:
    if chunks:
        model.autoencode(x["inputs"], num_chunks=OUR_CHUNKS)
    else:
        model(**x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--only", default="flow,multimodal,image-learned")
    parser.add_argument("--rows", type=int, default=14)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny configs (checks the script, not speed)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = []
    for case in GPU_CASES:
        if not any(part in case.name for part in args.only.split(",")):
            continue
        if args.smoke:
            case = smoke(case)
        config = config_from_dict({**case.config, "architectures": [case.arch]})
        torch.manual_seed(0)
        device = torch.device(args.device)
        model = perceiver_core.build_model(config).to(device, torch.bfloat16).eval()
        x = case.make_inputs(case.batch, device)
        x = {
            k: (
                {m: t.bfloat16() for m, t in v.items()}
                if isinstance(v, dict)
                else (v.bfloat16() if v.is_floating_point() else v)
            )
            for k, v in x.items()
        }

        with torch.inference_mode():
            for _ in range(2):
                forward(model, x, case.chunks)
            sync(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities, record_shapes=True) as prof:
                forward(model, x, case.chunks)
                sync(device)
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
            row_limit=args.rows,
            max_name_column_width=60,
            max_shapes_column_width=70,
        )
        report.append(f"## {case.name}, batch {case.batch}, bf16\n\n{table}\n")
        print(report[-1], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / "profile.txt").write_text("\n".join(report))


if __name__ == "__main__":
    main()
