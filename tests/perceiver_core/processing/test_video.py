"""Multimodal inputs: frame preparation, and how many clips a video holds and where they start."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from perceiver_core.processing.video import clip_count, clip_starts, prepare_frame, prepare_frames


@pytest.mark.parametrize(
    ("seconds", "count"), [(0.2, 1), (0.64, 1), (0.68, 2), (1.0, 2), (1.28, 2), (1.3, 3), (60.0, 94)]
)
def test_a_video_holds_ceil_of_its_length_over_0_64_s_clips(seconds: float, count: int) -> None:
    assert clip_count(seconds) == count


def test_clips_spread_from_the_start_to_the_end() -> None:
    assert clip_starts(1.0, 2) == [0, 9]  # 25 frames: the last clip is frames 9..24
    assert clip_starts(1.28, 2) == [0, 16]  # two halves, back to back
    assert clip_starts(10.0, 5) == [0, 58, 117, 176, 234]  # 250 frames; the last clip ends at frame 249
    assert clip_starts(0.4, 3) == [0, 0, 0]  # shorter than one clip: every clip is the whole video
    assert clip_starts(5.0, 1) == [0]
    with pytest.raises(ValueError, match="at least 1"):
        clip_starts(1.0, 0)


def test_one_prepared_frame_is_a_frame_of_the_prepared_clip() -> None:
    photo = np.asarray(Image.open("tests/media/cat.jpg").convert("RGB"))
    square = prepare_frame(photo, 56)
    assert square.shape == (56, 56, 3) and square.dtype == np.uint8
    clip = prepare_frames(photo[None], num_frames=2, size=56)  # [2, 3, 56, 56] in [0, 1]
    assert np.array_equal((clip[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), square)
