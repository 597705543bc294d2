"""POST /v1/classify: image classification with the learned, Fourier or conv-preprocessing heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.image import normalize_pixels, resize_image

from ..media import decode_image
from ..runtime import Runtime, ServedModel
from .base import DEMO_LATENTS, Task, WarmupItem, select_model, submit, to_device, top_k

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


class Prediction(BaseModel):
    label: str = Field(examples=["tabby, tabby cat"])
    index: int = Field(examples=[281])
    score: float = Field(ge=0, le=1, examples=[0.83])


class ClassifyResponse(BaseModel):
    model: str = Field(examples=["classify/learned"])
    weights: str = Field(description="pretrained, or random-init in the demo profile", examples=["pretrained"])
    predictions: list[Prediction]


def decode(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload → uint8 [224, 224, 3] (cropped and resized); normalisation happens on the device."""
    return resize_image(decode_image(data, max_pixels))


def predict(model: PerceiverHead, payloads: Sequence[tuple[np.ndarray, int]]) -> list[list[dict[str, Any]]]:
    crops = torch.from_numpy(np.stack([p for p, _ in payloads]))  # uint8 [B, 224, 224, 3]
    pixels = normalize_pixels(to_device(crops, model)).to(model.dtype)
    probs = model(inputs=pixels).logits.float().softmax(-1).cpu()
    return [top_k(row, k, model.config) for row, (_, k) in zip(probs, payloads, strict=True)]


def warmup_items(served: ServedModel) -> list[WarmupItem]:
    return [WarmupItem((np.zeros((224, 224, 3), dtype=np.uint8), 1), "224")]


def register(router: APIRouter, runtime_of: Callable[[Request], Runtime]) -> None:
    @router.post("/v1/classify", response_model=ClassifyResponse, tags=["vision"], summary="Classify an image")
    async def classify(
        request: Request,
        image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF (first frame), BMP or TIFF")],
        top_k: Annotated[int, Form(ge=1, le=1000, description="How many classes to return")] = 5,
        model: Annotated[str | None, Form(description="Variant: learned, fourier or conv")] = None,
    ) -> dict[str, Any]:
        runtime = runtime_of(request)
        served = select_model(request, runtime, "classify", model)
        pixels = await runtime.decode(decode, await image.read(), runtime.settings.max_image_pixels)
        predictions = await submit(request, runtime, served, (pixels, top_k), cost=224 * 224, bucket="224")
        return {"model": served.name, "weights": served.weights, "predictions": predictions}


TASK = Task(
    name="classify",
    path="/v1/classify",
    architectures=(
        "PerceiverForImageClassificationLearned",
        "PerceiverForImageClassificationFourier",
        "PerceiverForImageClassificationConvProcessing",
    ),
    demo_configs={
        "learned": PerceiverConfig(architecture="PerceiverForImageClassificationLearned", image_size=224, **_DEMO),
        "fourier": PerceiverConfig(architecture="PerceiverForImageClassificationFourier", **_DEMO),
        "conv": PerceiverConfig(architecture="PerceiverForImageClassificationConvProcessing", **_DEMO),
    },
    predict=predict,
    warmup_items=warmup_items,
    register=register,
)
