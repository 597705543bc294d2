"""POST /v1/classify: image classification with the learned, Fourier or conv-preprocessing heads."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import jpeg
from perceiver_core.processing.image import normalize_pixels, resize_image

from ..batching import EVERY, Batch
from ..errors import InvalidInput, ServiceError
from ..media import decode_image, device_decodable, open_image
from .base import DEMO_LATENTS, DecodeContext, Task, TaskRequest, Upload, to_device, top_predictions

DEMO_LABELS = {
    i: name
    for i, name in enumerate(
        [
            "tabby cat",
            "golden retriever",
            "espresso",
            "coffee mug",
            "sports car",
            "mountain bike",
            "daisy",
            "laptop",
            "pizza",
            "lighthouse",
        ]
    )
}
_DEMO: dict[str, Any] = dict(DEMO_LATENTS, num_labels=10, id2label=DEMO_LABELS)
CROP = 224  # every published vision head takes 224x224 crops
CROP_RATIO = 224 / 256  # the reference crops this share of the short side, then resizes to CROP
# Scaled decoding keeps the crop at least twice CROP wide, so the bicubic resize still anti-aliases:
# short side >= 2 * 224 / (224/256) = 512.
SCALED_MIN_SHORT_SIDE = round(2 * CROP / CROP_RATIO)


class ClassifyRequest(TaskRequest):
    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return.")
    model: str | None = Field(None, description="Variant: learned, fourier or conv (default: the first configured).")


class Prediction(BaseModel):
    label: str = Field(examples=["tabby, tabby cat"])
    index: int = Field(examples=[281])
    score: float = Field(ge=0, le=1, examples=[0.83])


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["classify/learned"])
    weights: str = Field(description="pretrained, or random-init in the demo profile", examples=["pretrained"])
    predictions: list[Prediction]


DEVICE_JPEG = jpeg.available()  # a working torchvision: JPEGs can be decoded next to the model, in batches


@dataclass(frozen=True)
class ImagePayload:
    pixels: np.ndarray | None  # uint8 [224, 224, 3], cropped and resized; normalisation happens on the device
    top_k: int
    jpeg: bytes | None = None  # instead of pixels: a JPEG for the device's decoder (nvJPEG), in the batch
    max_pixels: int = 0  # for the CPU fallback of ``jpeg``
    crop: torch.Tensor | None = None  # prepared: the uint8 [224, 224, 3] crop, on the model's device


Result = list[dict[str, Any]] | ServiceError  # a JPEG that no decoder could read fails only its own request


def decode_on_cpu(data: bytes, max_pixels: int, scaled: bool) -> np.ndarray:
    image = decode_image(data, max_pixels, SCALED_MIN_SHORT_SIDE if scaled else None)
    return resize_image(image, CROP)


def _large(image: Image.Image, ctx: DecodeContext) -> bool:
    """At or over cpu_jpeg_min_pixels, when that is set: decoded at reduced scale on the CPU, in the decode
    threads, rather than by nvJPEG (see ``CpuSlots`` for the share)."""
    return 0 < ctx.limits.cpu_jpeg_min_pixels <= image.width * image.height


class CpuSlots:
    """The large JPEGs this process is decoding on the CPU now. With ``cpu_jpeg_slots`` (benchmarks/knobs.py), one
    that finds them all taken goes to nvJPEG instead: the host's cores and the GPU's decoder share the photos."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = 0

    @contextlib.contextmanager
    def hold(self, limit: int) -> Iterator[bool]:
        """Yields whether a slot was free (always, with no limit); gives it back on leaving."""
        with self._lock:
            taken = not limit or self.busy < limit
            self.busy += taken
        try:
            yield taken
        finally:
            if taken:
                with self._lock:
                    self.busy -= 1


CPU_SLOTS = CpuSlots()


