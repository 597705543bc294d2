"""The Perceiver image processor: centre crop (224/256 of the short side), bicubic resize to 224², normalise.

Bit-for-bit the same pixel values as transformers' ``PerceiverImageProcessorPil``: crop first (offset
``(H-c)//2``), resize with PIL on uint8, then float32 rescale and ImageNet normalisation. Transparent
images are composited on white, as transformers' ``convert_to_rgb`` does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def center_crop_resize(image: Image.Image, size: int = 224, crop_ratio: float = 224 / 256) -> Image.Image:
    """The reference's crop-then-resize, on an RGB PIL image."""
    width, height = image.size
    side = int(crop_ratio * min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)


def resize_image(image: Image.Image, size: int = 224) -> np.ndarray:
    """PIL image (any mode) → uint8 [size, size, 3]: every step of ``preprocess_image`` before float math.

    Servers ship this (4x fewer bytes than float32) and finish with ``normalize_pixels`` on the device.
    """
    return np.array(center_crop_resize(to_rgb(image), size), dtype=np.uint8)  # writable: torch can wrap it


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W]; the same float32 operations as ``preprocess_image``."""
    mean = torch.from_numpy(IMAGENET_MEAN).to(pixels.device)
    std = torch.from_numpy(IMAGENET_STD).to(pixels.device)
    return ((pixels.to(torch.float32) / 255.0 - mean) / std).permute(0, 3, 1, 2)


def preprocess_image(image: Image.Image, size: int = 224) -> np.ndarray:
    """PIL image (any mode) → float32 [3, size, size] normalised pixel values."""
    pixels = np.asarray(center_crop_resize(to_rgb(image), size), dtype=np.float32) / np.float32(255)
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
