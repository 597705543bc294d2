"""Optical-flow inputs and tiling.

Inputs: each frame scaled to [-1, 1], zero-padded by one pixel, and every pixel's 3×3 neighbourhood
stacked as 27 channels ordered (kh, kw, rgb), giving [B, 2, 27, H, W] (TF ``extract_patches``).

Any image size: the network sees fixed 368×496 windows. Following DeepMind's colab, windows are laid on
a grid with at least 20 px overlap, the last row/column flush with the border, and each window's flow
is weighted by ``min(x+1, W-x, y+1, H-y)`` before the weighted average. The model's logits are scaled by
20 (``FLOW_SCALE_FACTOR``) to give flow in pixels. Images smaller than a window are edge-padded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

FLOW_SCALE_FACTOR = 20.0
MIN_OVERLAP = 20


def normalize_frames(frames: Tensor) -> Tensor:
    """uint8 (or 0..255 float) [..., H, W, 3] → float32 in [-1, 1]."""
    return frames.to(torch.float32) / 255.0 * 2 - 1


def extract_patches(frames: Tensor) -> Tensor:
    """normalised frames [B, 2, H, W, 3] → [B, 2, 27, H, W] 3×3 patches, channels (kh, kw, rgb)."""
    b, t, h, w, c = frames.shape
    x = frames.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # [B·2, 3, H, W]
    cols = F.unfold(x, kernel_size=3, padding=1)  # [B·2, 3·9, H·W], ordered (c, kh, kw)
    cols = cols.reshape(b, t, c, 3, 3, h, w).permute(0, 1, 3, 4, 2, 5, 6)  # → (kh, kw, c)
    return cols.reshape(b, t, 9 * c, h, w)


def grid_indices(
    height: int, width: int, window: tuple[int, int], min_overlap: int = MIN_OVERLAP
) -> list[tuple[int, int]]:
    """Top-left corners of the windows covering a height×width image (last ones flush with the border)."""
    wh, ww = window
    if min_overlap >= min(wh, ww):
        raise ValueError(f"overlap {min_overlap} must be smaller than the window {window}")
    if height < wh or width < ww:
        raise ValueError(f"image {height}x{width} is smaller than the window {wh}x{ww}")
    # DeepMind's colab steps by (window - overlap) and moves only the last start flush with the border;
    # when the step overshoots, the one before can reach past the border too (a 700-px-high frame: starts
    # 0, 348, 696 → 0, 348, 332, and 348 + 368 > 700), and its window comes out short. Every start is
    # clamped instead; where the colab's windows fit, the set is the same.
    ys = {min(y, height - wh) for y in range(0, height, wh - min_overlap)}
    xs = {min(x, width - ww) for x in range(0, width, ww - min_overlap)}
    return list(itertools.product(sorted(ys), sorted(xs)))


def blend_weights(window: tuple[int, int]) -> Tensor:
    """[H, W] weights, largest in the middle: min(x+1, W-x, y+1, H-y)."""
    wh, ww = window
    y = torch.arange(wh)[:, None]
    x = torch.arange(ww)[None, :]
    return torch.minimum(torch.minimum(x + 1, ww - x), torch.minimum(y + 1, wh - y)).to(torch.float32)


@dataclass
class FlowLayout:
    """Where the windows of a height×width frame pair sit: their corners in the (edge-padded) frame."""

    corners: list[tuple[int, int]]
    height: int
    width: int
    padded: tuple[int, int]
    window: tuple[int, int]


@dataclass
class FlowTiles(FlowLayout):
    """Normalised windows [n, 2, wh, ww, 3] of a frame pair, with where they sit in the (padded) image."""

    tiles: Tensor


def flow_layout(height: int, width: int, window: tuple[int, int], min_overlap: int = MIN_OVERLAP) -> FlowLayout:
    """The windows of a height×width frame (frames smaller than a window are edge-padded up to it)."""
    padded = (max(height, window[0]), max(width, window[1]))
    return FlowLayout(grid_indices(*padded, window, min_overlap), height, width, padded, window)


def cut_windows(frame1: Tensor, frame2: Tensor, layout: FlowLayout, which: list[int] | None = None) -> Tensor:
    """Two uint8 frames [H, W, 3] → their normalised windows [n, 2, wh, ww, 3] (all, or those ``which``)."""
    if frame1.shape != frame2.shape or frame1.ndim != 3 or frame1.shape[-1] != 3:
        raise ValueError(f"frames must both be [H, W, 3]; got {list(frame1.shape)} and {list(frame2.shape)}")
    if tuple(frame1.shape[:2]) != (layout.height, layout.width):
        raise ValueError(f"frames are {list(frame1.shape[:2])}; the layout is for {[layout.height, layout.width]}")
    wh, ww = layout.window
    pair = normalize_frames(torch.stack([frame1, frame2]))  # [2, H, W, 3]
    pad_h, pad_w = layout.padded[0] - layout.height, layout.padded[1] - layout.width
    if pad_h or pad_w:
        pair = F.pad(pair.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate").permute(0, 2, 3, 1)
    corners = layout.corners if which is None else [layout.corners[i] for i in which]
    return torch.stack([pair[:, y : y + wh, x : x + ww] for y, x in corners])


def prepare_tiles(frame1: Tensor, frame2: Tensor, window: tuple[int, int], min_overlap: int = MIN_OVERLAP) -> FlowTiles:
    """Cut two uint8 frames [H, W, 3] into overlapping windows (edge-padding frames smaller than one)."""
    if frame1.shape != frame2.shape or frame1.ndim != 3 or frame1.shape[-1] != 3:
        raise ValueError(f"frames must both be [H, W, 3]; got {list(frame1.shape)} and {list(frame2.shape)}")
    layout = flow_layout(frame1.shape[0], frame1.shape[1], window, min_overlap)
    tiles = cut_windows(frame1, frame2, layout)
    return FlowTiles(layout.corners, layout.height, layout.width, layout.padded, layout.window, tiles)


def blend_tiles(logits: Tensor, layout: FlowLayout) -> Tensor:
    """Model logits [n, wh, ww, 2] for each window → flow in pixels [H, W, 2] (weighted average)."""
    wh, ww = layout.window
    weights = blend_weights(layout.window)[..., None]  # [wh, ww, 1]
    flow = torch.zeros(*layout.padded, 2)
    total = torch.zeros(*layout.padded, 1)
    for (y, x), piece in zip(layout.corners, logits.float().cpu(), strict=True):
        flow[y : y + wh, x : x + ww] += piece * FLOW_SCALE_FACTOR * weights
        total[y : y + wh, x : x + ww] += weights
    return (flow / total)[: layout.height, : layout.width]


def tiled_flow(
    predict: Callable[[Tensor], Tensor],
    frame1: Tensor,
    frame2: Tensor,
    window: tuple[int, int],
    batch_size: int = 8,
    min_overlap: int = MIN_OVERLAP,
) -> Tensor:
    """Flow in pixels [H, W, 2] for two uint8 frames [H, W, 3] of any size.

    ``predict`` maps patches [n, 2, 27, wh, ww] to model logits [n, wh, ww, 2].
    """
    layout = prepare_tiles(frame1, frame2, window, min_overlap)
    logits = [
        predict(extract_patches(layout.tiles[i : i + batch_size])) for i in range(0, layout.tiles.shape[0], batch_size)
    ]
    return blend_tiles(torch.cat(logits), layout)
