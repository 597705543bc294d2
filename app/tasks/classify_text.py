"""POST /v1/classify-text: text classification on raw UTF-8 bytes.

The model reads 2,046 bytes at once. Longer text is refused (422) unless ``long_text`` says otherwise:
``truncate`` classifies its first 2,046 bytes (as transformers' tokenizer does with truncation on), and
``windows`` averages the class probabilities of overlapping windows that cover all of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing.tokenizer import window_starts

from ..batching import EVERY, Batch
from ..errors import InvalidInput
from .base import (
    DEMO_TEXT,
    TEXT_BUCKETS,
    DecodeContext,
    Task,
    TaskRequest,
    Texts,
    expand_texts,
    one_text,
    pad_ids,
    text_bucket,
    text_ids,
    text_window,
    to_device,
    top_predictions,
    warmup_ids,
    with_specials,
)
from .classify import ClassifyResponse

ROWS_PER_PASS = 8  # windows per forward pass when long texts fill a batch (short-text batches stay whole)


class ClassifyTextRequest(TaskRequest):
    text: Texts = Field(
        description="UTF-8 text, or a list of up to 64 texts (answered as results, in order).",
        examples=["What a wonderful day!"],
    )
    top_k: int = Field(5, ge=1, le=1000, description="How many classes to return.")
    long_text: Literal["reject", "truncate", "windows"] = Field(
        "reject",
        description="Text longer than the model's 2,046 bytes: reject (422), truncate (classify the first 2,046 "
        "bytes, as transformers does) or windows (average the predictions of overlapping windows over all of it).",
    )


@dataclass(frozen=True)
class TextPayload:
    rows: list[list[int]]  # byte ids with [CLS]/[SEP]: the text, or its windows
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
    json_results = True

    def expand(self, request: Any) -> Any:
        return expand_texts(request)

    def decode(self, request: ClassifyTextRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> TextPayload:
        ids, size = text_ids(one_text(request.text), ctx.limits.max_text_bytes), text_window(ctx)
        if len(ids) <= size:
            return TextPayload([with_specials(ids)], request.top_k)
        if request.long_text == "truncate":
            return TextPayload([with_specials(ids[:size])], request.top_k)
        if request.long_text == "windows":
            return TextPayload([with_specials(ids[s : s + size]) for s in window_starts(len(ids), size)], request.top_k)
        raise InvalidInput(
            f"text is {len(ids)} bytes and the model reads {size} at once; send long_text=truncate to classify "
            f"its first {size} bytes, or long_text=windows to average over windows that cover all of it"
        )

    def bucket(self, payload: TextPayload) -> int:
        return text_bucket(max(len(row) for row in payload.rows))

    def cost(self, payload: TextPayload) -> int:
        return len(payload.rows) * self.bucket(payload)  # ids the forward pass reads, padding included

    def units(self, payload: TextPayload) -> int:
        return len(payload.rows)

    def default_max_batch_cost(self, max_batch_size: int) -> int:
        # A full batch of the longest single-window texts: never binds before max_batch_size for those, and a
        # text of many windows is a batch of its own.
        return max_batch_size * TEXT_BUCKETS[-1]

    def predict(
        self, model: PerceiverHead, payloads: Sequence[TextPayload], batch: Batch = EVERY
    ) -> list[list[dict[str, Any]]]:
        """Every row of every payload in passes of at most max(len(payloads), ROWS_PER_PASS) rows; the rows of
        requests that have ended are left out of later passes. A text's answer averages its rows' probabilities."""
        rows = [(i, row) for i, p in enumerate(payloads) for row in p.rows]
        probs = torch.zeros(len(rows), model.config.num_labels)
        for chunk in batch.passes([i for i, _ in rows], max(len(payloads), ROWS_PER_PASS)):
            ids, mask = pad_ids([rows[j][1] for j in chunk], text_bucket(max(len(rows[j][1]) for j in chunk)))
            logits = model(inputs=to_device(ids, model), attention_mask=to_device(mask, model)).logits
            probs[chunk] = logits.float().softmax(-1).cpu()
        out, first = [], 0
        for payload in payloads:
            mean = probs[first : first + len(payload.rows)].mean(0)
            out.append(top_predictions(mean, payload.top_k, model.config))
            first += len(payload.rows)
        return out

    def encode(self, result: list[dict[str, Any]], request: ClassifyTextRequest) -> dict[str, Any]:
        return {"predictions": result}

    def warmup_payloads(self, config: PerceiverConfig) -> list[TextPayload]:
        return [TextPayload([ids], 1) for ids in warmup_ids(config)]


TASK = ClassifyText()
