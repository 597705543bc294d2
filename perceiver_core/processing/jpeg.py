"""Batched JPEG decoding and the reference crop-and-resize on tensors, for decoding next to the model.

``torchvision.io.decode_jpeg`` decodes a list of JPEGs in one call: with ``device="cuda"`` on nvJPEG
(the GPU's JPEG engine), on the CPU with libjpeg-turbo. ``crop_resize`` then reproduces
``processing.image.center_crop_resize`` on a [3, H, W] uint8 tensor: the same integer crop, and
bicubic interpolation with antialiasing, which in torch uses PIL's kernel (a = -0.5) and support.
The result is not bit-identical to PIL (float vs fixed-point arithmetic, and the decoders' own
rounding), so the difference is measured in the tests, not assumed.

torchvision is optional: ``available()`` says whether a working build is installed (the CPU machines
this project is developed on have none, so these paths are tested in benchmarks/gpu.sh on a GPU host).
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor


@cache
def available() -> bool:
    """torchvision imports and has its image ops (a build for another torch fails to load its operators)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def decode_jpegs(data: list[bytes], device: torch.device | str) -> list[Tensor]:
    """JPEG bytes → RGB uint8 tensors [3, H, W] on ``device`` (one batched call)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def crop_resize(image: Tensor, size: int = 224, crop_ratio: float = 224 / 256) -> Tensor:
    """uint8 [3, H, W] → uint8 [size, size, 3]: the reference's centre crop, then bicubic (antialiased).
    Also takes a stack [N, 3, H, W] of same-sized images and gives [N, size, size, 3] in one call."""
    height, width = image.shape[-2:]
    side = int(crop_ratio * min(height, width))
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[..., top : top + side, left : left + side]
    batch = crop.unsqueeze(0) if crop.dim() == 3 else crop
    resized = F.interpolate(batch.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out[0] if crop.dim() == 3 else out


STACK_ELEMENTS = 1 << 30  # most uint8 elements stacked into one crop_resize call (4 GiB once made float)


def crop_resize_all(images: list[Tensor], size: int = 224) -> list[Tensor]:
    """``crop_resize`` of each image, with images of one size stacked into one call (a batch of phone
    photos is a handful of calls instead of one per image: fewer launches, and fewer GIL hand-offs).
    Each call stacks at most STACK_ELEMENTS, so a batch of 40 MP images does not need tens of GB at once."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out: dict[int, Tensor] = {}
    for indices in groups.values():
        per_call = max(1, STACK_ELEMENTS // images[indices[0]].numel())
        for start in range(0, len(indices), per_call):
            part = indices[start : start + per_call]
            out.update(zip(part, crop_resize(torch.stack([images[i] for i in part]), size), strict=True))
    return [out[i] for i in range(len(images))]
