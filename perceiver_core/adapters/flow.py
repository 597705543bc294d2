"""Optical-flow input adapter: two frames of 3×3×RGB patches → 64 channels + 2-D Fourier features."""

from __future__ import annotations

from torch import Tensor, nn

from ..aligned import AlignedLinear
from ..config import PerceiverConfig
from ..position import FourierPositionEncoding
from .image import concat_position

# Each pixel's input: its 3×3×RGB patch (processing.flow.extract_patches) in each of the two frames.
FRAMES = 2
PATCH_CHANNELS = 3 * 3 * 3
# = 54. transformers hard-codes conv_after_patching_in_channels=54 (with temporal_downsample=2) in
# PerceiverForOpticalFlow: space-to-depth over time stacks both frames' patches along channels, and the
# published checkpoint's patch projection has this input width.
STACKED_CHANNELS = FRAMES * PATCH_CHANNELS


class FlowPatchAdapter(nn.Module):
    """patches [B, 2, 27, H, W] → [B, H·W, 64 + 258]."""

    def __init__(self, config: PerceiverConfig, channels: int = 64) -> None:
        super().__init__()
        self.patch_projection = AlignedLinear(STACKED_CHANNELS, channels)
        self.position = FourierPositionEncoding(64, config.train_size)

    @property
    def num_channels(self) -> int:
        return self.patch_projection.out_features + self.position.num_channels

    def forward(self, patches: Tensor) -> Tensor:
        if patches.ndim != 5 or patches.shape[1:3] != (FRAMES, PATCH_CHANNELS):
            raise ValueError(f"optical flow expects patches [B, 2, 27, H, W], got {list(patches.shape)}")
        b, _, _, h, w = patches.shape
        # space-to-depth over time: channels ordered (frame, patch channel) as in the reference.
        stacked = patches.permute(0, 3, 4, 1, 2).reshape(b, h * w, STACKED_CHANNELS)
        return concat_position(self.patch_projection(stacked), self.position((h, w), patches.device, patches.dtype))
