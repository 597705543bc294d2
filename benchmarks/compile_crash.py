"""Narrow the compiled MLM's crash on CUDA (run 11: the first forward pass after compiling its latent block
segfaulted in the decoder's attention, benchmarks/results/gpu-run11/compiled-mlm-segfault.txt).

    python benchmarks/compile_crash.py              # on a GPU machine (gpu.sh's COMPILE stage runs it first)
    python benchmarks/compile_crash.py --smoke      # on a CPU: checks the script (nothing crashes there)

Each variant runs in a child process of its own, so that a segfault ends the child and not the run: the tests'
tiny MLM saved by transformers (tests/reference.py), loaded in bf16, one eager pass, the latent block compiled
(forced past compiled.KNOWN_CRASHES), warmed, then a pass at batch 2 and one at batch 3. The variants turn off
one of SDPA's fused CUDA backends each, or make the decoder's stride-0 projected queries contiguous, or skip
compiling (the control). The table gives each child's exit: "ok", "segfault" or the error's last line.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {
    "eager only (control)": "",
    "compiled": "",
    "compiled, cuDNN SDPA off": "torch.backends.cuda.enable_cudnn_sdp(False)",
    "compiled, flash SDPA off": "torch.backends.cuda.enable_flash_sdp(False)",
    "compiled, memory-efficient SDPA off": "torch.backends.cuda.enable_mem_efficient_sdp(False)",
    "compiled, math SDPA only": "torch.backends.cuda.enable_cudnn_sdp(False); "
    "torch.backends.cuda.enable_flash_sdp(False); torch.backends.cuda.enable_mem_efficient_sdp(False)",
    "compiled, contiguous decoder queries": "contiguous",
}


def child(variant: str, path: str, device: str) -> None:
    import torch
    from reference import _BASE, CONFIGS, make_inputs  # tests/reference.py
    from transformers import PerceiverConfig

    import perceiver_core
    from perceiver_core import compiled
    from perceiver_core.decoder import CrossAttentionDecoder

    setting = VARIANTS[variant]
    if setting == "contiguous":
        forward = CrossAttentionDecoder.forward

        def contiguous(
            self: CrossAttentionDecoder, queries: torch.Tensor, latents: torch.Tensor, projected_q: Any = None
        ) -> torch.Tensor:
            return forward(self, queries, latents, None if projected_q is None else projected_q.contiguous())

        CrossAttentionDecoder.forward = contiguous  # type: ignore[method-assign]
    elif setting:
        exec(setting, {"torch": torch})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = perceiver_core.from_pretrained(path, device=device, dtype=dtype)
    config = PerceiverConfig(**{**_BASE, **CONFIGS["PerceiverForMaskedLM"]})
    inputs = {k: v.to(device) for k, v in make_inputs("PerceiverForMaskedLM", config).items()}
    with torch.inference_mode():
        model(**inputs)
        if variant != "eager only (control)":
            compiled.compile_latent_block(model, force=True)
            compiled.warm_compiled(model)
        model(**inputs)
        model(**{k: torch.cat([v, v[:1]]) for k, v in inputs.items()})
    if device == "cuda":
        torch.cuda.synchronize()
    print("ok", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="CPU, fp32: checks the script")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.device)
        return
    import torch
    from reference import build_reference

    device = "cpu" if args.smoke else "cuda"
    path = Path(tempfile.mkdtemp()) / "mlm"
    build_reference("PerceiverForMaskedLM", path)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"The compiled MLM on {name}, torch {torch.__version__} (benchmarks/compile_crash.py)\n")
    print("| variant | exit |\n|---|---|")
    for variant in VARIANTS if not args.smoke else list(VARIANTS)[:2]:
        cmd = [sys.executable, __file__, "--child", variant, "--path", str(path), "--device", device]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(f"| {variant} | timed out after {args.timeout:.0f} s |", flush=True)
            continue
        if done.returncode == 0:
            outcome = "ok"
        elif done.returncode == -signal.SIGSEGV:
            outcome = "segfault"
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            outcome = f"exit {done.returncode}: {lines[-1][:200] if lines else ''}".replace("|", "/")
        print(f"| {variant} | {outcome} |", flush=True)


if __name__ == "__main__":
    main()
