"""Where optical flow's bf16 error enters: the published flow config (random init, saved by transformers), one
368x496 pair, transformers fp32 against ours in fp32 and in bf16 (and fp16 with --dtypes), then module by module.

    python benchmarks/flow_bf16.py                    # CPU: about 2 minutes on 2 cores
    python benchmarks/flow_bf16.py --device cuda      # the GPU's own arithmetic (benchmarks/gpu.sh, FLOWBF16=1)
    python benchmarks/flow_bf16.py --cuda-path        # on CPU, the path CUDA takes (padding, two-GEMM attention)
    python benchmarks/flow_bf16.py --seeds 0,3,6      # other weight draws (seed 0 is the test's)
    python benchmarks/flow_bf16.py --seeds 0,6 --floors float16 --no-modules   # + fp16's floor, summaries only
    python benchmarks/flow_bf16.py --residual model   # residual sums in bf16 (the default keeps them in fp32)

Errors are ||a - b|| / ||b||, as benchmarks/models.py gives them. For each dtype it also gives the storage floor:
ours in fp32 arithmetic on the parameters and inputs rounded to that dtype: what storing them in the dtype costs
before any arithmetic. The rest is arithmetic alone (the dtype's model against that fp32 computation on the same
rounded weights); the two add up or, by chance, partly cancel. The per-module table gives both for each module's
output: the first module whose arithmetic column jumps is where the arithmetic loses precision.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perceiver_core
from benchmarks.models import PUBLISHED
from perceiver_core import aligned

PUBLISHED_FLOW = {**PUBLISHED["flow"], "attention_probs_dropout_prob": 0.0}  # deterministic, as in eval mode


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().cpu(), b.double().cpu()
    return float((a64 - b64).norm() / b64.norm())


def published_flow(directory: Path, seed: int = 0) -> tuple[Any, torch.Tensor]:
    """transformers' flow head with the published config, random weights (``seed``), saved to ``directory``; and a
    random 368x496 input pair, as benchmarks/models.py makes it."""
    import transformers

    torch.manual_seed(seed)
    reference = transformers.PerceiverForOpticalFlow(transformers.PerceiverConfig(**PUBLISHED_FLOW)).eval()
    reference.save_pretrained(directory)
    inputs = torch.randn(1, 2, 27, 368, 496, generator=torch.Generator().manual_seed(0))
    return reference, inputs


def module_outputs(model: torch.nn.Module, inputs: torch.Tensor, depth: int) -> tuple[torch.Tensor, dict[str, Any]]:
    outputs: dict[str, Any] = {}
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
        for name, module in model.named_modules()
        if name and name.count(".") < depth
    ]
    with torch.no_grad():
        logits = model(inputs).logits
    for hook in hooks:
        hook.remove()
    return logits, outputs


def rounded_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` (fp32) rounded to ``dtype`` and back: fp32 arithmetic on that dtype's weights, as
    benchmarks/models.py's storage_floor computes it."""
    return copy.deepcopy(model).to(dtype).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-path", action="store_true", help="on CPU, pad and attend as CUDA does")
    parser.add_argument("--depth", type=int, default=4, help="module names with fewer dots than this are compared")
    parser.add_argument("--seeds", default="0", help="weight draws, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16")
    parser.add_argument("--floors", default="", help="dtypes whose storage floor alone is given (fp32 arithmetic)")
    parser.add_argument("--no-modules", action="store_true", help="the summary lines only")
    parser.add_argument(
        "--residual",
        choices=["auto", "float32", "model"],
        default="auto",
        help="the residual sums' dtype in bf16/fp16 (PerceiverLayer.residual_dtype): auto, the flow head's own "
        "(float32); model, the weights' dtype",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        directory = Path(tempfile.mkdtemp())
        reference, inputs = published_flow(directory, seed)
        started = time.perf_counter()
        with torch.no_grad():
            expected = reference.to(device)(inputs=inputs.to(device)).logits
        seconds, rms = time.perf_counter() - started, float(expected.double().pow(2).mean().sqrt())
        print(f"seed {seed}: transformers fp32 on {device}: {seconds:.1f} s, output rms {rms:.2e}")
        del reference
        with aligned.force() if args.cuda_path else contextlib.nullcontext():
            fp32_model = perceiver_core.from_pretrained(directory, device=device, dtype=torch.float32)
            fp32_logits, fp32 = module_outputs(fp32_model, inputs.to(device), args.depth)
            print(f"ours float32: {relative(fp32_logits, expected):.2e} from transformers fp32")
            for name in filter(None, args.floors.split(",")):
                dtype = getattr(torch, name)
                with torch.no_grad():
                    floor_logits = rounded_copy(fp32_model, dtype)(inputs.to(device, dtype).float()).logits
                print(f"storage floor {name}: {relative(floor_logits, expected):.2e} from transformers fp32")
            for dtype in dtypes:
                name = str(dtype).removeprefix("torch.")
                rounded_inputs = inputs.to(device, dtype).float()
                floor_logits, floor = module_outputs(rounded_copy(fp32_model, dtype), rounded_inputs, args.depth)
                model = perceiver_core.from_pretrained(directory, device=device, dtype=dtype)
                if args.residual != "auto":
                    model.residual_dtype = torch.float32 if args.residual == "float32" else None
                sums = str(model.residual_dtype or dtype).removeprefix("torch.")
                started = time.perf_counter()
                logits, outputs = module_outputs(model, inputs.to(device, dtype), args.depth)
                seconds = time.perf_counter() - started
                print(
                    f"ours {name}, residual sums in {sums}: {relative(logits, expected):.2e} from transformers fp32 "
                    f"({seconds:.1f} s); "
                    f"storage floor (fp32 arithmetic on {name} weights and inputs) "
                    f"{relative(floor_logits, expected):.2e}; arithmetic alone {relative(logits, floor_logits):.2e}"
                )
                del model
                if args.no_modules:
                    continue
                print(f"\n| module | shape | {name} from fp32 | storage floor | arithmetic alone |")
                print("|---|---|---|---|---|")
                for module, out in fp32.items():
                    other, exact = outputs.get(module), floor.get(module)
                    if not (isinstance(other, torch.Tensor) and isinstance(exact, torch.Tensor)):
                        continue
                    if other.shape == exact.shape == out.shape:
                        print(
                            f"| {module} | {list(out.shape)} | {relative(other, out):.2e} | {relative(exact, out):.2e} "
                            f"| {relative(other, exact):.2e} |"
                        )
                print()


if __name__ == "__main__":
    main()
