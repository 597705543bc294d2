"""The multimodal head's bf16 and fp16 error against transformers fp32, and where its bf16 storage floor sits.

The published multimodal config with benchmarks/models.py's weight draw (seeded on the CPU, so the GPU runs use the
same weights) and its input video; one decoder chunk (as models.py compares it): 6,272 video pixels, 15 audio
patches and the label. For each of bf16 and fp16: ours with residual sums in the weights' dtype and in fp32, and
the storage floor (ours in fp32 arithmetic on the parameters and inputs rounded to that dtype). ``--groups`` then
rounds one group of parameters at a time to bf16, the rest exact: where rounding the weights costs the most.

    python benchmarks/multimodal_fidelity.py                 # CPU: about 25 s on 2 cores
    python benchmarks/multimodal_fidelity.py --groups        # + the bf16 floor, parameter group by group
    python benchmarks/multimodal_fidelity.py --device cuda   # the GPU's own arithmetic (benchmarks/gpu.sh, FP16=1)

Errors are ||a - b|| / ||b|| of each output, and the largest of the three, as benchmarks/models.py gives them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import perceiver_core
from benchmarks.models import GPU_CASES, _rel
from perceiver_core.checkpoint import config_from_dict, load_state

CASE = next(case for case in GPU_CASES if case.chunks)


def cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, dict):
        return {k: cast(v, dtype) for k, v in value.items()}
    return value.to(dtype) if value.is_floating_point() else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--groups", action="store_true", help="the bf16 storage floor, one parameter group at a time")
    args = parser.parse_args()
    device = torch.device(args.device)
    import transformers

    hf_config = transformers.PerceiverConfig(**CASE.config, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)  # models.py's draw
    reference = getattr(transformers, CASE.arch)(hf_config).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = perceiver_core.build_model(config_from_dict({**hf_config.to_dict(), "architectures": [CASE.arch]}))
    load_state(ours, dict(reference.state_dict()))
    reference, ours = reference.to(device), ours.to(device).eval().requires_grad_(False)
    x = CASE.make_inputs(1, device)
    c = CASE.config
    points = {
        "audio": torch.arange(c["num_frames"] * c["audio_samples_per_frame"] // c["samples_per_patch"] // CASE.chunks),
        "image": torch.arange(c["output_shape"][1] * c["output_shape"][2] * c["output_shape"][3] // CASE.chunks),
    }
    points = {k: v.to(device) for k, v in points.items()}
    with torch.inference_mode():
        ref = reference(**x, subsampled_output_points={**points, "label": None}).logits
    del reference

    def run(model: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            out = model.decode(model.encode(inputs["inputs"]), points["audio"], points["image"])
        return {"audio": out["audio"], "image": out["image"].reshape(1, -1, 3), "label": out["label"]}

    def errors(out: dict[str, torch.Tensor]) -> str:
        each = {k: _rel(out[k], ref[k]) for k in ref}
        return f"{max(each.values()):.2e} (" + ", ".join(f"{k} {v:.2e}" for k, v in each.items()) + ")"

    print(
        f"{CASE.name}, {device}, chunk 0; output rms "
        + ", ".join(f"{k} {v.pow(2).mean().sqrt():.2e}" for k, v in ref.items())
    )
    print(f"ours float32: {errors(run(ours, x))}")
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        for sums in (None, torch.float32):
            model = copy.deepcopy(ours).to(dtype)
            model.residual_dtype = sums
            print(f"ours {name}, residual sums in {'float32' if sums else name}: {errors(run(model, cast(x, dtype)))}")
            del model
        floor = copy.deepcopy(ours).to(dtype).float()
        print(f"storage floor {name}: {errors(run(floor, cast(cast(x, dtype), torch.float32)))}", flush=True)
        del floor
    if args.groups:
        named = dict(ours.named_parameters()) | dict(ours.named_buffers())
        groups = sorted({".".join(n.split(".")[:2]) for n, t in named.items() if t.is_floating_point()})
        print("\nbf16 storage floor, one group rounded at a time (parameters in the group: error)")
        print(f"  the inputs only: {errors(run(ours, cast(cast(x, torch.bfloat16), torch.float32)))}")
        for group in groups:
            model = copy.deepcopy(ours)
            members = [
                t
                for n, t in (dict(model.named_parameters()) | dict(model.named_buffers())).items()
                if (n == group or n.startswith(group + ".")) and t.is_floating_point()
            ]
            with torch.no_grad():
                for t in members:
                    t.copy_(t.to(torch.bfloat16).float())
            print(f"  {group} ({sum(t.numel() for t in members):,}): {errors(run(model, x))}", flush=True)
            del model


if __name__ == "__main__":
    main()
