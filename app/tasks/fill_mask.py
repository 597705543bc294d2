"""POST /v1/fill-mask: byte-level masked language modelling. Each [MASK] stands for one UTF-8 byte."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import tokenizer

from ..errors import InvalidInput
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
)

BYTE_IDS = slice(tokenizer.BYTE_OFFSET, tokenizer.VOCAB_SIZE)


class FillMaskRequest(BaseModel):
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


def encode(text: str, max_chars: int) -> tuple[list[int], list[int]]:
    """ids (with [CLS]/[SEP]) and the indices of the [MASK] ids among them."""
    ids = encode_text(text, max_chars)
    masked = [i for i, t in enumerate(ids) if t == tokenizer.MASK]
    if not masked:
        raise InvalidInput("the text has no [MASK]; mark each byte to predict with [MASK]")
    return ids, masked


def predict(model: PerceiverHead, payloads: Sequence[tuple[list[int], list[int], int]]) -> list[dict[str, Any]]:
    length = text_bucket(max(len(ids) for ids, _, _ in payloads))
    ids, mask = pad_ids([p[0] for p in payloads], length)
    positions = sorted({i for _, masked, _ in payloads for i in masked})  # decode only masked positions
    column = {pos: j for j, pos in enumerate(positions)}
    logits = model(
        inputs=to_device(ids, model),
        attention_mask=to_device(mask, model),
        positions=to_device(torch.tensor(positions), model),
    ).logits
    probs = logits[..., BYTE_IDS].float().softmax(-1).cpu()  # [B, P, 256]
    out = []
    for row, (row_ids, masked, k) in zip(probs, payloads, strict=True):
        filled = list(row_ids)
        masks = []
        for pos in masked:
            scores, best = row[column[pos]].topk(k)
            filled[pos] = int(best[0]) + tokenizer.BYTE_OFFSET
            candidates = [
                {"byte": int(b), "char": chr(int(b)) if b < 128 else None, "score": round(float(s), 6)}
                for s, b in zip(scores, best, strict=True)
            ]
            # Offset in the filled text's bytes: each id before this one is one byte, bar [CLS].
            masks.append({"byte_offset": pos - 1, "candidates": candidates})
        out.append({"text": tokenizer.decode(filled, skip_special_tokens=True), "masks": masks})
    return out


def warmup_items(served: ServedModel) -> list[WarmupItem]:
    return text_warmup_items(served, lambda ids: (ids, [len(ids) - 2], 1))


def register(router: APIRouter, runtime_of: Callable[[Request], Runtime]) -> None:
    @router.post("/v1/fill-mask", response_model=FillMaskResponse, tags=["text"], summary="Fill [MASK] bytes")
    async def fill_mask(request: Request, body: FillMaskRequest) -> dict[str, Any]:
        runtime = runtime_of(request)
        served = select_model(request, runtime, "fill-mask")
        limit = min(runtime.settings.max_text_chars, served.model.config.max_position_embeddings - 2)
        ids, masked = encode(body.text, limit)
        bucket = text_bucket(len(ids))
        result = await submit(request, runtime, served, (ids, masked, body.top_k), cost=bucket, bucket=bucket)
        return {"model": served.name, "weights": served.weights, **result}


TASK = Task(
    name="fill-mask",
    path="/v1/fill-mask",
    architectures=("PerceiverForMaskedLM",),
    demo_configs={
        "default": PerceiverConfig(
            architecture="PerceiverForMaskedLM",
            **DEMO_TEXT,
        )
    },
    predict=predict,
    warmup_items=warmup_items,
    register=register,
    default_batch_cost=lambda size: size * 2048,
)
