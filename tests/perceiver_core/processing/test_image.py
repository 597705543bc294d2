"""Our image processor against transformers' PIL backend on real photos in many modes and sizes."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import PerceiverImageProcessorPil

from perceiver_core.processing.image import preprocess_image

MEDIA = Path(__file__).parents[2] / "media"


def _reencode(image: Image.Image, fmt: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _rgba(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None]  # a real alpha gradient
    return _reencode(Image.fromarray(rgba, "RGBA"), "PNG")


VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg": lambda im: im,
    "png": lambda im: _reencode(im, "PNG"),
    "grayscale-jpeg": lambda im: _reencode(im.convert("L"), "JPEG"),
    "grayscale-png": lambda im: _reencode(im.convert("L"), "PNG"),
    "rgba-png": _rgba,
    "palette-png": lambda im: _reencode(im.convert("P"), "PNG"),
    "cmyk-jpeg": lambda im: _reencode(im.convert("CMYK"), "JPEG"),
    "small": lambda im: im.resize((97, 61)),
    "tiny": lambda im: im.resize((17, 40)),
    "large": lambda im: im.resize((1203, 801)),
    "portrait": lambda im: im.transpose(Image.Transpose.ROTATE_90),
}


@pytest.fixture(scope="module")
def hf() -> PerceiverImageProcessorPil:
    return PerceiverImageProcessorPil()


@pytest.mark.parametrize("photo", ["cat.jpg", "coffee.jpg"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pixels_match_transformers(hf: PerceiverImageProcessorPil, photo: str, variant: str) -> None:
    image = VARIANTS[variant](Image.open(MEDIA / photo))
    expected = hf(image, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    ours = preprocess_image(image)
    assert ours.shape == expected.shape == (3, 224, 224)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected).max() <= 1e-6


@pytest.mark.parametrize("photo", ["cat.jpg", "coffee.jpg"])
def test_uint8_resize_then_tensor_normalisation_is_bit_identical(photo: str) -> None:
    """The server ships uint8 crops and normalises on the device; that must not change a single pixel."""
    import torch

    from perceiver_core.processing.image import normalize_pixels, resize_image

    image = Image.open(MEDIA / photo)
    reference = preprocess_image(image)
    shipped = normalize_pixels(torch.from_numpy(resize_image(image))[None])[0]
    assert np.array_equal(shipped.numpy(), reference)
