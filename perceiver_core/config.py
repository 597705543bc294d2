"""Architecture configuration: one frozen dataclass for every Perceiver IO head.

Field names and defaults follow transformers' ``PerceiverConfig`` so a Hub ``config.json`` maps onto it
one to one; conversion to and from that JSON lives in ``checkpoint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The one list of supported heads. Each name is the transformers class that config.json's
# "architectures" field names, and heads.py's class of the same name implements it (HEADS is built from
# this tuple), so adding a head means one name here and one class there.
ARCHITECTURES = (
    "PerceiverModel",
    "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
    "PerceiverForOpticalFlow",
    "PerceiverForMultimodalAutoencoding",
)


@dataclass(frozen=True)
class PerceiverConfig:
    """Hyper-parameters of one Perceiver IO network (defaults: transformers' ``PerceiverConfig``)."""

    architecture: str = "PerceiverModel"
    num_latents: int = 256
    d_latents: int = 1280
    d_model: int = 768
    num_blocks: int = 1
    num_self_attends_per_block: int = 26
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = None
    v_channels: int | None = None
    cross_attention_shape_for_attention: str = "kv"
    self_attention_widening_factor: int = 1
    cross_attention_widening_factor: int = 1
    hidden_act: str = "gelu"
    use_query_residual: bool = True
    vocab_size: int = 262
    max_position_embeddings: int = 2048
    image_size: int = 56
    train_size: tuple[int, int] = (368, 496)
    num_frames: int = 16
    audio_samples_per_frame: int = 1920
    samples_per_patch: int = 16
    output_shape: tuple[int, ...] = (1, 16, 224, 224)
    output_num_channels: int = 512
    label_trainable_num_channels: int = 1024
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)
    # Keys of config.json we do not model; kept so save_pretrained writes them back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'gelu', as in every checkpoint)")
        if self.cross_attention_shape_for_attention not in ("q", "kv"):
            raise ValueError(
                "cross_attention_shape_for_attention must be 'q' or 'kv', "
                f"got {self.cross_attention_shape_for_attention!r}"
            )
        for heads in (self.num_self_attention_heads, self.num_cross_attention_heads):
            if self.d_latents % heads:
                raise ValueError(f"d_latents ({self.d_latents}) must be divisible by the number of heads ({heads})")
        if self.id2label and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")

    def label(self, index: int) -> str:
        """Human-readable name of class ``index`` (``LABEL_<i>`` when the checkpoint has none)."""
        return self.id2label.get(index, f"LABEL_{index}")
