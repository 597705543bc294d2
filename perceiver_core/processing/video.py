"""Multimodal autoencoding inputs: 16 frames at 224² and 48 kHz mono audio.

The published model sees 16 consecutive frames (25 fps) and the 16 × 1920 = 30,720 audio samples that
cover them (0.64 s at 48 kHz). Frames are centre-square cropped, resized to 224 and scaled to [0, 1].
A longer video is several such clips: ``clip_count`` says how many it holds, ``clip_starts`` where N of them
start when spread evenly over it (in frames at 25 fps, so that each clip's audio starts at frame × 1,920).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

VIDEO_FPS = 25.0
AUDIO_RATE = 48_000


def prepare_frame(frame: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [size, size, 3]: the centre square, bilinear-resized."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(np.ascontiguousarray(frame[top : top + side, left : left + side]))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR))


def prepare_frames(frames: np.ndarray, num_frames: int = 16, size: int = 224) -> Tensor:
    """uint8 [T, H, W, 3] → float32 [num_frames, 3, size, size] in [0, 1]; short clips repeat the last frame."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3], got {list(frames.shape)}")
    out = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for i in range(num_frames):
        out[i] = prepare_frame(frames[min(i, frames.shape[0] - 1)], size)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def clip_count(duration: float, num_frames: int = 16, fps: float = VIDEO_FPS) -> int:
    """How many clips of ``num_frames`` at ``fps`` a video of ``duration`` seconds holds, the last one partly
    (ceil(duration / 0.64) for the published model); at least one."""
    return max(1, math.ceil(duration * fps / num_frames - 1e-3))


def clip_starts(duration: float, count: int, num_frames: int = 16, fps: float = VIDEO_FPS) -> list[int]:
    """First frames (in 1/fps steps) of ``count`` clips spread evenly over the video: the first clip at the
    start, the last one ending with the video (clips overlap when the video is shorter than all of them)."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    last = max(0, math.floor(duration * fps + 1e-3) - num_frames)  # the last clip's first frame
    if count == 1:
        return [0]
    return [round(i * last / (count - 1)) for i in range(count)]


def prepare_audio(samples: np.ndarray, num_samples: int) -> Tensor:
    """float mono samples in [-1, 1] → [num_samples, 1], cut or padded with silence."""
    audio = np.zeros(num_samples, dtype=np.float32)
    clip = np.clip(np.asarray(samples, dtype=np.float32).reshape(-1)[:num_samples], -1.0, 1.0)
    audio[: clip.shape[0]] = clip
    return torch.from_numpy(audio)[:, None]
