"""POST /v1/classify-text: text classification on raw UTF-8 bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from perceiver_core import PerceiverConfig, PerceiverHead

from .base import (
    DEMO_TEXT,
    DecodeContext,
    Task,
    TaskRequest,
    encode_text,
    pad_ids,
    text_bucket,
    text_limit,
    to_device,
    top_predictions,
    warmup_ids,
)
from .classify import ClassifyResponse


class ClassifyTextRequest(TaskRequest):
    text: str = Field(min_length=1, description="UTF-8 text.", examples=["What a wonderful day!"])
    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return.")


@dataclass(frozen=True)
class TextPayload:
    ids: list[int]  # byte ids with [CLS]/[SEP]
    top_k: int


class ClassifyText(Task[ClassifyTextRequest, TextPayload, list[dict[str, Any]]]):
    name = "classify-text"
    path = "/v1/classify-text"
    summary = "Classify a text"
    tag = "text"
    architectures = ("PerceiverForSequenceClassification",)
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        "default": PerceiverConfig(
            architecture="PerceiverForSequenceClassification",
            **DEMO_TEXT,
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
        )
    }
    request_model = ClassifyTextRequest
    response_model = ClassifyResponse
    decode_offloaded = False  # a UTF-8 encode: cheaper than a hop to the decode pool

    def decode(self, request: ClassifyTextRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> TextPayload:
        return TextPayload(encode_text(request.text, text_limit(ctx)), request.top_k)

    def bucket(self, payload: TextPayload) -> int:
        return text_bucket(len(payload.ids))

    def cost(self, payload: TextPayload) -> int:
        return text_bucket(len(payload.ids))

    def predict(self, model: PerceiverHead, payloads: Sequence[TextPayload]) -> list[list[dict[str, Any]]]:
        length = text_bucket(max(len(p.ids) for p in payloads))
        ids, mask = pad_ids([p.ids for p in payloads], length)
        logits = model(inputs=to_device(ids, model), attention_mask=to_device(mask, model)).logits
        probs = logits.float().softmax(-1).cpu()
        return [top_predictions(row, p.top_k, model.config) for row, p in zip(probs, payloads, strict=True)]

    def encode(self, result: list[dict[str, Any]], request: ClassifyTextRequest) -> dict[str, Any]:
        return {"predictions": result}

    def warmup_payloads(self, config: PerceiverConfig) -> list[TextPayload]:
        return [TextPayload(ids, 1) for ids in warmup_ids(config)]


TASK = ClassifyText()
