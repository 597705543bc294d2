"""Flow inputs, window grid, blending weights and tiled inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import Reference

import perceiver_core
from perceiver_core.processing.flow import (
    FLOW_SCALE_FACTOR,
    blend_weights,
    cut_windows,
    extract_patches,
    flow_layout,
    grid_indices,
    normalize_frames,
    prepare_tiles,
    tiled_flow,
)

WINDOW = (368, 496)


def test_patches_follow_tf_extract_patches_order() -> None:
    frames = torch.rand(1, 2, 5, 6, 3)
    patches = extract_patches(frames)
    assert patches.shape == (1, 2, 27, 5, 6)
    padded = torch.nn.functional.pad(frames, (0, 0, 1, 1, 1, 1))
    for y, x in [(0, 0), (2, 3), (4, 5)]:
        expected = padded[0, :, y : y + 3, x : x + 3, :].reshape(2, 27)  # (kh, kw, rgb)
        assert torch.equal(patches[0, :, :, y, x], expected)


def test_blend_weights_are_distance_to_border() -> None:
    expected = torch.tensor([[1, 1, 1, 1, 1], [1, 2, 2, 2, 1], [1, 2, 2, 2, 1], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(blend_weights((4, 5)), expected)
    w = blend_weights(WINDOW)
    assert w.max() == 184 and w[0].max() == 1 and w[:, 0].max() == 1


def test_grid_covers_image_with_last_window_flush() -> None:
    assert grid_indices(368, 496, WINDOW) == [(0, 0)]
    corners = grid_indices(436, 1024, WINDOW)
    assert corners[0] == (0, 0) and corners[-1] == (436 - 368, 1024 - 496)
    covered = np.zeros((436, 1024), dtype=bool)
    for y, x in corners:
        covered[y : y + 368, x : x + 496] = True
    assert covered.all()


@pytest.mark.parametrize("size", [(700, 1000), (736, 992), (1100, 900), (369, 497), (1080, 1920)])
def test_every_window_lies_inside_the_image_whatever_its_size(size: tuple[int, int]) -> None:
    """The colab's grid lets a window before the last reach past the border (700 px: 348 + 368 > 700)."""
    height, width = size
    corners = grid_indices(height, width, WINDOW)
    assert all(0 <= y <= height - 368 and 0 <= x <= width - 496 for y, x in corners)
    covered = np.zeros(size, dtype=bool)
    for y, x in corners:
        covered[y : y + 368, x : x + 496] = True
    assert covered.all()
    frame = torch.zeros(height, width, 3, dtype=torch.uint8)
    assert prepare_tiles(frame, frame, WINDOW).tiles.shape[0] == len(corners)


def _shifted_pair(height: int, width: int, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height + 16, width + 16, 3), dtype=np.uint8)
    frame1 = base[8 : 8 + height, 8 : 8 + width]
    frame2 = base[8 - dy : 8 - dy + height, 8 - dx : 8 - dx + width]  # content moves by (+dy, +dx)
    return torch.from_numpy(frame1.copy()), torch.from_numpy(frame2.copy())


def test_tiled_flow_on_a_large_shifted_pair_has_the_image_shape() -> None:
    """A pair larger than one window: every pixel gets a blended value; a constant field survives blending."""
    frame1, frame2 = _shifted_pair(437, 1000, dy=2, dx=5)
    calls: list[int] = []

    def predict(patches: torch.Tensor) -> torch.Tensor:  # stands in for the model: the true shift, in logits
        calls.append(patches.shape[0])
        assert patches.shape[1:] == (2, 27, *WINDOW)
        out = torch.empty(patches.shape[0], *WINDOW, 2)
        out[..., 0], out[..., 1] = 5 / FLOW_SCALE_FACTOR, 2 / FLOW_SCALE_FACTOR
        return out

    flow = tiled_flow(predict, frame1, frame2, WINDOW, batch_size=4)
    assert flow.shape == (437, 1000, 2)
    assert sum(calls) == len(grid_indices(437, 1000, WINDOW)) == 6
    assert torch.allclose(flow[..., 0], torch.tensor(5.0)) and torch.allclose(flow[..., 1], torch.tensor(2.0))


def test_tiled_flow_with_a_real_model_matches_colab_blending(references: dict[str, Reference]) -> None:
    """The tiny flow head on a 30x41 pair: the tiled result equals the colab's weighted average done by hand."""
    model = perceiver_core.from_pretrained(references["PerceiverForOpticalFlow"].path)
    window = tuple(model.config.train_size)
    frame1, frame2 = _shifted_pair(30, 41, dy=1, dx=2)

    def predict(patches: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs=patches).logits  # type: ignore[return-value]

    flow = tiled_flow(predict, frame1, frame2, window, min_overlap=4)  # type: ignore[arg-type]
    pair = normalize_frames(torch.stack([frame1, frame2]))
    num = torch.zeros(30, 41, 2)
    den = torch.zeros(30, 41, 1)
    for y, x in grid_indices(30, 41, window, min_overlap=4):  # type: ignore[arg-type]
        piece = predict(extract_patches(pair[None, :, y : y + window[0], x : x + window[1]]))[0] * 20
        wy, wx = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
        w = torch.from_numpy(np.minimum(np.minimum(wx + 1, window[1] - wx), np.minimum(wy + 1, window[0] - wy)))
        num[y : y + window[0], x : x + window[1]] += piece * w[..., None]
        den[y : y + window[0], x : x + window[1]] += w[..., None]
    assert torch.allclose(flow, num / den, atol=1e-6)


def test_frames_smaller_than_the_window_are_padded_then_cropped() -> None:
    frame1, frame2 = _shifted_pair(100, 150, 0, 1)
    seen: list[tuple[int, ...]] = []

    def predict(patches: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(patches.shape))
        return torch.zeros(patches.shape[0], *WINDOW, 2)

    assert tiled_flow(predict, frame1, frame2, WINDOW).shape == (100, 150, 2)
    assert seen == [(1, 2, 27, *WINDOW)]


def test_windows_cut_one_pair_at_a_time_are_the_tiles() -> None:
    """A video's pairs are cut window by window in each forward pass; the windows are prepare_tiles'."""
    frame1, frame2 = _shifted_pair(437, 1000, dy=2, dx=5)
    tiles = prepare_tiles(frame1, frame2, WINDOW)
    layout = flow_layout(437, 1000, WINDOW)
    assert layout.corners == tiles.corners and layout.padded == tiles.padded
    assert torch.equal(cut_windows(frame1, frame2, layout), tiles.tiles)
    assert torch.equal(cut_windows(frame1, frame2, layout, [3, 1]), tiles.tiles[[3, 1]])
    small = _shifted_pair(100, 150, 0, 1)
    assert torch.equal(cut_windows(*small, flow_layout(100, 150, WINDOW)), prepare_tiles(*small, WINDOW).tiles)
    with pytest.raises(ValueError, match="layout is for"):
        cut_windows(frame1, frame2, flow_layout(436, 1000, WINDOW))
