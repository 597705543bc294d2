"""POST /v1/fill-mask: byte-level masked language modelling. Each [MASK] stands for one UTF-8 byte."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import tokenizer

from ..errors import InvalidInput
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
    warmup_ids,
)

BYTE_IDS = slice(tokenizer.BYTE_OFFSET, tokenizer.VOCAB_SIZE)


class FillMaskRequest(TaskRequest):
    text: str = Field(
        min_length=1,
        description="Text with one [MASK] per masked byte.",
        examples=[
            "This is an incomplete sentence where some words are[MASK][MASK][MASK][MASK][MASK][MASK][MASK][MASK][MASK]"
        ],
    )
    top_k: int = Field(5, ge=1, le=256, description="Candidates per masked byte.")


class Candidate(BaseModel):
    byte: int = Field(ge=0, le=255, description="The byte value.")
    char: str | None = Field(description="The byte as a character when it is one on its own (ASCII), else null.")
    score: float = Field(ge=0, le=1, description="Probability among the 256 byte values.")


class MaskPrediction(BaseModel):
    byte_offset: int = Field(description="Offset of this [MASK] in the UTF-8 bytes of the filled text.")
    candidates: list[Candidate]


class FillMaskResponse(BaseModel):
    model: str
    weights: str
    text: str = Field(description="The input with every [MASK] replaced by its best byte (UTF-8, errors replaced).")
    masks: list[MaskPrediction]


@dataclass(frozen=True)
class MaskedText:
    ids: list[int]  # byte ids with [CLS]/[SEP]
    masked: list[int]  # indices of the [MASK] ids among them
    top_k: int


class FillMask(Task[FillMaskRequest, MaskedText, dict[str, Any]]):
    name = "fill-mask"
    path = "/v1/fill-mask"
    summary = "Fill [MASK] bytes"
    tag = "text"
    architectures = ("PerceiverForMaskedLM",)
    demo_configs: ClassVar[dict[str, PerceiverConfig]] = {
        "default": PerceiverConfig(architecture="PerceiverForMaskedLM", **DEMO_TEXT)
    }
    labelled = False
    request_model = FillMaskRequest
    response_model = FillMaskResponse
    decode_offloaded = False  # a UTF-8 encode: cheaper than a hop to the decode pool

    def decode(self, request: FillMaskRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> MaskedText:
        ids = encode_text(request.text, text_limit(ctx))
        masked = [i for i, t in enumerate(ids) if t == tokenizer.MASK]
        if not masked:
            raise InvalidInput("the text has no [MASK]; mark each byte to predict with [MASK]")
        return MaskedText(ids, masked, request.top_k)

    def bucket(self, payload: MaskedText) -> int:
        return text_bucket(len(payload.ids))

    def cost(self, payload: MaskedText) -> int:
        return text_bucket(len(payload.ids))

    def predict(self, model: PerceiverHead, payloads: Sequence[MaskedText]) -> list[dict[str, Any]]:
        length = text_bucket(max(len(p.ids) for p in payloads))
        ids, mask = pad_ids([p.ids for p in payloads], length)
        positions = sorted({i for p in payloads for i in p.masked})  # decode only masked positions
        column = {pos: j for j, pos in enumerate(positions)}
        logits = model(
            inputs=to_device(ids, model),
            attention_mask=to_device(mask, model),
            positions=to_device(torch.tensor(positions), model),
        ).logits
        probs = logits[..., BYTE_IDS].float().softmax(-1).cpu()  # [B, P, 256]
        out = []
        for row, payload in zip(probs, payloads, strict=True):
            filled = list(payload.ids)
            masks = []
            for pos in payload.masked:
                scores, best = row[column[pos]].topk(payload.top_k)
                filled[pos] = int(best[0]) + tokenizer.BYTE_OFFSET
                candidates = [
                    {"byte": int(b), "char": chr(int(b)) if b < 128 else None, "score": round(float(s), 6)}
                    for s, b in zip(scores, best, strict=True)
                ]
                # Offset in the filled text's bytes: each id before this one is one byte, bar [CLS].
                masks.append({"byte_offset": pos - 1, "candidates": candidates})
            out.append({"text": tokenizer.decode(filled, skip_special_tokens=True), "masks": masks})
        return out

    def encode(self, result: dict[str, Any], request: FillMaskRequest) -> dict[str, Any]:
        return result

    def warmup_payloads(self, config: PerceiverConfig) -> list[MaskedText]:
        return [MaskedText(ids, [len(ids) - 2], 1) for ids in warmup_ids(config)]


TASK = FillMask()
