"""Image classification input adapters: learned (conv1x1), Fourier (raw pixels) and conv preprocessing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PerceiverConfig
from ..position import ConstantCache, FourierPositionEncoding, TrainablePositionEncoding


def channels_last(pixels: Tensor) -> Tensor:
    """[B, C, H, W] → [B, H·W, C]."""
    return pixels.flatten(2).transpose(1, 2)


def concat_position(features: Tensor, encoding: Tensor) -> Tensor:
    """features [B, M, C] ++ encoding [M, P] (shared across the batch) → [B, M, C+P]."""
    return torch.cat([features, encoding.expand(features.shape[0], -1, -1)], dim=-1)


class LearnedImageAdapter(nn.Module):
    """Per-pixel 1×1 conv to 256 channels, concatenated with a projected learned 2-D position table."""

    def __init__(self, config: PerceiverConfig, channels: int = 256) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.conv1x1 = nn.Conv2d(3, channels, kernel_size=1)
        self.position = TrainablePositionEncoding(config.image_size**2, channels)
        self.position_projection = nn.Linear(channels, channels)
        self._cache = ConstantCache()

    @property
    def num_channels(self) -> int:
        return self.conv1x1.out_channels + self.position_projection.out_features

    def forward(self, pixels: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        _b, c, h, w = pixels.shape
        if h * w != self.position.embeddings.shape[0] and not interpolate_pos_encoding:
            raise ValueError(
                f"learned position table covers {self.image_size}x{self.image_size} pixels, got {h}x{w}; "
                "resize the image or pass interpolate_pos_encoding=True"
            )
        # A 1x1 conv is a per-pixel linear map; applying it channels-last skips a 256-channel permute.
        weight = self.conv1x1.weight.view(self.conv1x1.out_channels, c)
        features = F.linear(channels_last(pixels), weight, self.conv1x1.bias)  # [B, H·W, 256]
        params = (self.position.embeddings, self.position_projection.weight, self.position_projection.bias)
        encoding = self._cache.get(((h, w), pixels.dtype), params, lambda: self._projected_table(h, w))
        return concat_position(features, encoding)

    def _projected_table(self, h: int, w: int) -> Tensor:
        table: Tensor = self.position.embeddings
        side = self.image_size
        if (h, w) != (side, side):
            grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            table = grid.reshape(1, table.shape[1], -1).permute(0, 2, 1)[0]
        return self.position_projection(table)


class FourierImageAdapter(nn.Module):
    """Raw pixels concatenated with 2-D Fourier features (64 bands, max resolution 224²)."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.position = FourierPositionEncoding(64, (224, 224))

    @property
    def num_channels(self) -> int:
        return 3 + self.position.num_channels

    def forward(self, pixels: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        h, w = pixels.shape[2:]
        return concat_position(channels_last(pixels), self.position((h, w), pixels.device, pixels.dtype))


class ConvImageAdapter(nn.Module):
    """conv7×7/2 (pad 3) + BatchNorm + ReLU + maxpool 3/2 (no padding: 224 → 55) with 2-D Fourier features."""

    def __init__(self, config: PerceiverConfig, channels: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.batchnorm = nn.BatchNorm2d(channels)
        # The reference builds the features for DeepMind's 56×56 grid even though the pooled grid is 55×55.
        self.position = FourierPositionEncoding(64, (56, 56))

    @property
    def num_channels(self) -> int:
        return self.conv.out_channels + self.position.num_channels

    def forward(self, pixels: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        x = F.max_pool2d(F.relu(self.batchnorm(self.conv(pixels))), kernel_size=3, stride=2)
        h, w = x.shape[2:]
        return concat_position(channels_last(x), self.position((h, w), x.device, x.dtype))
