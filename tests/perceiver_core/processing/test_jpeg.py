"""Batched JPEG decoding and the tensor crop-and-resize against the reference preprocessing (PIL).

On the CPU, torchvision decodes with libjpeg-turbo; on CUDA (tests/perceiver_core/test_cuda.py and
gpu.sh) with nvJPEG. The tolerance for the device path is a mean difference of at most 1 of 255.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.photos import photo_jpeg
from perceiver_core.processing import jpeg
from perceiver_core.processing.image import resize_image
from tests.helpers import mean_abs_diff

pytestmark = pytest.mark.skipif(not jpeg.available(), reason="torchvision is not installed")

SIZES = [(451, 300), (640, 427), (1920, 1080), (4032, 3024), (3024, 4032)]


def reference(data: bytes) -> np.ndarray:
    return resize_image(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tensor_path_matches_the_reference_within_one_of_255(size: tuple[int, int]) -> None:
    data = photo_jpeg(*size)
    (image,) = jpeg.decode_jpegs([data], "cpu")
    assert image.shape == (3, size[1], size[0]) and image.dtype == torch.uint8
    crop = jpeg.crop_resize(image).numpy()
    assert crop.shape == (224, 224, 3)
    assert mean_abs_diff(crop, reference(data)) <= 1.0


def test_a_batched_call_decodes_each_image_as_alone() -> None:
    data = [photo_jpeg(451, 300), photo_jpeg(1920, 1080), photo_jpeg(451, 300)]
    together = jpeg.decode_jpegs(data, "cpu")
    for one, image in zip(data, together, strict=True):
        assert torch.equal(jpeg.decode_jpegs([one], "cpu")[0], image)


def test_grayscale_jpegs_come_out_rgb() -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(451, 300))).convert("L").save(buffer, format="JPEG", quality=92)
    (image,) = jpeg.decode_jpegs([buffer.getvalue()], "cpu")
    assert image.shape[0] == 3 and torch.equal(image[0], image[1])
