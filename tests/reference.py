"""Tiny transformers Perceiver heads with randomised weights, saved with save_pretrained.

Parity tests load the saved directory with perceiver_core and compare against the transformers model
they were saved from, on the same inputs, in the same test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PerceiverConfig

# Several heads, widening factors != 1, and explicit qk/v channels where the published models use them.
_BASE: dict[str, Any] = dict(
    num_latents=12,
    d_latents=32,
    num_blocks=2,
    num_self_attends_per_block=2,
    num_self_attention_heads=4,
    num_cross_attention_heads=1,
    self_attention_widening_factor=2,
    cross_attention_widening_factor=3,
    attention_probs_dropout_prob=0.0,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "PerceiverModel": dict(d_model=24, num_cross_attention_heads=2),
    "PerceiverForMaskedLM": dict(
        d_model=64, max_position_embeddings=40, qk_channels=16, v_channels=32, num_cross_attention_heads=2
    ),
    "PerceiverForSequenceClassification": dict(
        d_model=48, max_position_embeddings=40, num_labels=3, num_cross_attention_heads=4
    ),
    "PerceiverForImageClassificationLearned": dict(image_size=16, num_labels=7),
    "PerceiverForImageClassificationFourier": dict(num_labels=7),
    "PerceiverForImageClassificationConvProcessing": dict(num_labels=7),
    "PerceiverForOpticalFlow": dict(train_size=[12, 16], num_self_attention_heads=2),
    "PerceiverForMultimodalAutoencoding": dict(
        num_labels=5,
        num_frames=4,
        image_size=8,
        audio_samples_per_frame=32,
        samples_per_patch=8,
        output_shape=[1, 4, 32, 32],
        output_num_channels=24,
        _label_trainable_num_channels=16,
    ),
}


@dataclass
class Reference:
    model: Any  # the transformers head, fp32, eval mode
    path: Path
    inputs: dict[str, Any]


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights at a 1/sqrt(fan_in) scale, non-trivial biases, LayerNorm/BatchNorm affine and statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if ("norm" in name and name.endswith("weight")) or name.endswith("running_var"):
                tensor.copy_(1 + 0.2 * noise.abs())
            elif name.endswith("bias") or name.endswith("running_mean"):
                tensor.copy_(0.1 * noise)
            elif (
                tensor.ndim >= 2
                and "latents" not in name
                and "position" not in name
                and "padding" not in name
                and "mask" not in name
            ):
                tensor.copy_(noise / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_(noise)


def make_inputs(arch: str, config: PerceiverConfig, batch: int = 2, seed: int = 1) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    if arch == "PerceiverModel":
        mask = torch.ones(batch, 9, dtype=torch.long)
        mask[1, 6:] = 0
        return {"inputs": torch.randn(batch, 9, config.d_model, generator=gen), "attention_mask": mask}
    if arch in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
        ids = torch.randint(6, config.vocab_size, (batch, 17), generator=gen)
        mask = torch.ones_like(ids)
        ids[1, 11:] = 0  # the second row is padded
        mask[1, 11:] = 0
        return {"inputs": ids, "attention_mask": mask}
    if arch == "PerceiverForImageClassificationLearned":
        return {"inputs": torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)}
    if arch == "PerceiverForImageClassificationFourier":
        return {"inputs": torch.randn(batch, 3, 14, 19, generator=gen)}  # non-square
    if arch == "PerceiverForImageClassificationConvProcessing":
        return {"inputs": torch.randn(batch, 3, 30, 41, generator=gen)}  # non-square, odd
    if arch == "PerceiverForOpticalFlow":
        h, w = config.train_size
        return {"inputs": torch.randn(batch, 2, 27, h, w, generator=gen)}
    if arch == "PerceiverForMultimodalAutoencoding":
        t, (_, _, h, w) = config.num_frames, config.output_shape
        samples = config.num_frames * config.audio_samples_per_frame
        return {
            "inputs": {
                "image": torch.rand(batch, t, 3, h, w, generator=gen),
                "audio": torch.rand(batch, samples, 1, generator=gen) * 2 - 1,
                "label": torch.zeros(batch, config.num_labels),
            }
        }
    raise KeyError(arch)


def build_reference(arch: str, directory: Path, seed: int = 0) -> Reference:
    config = PerceiverConfig(**{**_BASE, **CONFIGS[arch]})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    randomise(model, seed)
    model.save_pretrained(directory)
    return Reference(model, directory, make_inputs(arch, config))


def save_small_image_classifier(directory: Path, labels: list[str]) -> None:
    """A small transformers Fourier image classifier with the given labels, for serving tests."""
    config = PerceiverConfig(
        num_latents=8,
        d_latents=32,
        num_blocks=1,
        num_self_attends_per_block=1,
        num_self_attention_heads=2,
        num_cross_attention_heads=1,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
    )
    transformers.PerceiverForImageClassificationFourier(config).save_pretrained(directory)


def reference_logits(ref: Reference, **extra: Any) -> Any:
    with torch.no_grad():
        out = ref.model(**ref.inputs, **extra)
    return out.last_hidden_state if out.logits is None else out.logits  # bare model: latents


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-30))
