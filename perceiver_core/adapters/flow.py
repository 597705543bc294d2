"""Optical-flow input adapter: two frames of 3×3×RGB patches → 64 channels + 2-D Fourier features."""

from __future__ import annotations

from torch import Tensor, nn

from ..aligned import AlignedLinear
from ..config import PerceiverConfig
from ..position import FourierPositionEncoding
from .image import concat_position


class FlowPatchAdapter(nn.Module):
    """patches [B, 2, 27, H, W] → [B, H·W, 64 + 258]."""

    def __init__(self, config: PerceiverConfig, channels: int = 64) -> None:
        super().__init__()
        self.patch_projection = AlignedLinear(54, channels)
        self.position = FourierPositionEncoding(64, config.train_size)

    @property
    def num_channels(self) -> int:
        return self.patch_projection.out_features + self.position.num_channels

    def forward(self, patches: Tensor) -> Tensor:
        if patches.ndim != 5 or patches.shape[1:3] != (2, 27):
            raise ValueError(f"optical flow expects patches [B, 2, 27, H, W], got {list(patches.shape)}")
        b, _, _, h, w = patches.shape
        # space-to-depth over time: channels ordered (frame, patch channel) as in the reference.
        stacked = patches.permute(0, 3, 4, 1, 2).reshape(b, h * w, 54)
        return concat_position(self.patch_projection(stacked), self.position((h, w), patches.device, patches.dtype))
