"""The tensor crop-and-resize that follows device JPEG decoding: one image at a time or a stack of
same-sized images give the same pixels, and the reference's tolerance holds (no torchvision needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.photos import photo_jpeg
from perceiver_core.processing import jpeg
from perceiver_core.processing.image import resize_image


def _tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).contiguous()


def test_grouped_crops_equal_one_at_a_time_in_input_order() -> None:
    sizes = [(1920, 1080), (451, 300), (1920, 1080), (1080, 1920), (451, 300), (1920, 1080)]
    images = [_tensor(photo_jpeg(*size)) for size in sizes]
    images[2] = images[2].flip(-1)  # same size, other pixels: a mix-up within a group would show
    together = jpeg.crop_resize_all(images)
    assert len(together) == len(images)
    for image, crop in zip(images, together, strict=True):
        assert crop.shape == (224, 224, 3) and crop.dtype == torch.uint8
        assert torch.equal(crop, jpeg.crop_resize(image))


def test_the_tensor_path_stays_within_one_of_255_of_the_reference() -> None:
    data = photo_jpeg(1920, 1080)
    reference = resize_image(Image.open(io.BytesIO(data)))
    (crop,) = jpeg.crop_resize_all([_tensor(data)])
    assert float(np.abs(crop.numpy().astype(np.int16) - reference.astype(np.int16)).mean()) <= 1.0


def test_large_groups_are_cropped_in_bounded_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    images = [_tensor(photo_jpeg(451, 300)).roll(k, dims=-1) for k in range(5)]
    monkeypatch.setattr(jpeg, "STACK_ELEMENTS", 2 * images[0].numel())  # two images per call
    calls = []
    real = jpeg.crop_resize
    monkeypatch.setattr(jpeg, "crop_resize", lambda x, size=224: calls.append(x.shape[0]) or real(x, size))
    together = jpeg.crop_resize_all(images)
    assert calls == [2, 2, 1]
    for image, crop in zip(images, together, strict=True):
        assert torch.equal(crop, real(image))
