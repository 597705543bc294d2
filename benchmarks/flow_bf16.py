"""Where optical flow's bf16 error enters: the published flow config (random init, saved by transformers), one
368x496 pair, transformers fp32 against ours in fp32 and bf16, then ours bf16 against ours fp32 module by module.

    python benchmarks/flow_bf16.py                    # CPU: about 2 minutes on 2 cores
    python benchmarks/flow_bf16.py --device cuda      # the GPU's own arithmetic (benchmarks/gpu.sh, FLOWBF16=1)
    python benchmarks/flow_bf16.py --cuda-path        # on CPU, the path CUDA takes (padding, two-GEMM attention)

Errors are ||a - b|| / ||b||, as benchmarks/models.py gives them. The per-module table names the first module
whose output departs from fp32 by more than the one before it did: that is where to look.
"""

from __future__ import annotations

import argparse
import contextlib
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


def published_flow(directory: Path) -> tuple[Any, torch.Tensor]:
    """transformers' flow head with the published config, random weights (seed 0), saved to ``directory``; and a
    random 368x496 input pair, as benchmarks/models.py makes it."""
    import transformers

    torch.manual_seed(0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-path", action="store_true", help="on CPU, pad and attend as CUDA does")
    parser.add_argument("--depth", type=int, default=4, help="module names with fewer dots than this are compared")
    args = parser.parse_args()
    device = torch.device(args.device)
    directory = Path(tempfile.mkdtemp())
    reference, inputs = published_flow(directory)
    started = time.perf_counter()
    with torch.no_grad():
        expected = reference.to(device)(inputs=inputs.to(device)).logits
    print(f"transformers fp32 on {device}: {time.perf_counter() - started:.1f} s")
    del reference
    path = aligned.force() if args.cuda_path else contextlib.nullcontext()
    with path:
        results = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = perceiver_core.from_pretrained(directory, device=device, dtype=dtype)
            started = time.perf_counter()
            results[dtype] = module_outputs(model, inputs.to(device, dtype), args.depth)
            print(
                f"ours {str(dtype).removeprefix('torch.')}: {relative(results[dtype][0], expected):.2e} from "
                f"transformers fp32 ({time.perf_counter() - started:.1f} s)"
            )
            del model
    fp32, bf16 = results[torch.float32][1], results[torch.bfloat16][1]
    print("\n| module | shape | bf16 from fp32 |\n|---|---|---|")
    for name, out in fp32.items():
        other = bf16.get(name)
        if torch.is_tensor(out) and torch.is_tensor(other) and out.shape == other.shape:
            print(f"| {name} | {list(out.shape)} | {relative(other, out):.2e} |")


if __name__ == "__main__":
    main()
