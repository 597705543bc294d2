"""Video + audio + label adapters for multimodal autoencoding, and the decoder's query provider.

Encoder side: audio patches of 16 samples with 1-D Fourier features (401 ch), 4×4 space-to-depth video
patches with 3-D Fourier features (243 ch) and a one-hot label (700 ch), each padded with a learned
vector to a common width, then concatenated in sorted modality order (audio, image, label). The label is
always replaced by its learned mask token (mask probability 1.0 in the reference), so its value never
matters.

Decoder side: per-modality queries (Fourier features at the requested output points for audio and
video, a learned vector for the label), padded with learned vectors to a common width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import PerceiverConfig
from ..position import FourierPositionEncoding, TrainablePositionEncoding, subsampled_positions
from .image import concat_position

MODALITIES = ("audio", "image", "label")  # sorted: the reference concatenates in this order
# transformers hard-codes spatial_downsample=4 (temporal_downsample=1) for the image preprocessor in
# PerceiverForMultimodalAutoencoding: each frame is cut into 4×4-pixel patches by space-to-depth, and
# the published checkpoint's encoder input width (48 + 195 Fourier channels, padded) follows from it.
VIDEO_PATCH_SIZE = 4
VIDEO_PATCH_CHANNELS = VIDEO_PATCH_SIZE * VIDEO_PATCH_SIZE * 3  # 4×4 pixels × RGB = 48


def space_to_depth(frames: Tensor, block: int) -> Tensor:
    """[B, T, C, H, W] → [B, T, H/s, W/s, s·s·C], channels ordered (dh, dw, c)."""
    b, t, c, h, w = frames.shape
    if h % block or w % block:
        raise ValueError(f"frame size {h}x{w} is not divisible by the patch size {block}")
    x = frames.reshape(b, t, c, h // block, block, w // block, block)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, t, h // block, w // block, block * block * c)


class MultimodalAdapter(nn.Module):
    """{"audio": [B, S, 1], "image": [B, T, 3, H, W], "label": [B, K]} → [B, M_a + M_i + 1, C]."""

    def __init__(self, config: PerceiverConfig, min_padding: int = 4) -> None:
        super().__init__()
        self.samples_per_patch = config.samples_per_patch
        n_audio = config.num_frames * config.audio_samples_per_frame
        self.audio_position = FourierPositionEncoding(192, (n_audio,))
        self.image_position = FourierPositionEncoding(32, (config.num_frames, config.image_size, config.image_size))
        widths = {
            "audio": config.samples_per_patch + self.audio_position.num_channels,
            "image": VIDEO_PATCH_CHANNELS + self.image_position.num_channels,
            "label": config.num_labels,
        }
        self.width = max(widths.values()) + min_padding
        self.padding = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, self.width - widths[m]) * 0.02) for m in MODALITIES}
        )
        self.mask = nn.ParameterDict({m: nn.Parameter(torch.randn(1, self.width) * 0.02) for m in MODALITIES})

    @property
    def num_channels(self) -> int:
        return self.width

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        missing = [m for m in MODALITIES if m not in inputs]
        if missing:
            raise ValueError(f"multimodal inputs need keys {MODALITIES}; missing {missing}")
        audio, image = inputs["audio"], inputs["image"]
        b, dtype, device = image.shape[0], image.dtype, image.device
        patches = audio.reshape(b, -1, self.samples_per_patch)  # [B, S/16, 16]
        audio_x = concat_position(patches, self.audio_position((patches.shape[1],), device, dtype))
        video = space_to_depth(image, VIDEO_PATCH_SIZE)  # [B, T, H/4, W/4, 48]
        grid = video.shape[1:4]
        image_x = concat_position(video.reshape(b, -1, video.shape[-1]), self.image_position(grid, device, dtype))
        parts = [self._pad("audio", audio_x), self._pad("image", image_x)]
        # Mask probability 1.0: the label input is replaced by its mask token whatever it holds.
        parts.append(self.mask["label"].to(dtype).expand(b, 1, -1))
        return torch.cat(parts, dim=1)

    def _pad(self, modality: str, x: Tensor) -> Tensor:
        pad = self.padding[modality].to(x.dtype).expand(x.shape[0], x.shape[1], -1)
        return torch.cat([x, pad], dim=-1)


class MultimodalQueries(nn.Module):
    """Decoder queries for chosen output points of each modality → [B, O_a + O_i + 1, 1026]."""

    def __init__(self, config: PerceiverConfig, min_padding: int = 2) -> None:
        super().__init__()
        n_audio = config.num_frames * config.audio_samples_per_frame
        self.audio_dims = (n_audio // config.samples_per_patch,)
        self.image_dims = tuple(config.output_shape[1:4])
        self.audio_position = FourierPositionEncoding(192, (n_audio,))
        self.image_position = FourierPositionEncoding(32, (config.num_frames, config.image_size, config.image_size))
        self.label_query = TrainablePositionEncoding(1, config.label_trainable_num_channels)
        widths = {
            "audio": self.audio_position.num_channels,
            "image": self.image_position.num_channels,
            "label": config.label_trainable_num_channels,
        }
        self.width = max(widths.values()) + min_padding
        self.padding = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, self.width - widths[m]) * 0.02) for m in MODALITIES}
        )

    @property
    def num_points(self) -> dict[str, int]:
        return {"audio": self.audio_dims[0], "image": math.prod(self.image_dims), "label": 1}

    def forward(self, batch_size: int, audio_points: Tensor, image_points: Tensor, dtype: torch.dtype) -> Tensor:
        """audio_points / image_points: flat indices into the audio-patch and video-pixel grids."""
        audio = self.audio_position.at(subsampled_positions(audio_points, self.audio_dims), dtype)
        image = self.image_position.at(subsampled_positions(image_points, self.image_dims), dtype)
        label = self.label_query.embeddings.to(dtype)
        parts = [self._pad("audio", audio), self._pad("image", image), self._pad("label", label)]
        return torch.cat(parts, dim=0).expand(batch_size, -1, -1)

    def _pad(self, modality: str, x: Tensor) -> Tensor:
        return torch.cat([x, self.padding[modality].to(x.dtype).expand(x.shape[0], -1)], dim=-1)
