"""Multimodal autoencoding inputs: 16 frames at 224² and 48 kHz mono audio.

The published model sees 16 consecutive frames (25 fps) and the 16 × 1920 = 30,720 audio samples that
cover them (0.64 s at 48 kHz). Frames are centre-square cropped, resized to 224 and scaled to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

VIDEO_FPS = 25.0
AUDIO_RATE = 48_000


def prepare_frames(frames: np.ndarray, num_frames: int = 16, size: int = 224) -> Tensor:
    """uint8 [T, H, W, 3] → float32 [num_frames, 3, size, size] in [0, 1]; short clips repeat the last frame."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3], got {list(frames.shape)}")
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        frame = frames[min(i, frames.shape[0] - 1)]
        h, w = frame.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.fromarray(frame[top : top + side, left : left + side])
        out[i] = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def prepare_audio(samples: np.ndarray, num_samples: int) -> Tensor:
    """float mono samples in [-1, 1] → [num_samples, 1], cut or padded with silence."""
    audio = np.zeros(num_samples, dtype=np.float32)
    clip = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1)[:num_samples], -1.0, 1.0)
    audio[: clip.shape[0]] = clip
    return torch.from_numpy(audio)[:, None]