class Classify(Task[ClassifyRequest, ImagePayload, Result]):
    name = "classify"
    path = "/v1/classify"
    summary = "Classify an image"
    tag = "vision"
    architectures = (
        "PerceiverForImageClassificationLearned",
        "PerceiverForImageClassificationFourier",
        "PerceiverForImageClassificationConvProcessing",
    )
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        "learned": PerceiverConfig(architecture="PerceiverForImageClassificationLearned", image_size=CROP, **_DEMO),
        "fourier": PerceiverConfig(architecture="PerceiverForImageClassificationFourier", **_DEMO),
        "conv": PerceiverConfig(architecture="PerceiverForImageClassificationConvProcessing", **_DEMO),
    }
    request_model = ClassifyRequest
    response_model = ClassifyResponse
    uploads = (
        Upload(
            "image",
            "JPEG, PNG, WebP, GIF (first frame), BMP or TIFF. Repeat the field for several images.",
            repeatable=True,
            raw_types=("image/", "application/octet-stream"),
        ),
    )
    cuda_graphs = True
    prepares = True  # nvJPEG decodes a batch's JPEGs while the batch before it runs

    def decode(self, request: ClassifyRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> ImagePayload:
        """auto on CUDA: JPEGs that nvJPEG takes are only checked here and decoded in the batch, on the GPU;
        auto elsewhere: large JPEGs decoded at reduced scale; exact: the reference preprocessing."""
        data, limit, auto = files["image"], ctx.limits.max_image_pixels, ctx.limits.image_decoder == "auto"
        if auto and DEVICE_JPEG and ctx.device.startswith("cuda"):
            image = open_image(data, limit)
            if device_decodable(image):
                if _large(image, ctx):
                    with CPU_SLOTS.hold(ctx.limits.cpu_jpeg_slots) as on_cpu:
                        if on_cpu:
                            return ImagePayload(decode_on_cpu(data, limit, auto), request.top_k)
                return ImagePayload(None, request.top_k, data, limit)  # nvJPEG's, in the batch
        return ImagePayload(decode_on_cpu(data, limit, auto), request.top_k)

    def bucket(self, payload: ImagePayload) -> str:
        return "224"

    def cost(self, payload: ImagePayload) -> int:
        return CROP * CROP

    def prepare(self, model: PerceiverHead, payloads: Sequence[ImagePayload]) -> list[ImagePayload]:
        """Each payload's crop on the device: the batch's JPEGs decoded by nvJPEG, CPU-decoded pixels copied."""
        crops = crops_on_device(payloads, model)
        return [
            replace(p, pixels=None, jpeg=None, crop=c)  # neither pixels nor crop: no decoder read it
            for p, c in zip(payloads, crops, strict=True)
        ]

    def predict(self, model: PerceiverHead, payloads: Sequence[ImagePayload], batch: Batch = EVERY) -> list[Result]:
        crops = crops_on_device(payloads, model)  # uint8 [B, 224, 224, 3], None where no decoder could read it
        ok = [i for i, c in enumerate(crops) if c is not None]
        results: list[Result] = [InvalidInput("the image is corrupt or truncated") if c is None else [] for c in crops]
        if ok:
            stacked = torch.stack([c for c in crops if c is not None])
            pixels = normalize_pixels(stacked).to(model.dtype)
            probs = model(inputs=pixels).logits.float().softmax(-1).cpu()
            for row, i in zip(probs, ok, strict=True):
                results[i] = top_predictions(row, payloads[i].top_k, model.config)
        return results

    def encode(self, result: Result, request: ClassifyRequest) -> dict[str, Any]:
        if isinstance(result, ServiceError):
            raise result
        return {"predictions": result}

    def warmup_payloads(self, config: PerceiverConfig) -> list[ImagePayload]:
        return [ImagePayload(np.zeros((CROP, CROP, 3), dtype=np.uint8), 1)]


def crops_on_device(payloads: Sequence[ImagePayload], model: PerceiverHead) -> list[torch.Tensor | None]:
    """Every payload's 224x224 crop on the model's device: CPU-decoded pixels are copied over, JPEGs are
    decoded there in one batched call. A JPEG the device decoder refuses is decoded on the CPU (the exact
    path); one that no decoder reads is None. Payloads ``Classify.prepare`` made keep their crop."""
    crops: list[torch.Tensor | None] = [_ready(p, model) for p in payloads]
    jpegs = [(i, p.jpeg) for i, p in enumerate(payloads) if p.jpeg is not None]
    if not jpegs:
        return crops
    decoded: list[torch.Tensor | None]
    try:
        decoded = list(jpeg.decode_jpegs([data for _, data in jpegs], model.device))
    except Exception:  # one bad file fails the batched call: decode one by one
        decoded = [_decode_one(data, model.device) for _, data in jpegs]
    read = [(i, image) for (i, _), image in zip(jpegs, decoded, strict=True) if image is not None]
    for (i, _), crop in zip(read, jpeg.crop_resize_all([image for _, image in read], CROP), strict=True):
        crops[i] = crop  # same-sized photos are cropped and resized together
    for (i, data), image in zip(jpegs, decoded, strict=True):
        if image is not None:
            continue
        try:
            crops[i] = to_device(torch.from_numpy(decode_on_cpu(data, payloads[i].max_pixels, False)), model)
        except ServiceError:
            crops[i] = None
    return crops


def _ready(payload: ImagePayload, model: PerceiverHead) -> torch.Tensor | None:
    """The crop of a payload with pixels or a prepared crop; None for a JPEG (and for an unreadable upload)."""
    if payload.crop is not None:
        if payload.crop.is_cuda:  # made on the prepare stream: its memory must outlive this stream's use of it
            payload.crop.record_stream(torch.cuda.current_stream(payload.crop.device))
        return payload.crop
    if payload.pixels is None:
        return None
    return to_device(torch.from_numpy(payload.pixels), model)


def _decode_one(data: bytes, device: torch.device) -> torch.Tensor | None:
    try:
        return jpeg.decode_jpegs([data], device)[0]
    except Exception:  # whatever the decoder says, the CPU path gets its turn
        return None


TASK = Classify()
