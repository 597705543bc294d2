"""POST /v1/classify: image classification with the learned, Fourier or conv-preprocessing heads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.image import normalize_pixels, resize_image

from ..media import decode_image
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


@dataclass(frozen=True)
class ImagePayload:
    pixels: np.ndarray  # uint8 [224, 224, 3], cropped and resized; normalisation happens on the device
    top_k: int


class Classify(Task[ClassifyRequest, ImagePayload, list[dict[str, Any]]]):
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

    def variant(self, request: ClassifyRequest) -> str | None:
        return request.model

    def decode(self, request: ClassifyRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> ImagePayload:
        scaled = SCALED_MIN_SHORT_SIDE if ctx.limits.image_decoder == "auto" else None
        image = decode_image(files["image"], ctx.limits.max_image_pixels, scaled)
        return ImagePayload(resize_image(image, CROP), request.top_k)

    def bucket(self, payload: ImagePayload) -> str:
        return "224"

    def cost(self, payload: ImagePayload) -> int:
        return CROP * CROP

    def predict(self, model: PerceiverHead, payloads: Sequence[ImagePayload]) -> list[list[dict[str, Any]]]:
        crops = torch.from_numpy(np.stack([p.pixels for p in payloads]))  # uint8 [B, 224, 224, 3]
        pixels = normalize_pixels(to_device(crops, model)).to(model.dtype)
        probs = model(inputs=pixels).logits.float().softmax(-1).cpu()
        return [top_predictions(row, p.top_k, model.config) for row, p in zip(probs, payloads, strict=True)]

    def encode(self, result: list[dict[str, Any]], request: ClassifyRequest) -> dict[str, Any]:
        return {"predictions": result}

    def warmup_payloads(self, config: PerceiverConfig) -> list[ImagePayload]:
        return [ImagePayload(np.zeros((CROP, CROP, 3), dtype=np.uint8), 1)]


TASK = Classify()
