"""A checkpoint-compatible, fast Perceiver IO in torch.

import perceiver_core
model = perceiver_core.from_pretrained("deepmind/vision-perceiver-learned", device="cuda")
logits = model(inputs=pixel_values).logits
"""

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ARCHITECTURES, PerceiverConfig
from .heads import HEADS, PerceiverHead, PerceiverOutput, build_model

__all__ = [
    "ARCHITECTURES",
    "HEADS",
    "CheckpointError",
    "PerceiverConfig",
    "PerceiverHead",
    "PerceiverOutput",
    "build_model",
    "from_pretrained",
    "save_pretrained",
]
