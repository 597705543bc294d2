"""POST /v1/classify-text: text classification on raw UTF-8 bytes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead

from ..runtime import Runtime, ServedModel
from .base import (
    DEMO_TEXT,
    Task,
    WarmupItem,
    encode_text,
    pad_ids,
    select_model,
    submit,
    text_bucket,
    text_warmup_items,
    to_device,
    top_k,
)
from .classify import ClassifyResponse


class ClassifyTextRequest(BaseModel):
    text: str = Field(min_length=1, description="UTF-8 text.", examples=["What a wonderful day!"])
    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return.")


def predict(model: PerceiverHead, payloads: Sequence[tuple[list[int], int]]) -> list[list[dict[str, Any]]]:
    length = text_bucket(max(len(ids) for ids, _ in payloads))
    ids, mask = pad_ids([p[0] for p in payloads], length)
    logits = model(inputs=to_device(ids, model), attention_mask=to_device(mask, model)).logits
    probs = logits.float().softmax(-1).cpu()
    return [top_k(row, k, model.config) for row, (_, k) in zip(probs, payloads, strict=True)]


def warmup_items(served: ServedModel) -> list[WarmupItem]:
    return text_warmup_items(served, lambda ids: (ids, 1))


def register(router: APIRouter, runtime_of: Callable[[Request], Runtime]) -> None:
    @router.post("/v1/classify-text", response_model=ClassifyResponse, tags=["text"], summary="Classify a text")
    async def classify_text(request: Request, body: ClassifyTextRequest) -> dict[str, Any]:
        runtime = runtime_of(request)
        served = select_model(request, runtime, "classify-text")
        limit = min(runtime.settings.max_text_chars, served.model.config.max_position_embeddings - 2)
        ids = encode_text(body.text, limit)
        bucket = text_bucket(len(ids))
        predictions = await submit(request, runtime, served, (ids, body.top_k), cost=bucket, bucket=bucket)
        return {"model": served.name, "weights": served.weights, "predictions": predictions}


TASK = Task(
    name="classify-text",
    path="/v1/classify-text",
    architectures=("PerceiverForSequenceClassification",),
    demo_configs={
        "default": PerceiverConfig(
            architecture="PerceiverForSequenceClassification",
            **DEMO_TEXT,
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
        )
    },
    predict=predict,
    warmup_items=warmup_items,
    register=register,
    default_batch_cost=lambda size: size * 2048,
)
