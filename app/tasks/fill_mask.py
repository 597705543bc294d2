"""POST /v1/fill-mask: byte-level masked language modelling. Each [MASK] stands for one UTF-8 byte.

The model reads 2,046 bytes at once. A longer text is cut into evenly spaced windows of 2,046 bytes, each
overlapping the next by at least half; each mask is predicted from the window in which it sits most
centrally (the most context on both sides), and only the windows that some mask needs are run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, Field

from perceiver_core import PerceiverConfig, PerceiverHead
from perceiver_core.processing import tokenizer
from perceiver_core.processing.tokenizer import central_window, window_starts

from ..batching import EVERY, Batch
from ..errors import InvalidInput, PayloadTooLarge
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
    warmup_ids,
    with_specials,
)

BYTE_IDS = slice(tokenizer.BYTE_OFFSET, tokenizer.VOCAB_SIZE)
ROWS_PER_PASS = 8  # windows per forward pass when long texts fill a batch (short-text batches stay whole)
ANSWER_CHECK_EVERY = 256  # masks: how often building an answer asks whether its request has ended
# Candidates (masks x top_k) one request's answer may hold: about 3 MB of JSON, encoded in 60 ms on 2 cores.
# A 64 KB text of [MASK]s at top_k 256 was 2.8 million: a 114 MB answer, seconds of the event loop.
MAX_CANDIDATES = 65_536


def check_answer_size(masks: Sequence[int], top_k: int, *, padded: bool = False) -> None:
    """Refuse (413) a request whose answer would hold more than MAX_CANDIDATES candidates, from its texts'
    [MASK] counts, before anything is decoded. ``padded``: the answer is one [texts, most masks, top_k]
    tensor (the Open Inference Protocol's), so every text counts as many masks as the most in one."""
    total = (len(masks) * max(masks, default=0) if padded else sum(masks)) * top_k
    if total > MAX_CANDIDATES:
        counted = "texts x the most [MASK]s in one text" if padded else "[MASK]s"
        raise PayloadTooLarge(
            f"the answer would hold {total:,} candidates ({counted} x top_k {top_k}); the server's limit is "
            f"{MAX_CANDIDATES:,} a request: lower top_k, or send fewer [MASK]s in each request"
        )


class FillMaskRequest(TaskRequest):
    text: Texts = Field(
        description="Text with one [MASK] per masked byte, or a list of up to 64 such texts (answered as results, "
        "in order).",
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
    window: list[int] | None = Field(
        None,
        description="Only for text longer than the model's 2,046 bytes: [start, end) byte offsets (in the filled "
        "text) of the window this mask was predicted from, the one in which it sits most centrally.",
    )


class FillMaskResponse(BaseModel):
    model: str
    weights: str
    text: str = Field(description="The input with every [MASK] replaced by its best byte (UTF-8, errors replaced).")
    masks: list[MaskPrediction]


@dataclass(frozen=True)
class MaskedText:
    ids: list[int]  # the text's byte ids, without [CLS]/[SEP] (each [MASK] is one id)
    size: int  # bytes the model reads at once
    starts: list[int]  # offset in ids of each window run: [0] for a text that fits the model
    masked: list[list[int]]  # per window: the positions (in ids) of the [MASK]s it answers
    top_k: int

    @property
    def windowed(self) -> bool:
        return len(self.ids) > self.size

    def row(self, window: int) -> list[int]:
        start = self.starts[window]
        return with_specials(self.ids[start : start + self.size])


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
    json_results = True

    def expand(self, request: Any) -> Any:
        return expand_texts(request)

    def check(self, items: Sequence[tuple[FillMaskRequest, Mapping[str, bytes]]]) -> None:
        if items:
            check_answer_size([one_text(r.text).count("[MASK]") for r, _ in items], items[0][0].top_k)

    def decode(self, request: FillMaskRequest, files: Mapping[str, bytes], ctx: DecodeContext) -> MaskedText:
        ids, size = text_ids(one_text(request.text), ctx.limits.max_text_bytes), text_window(ctx)
        masks = [i for i, t in enumerate(ids) if t == tokenizer.MASK]
        if not masks:
            raise InvalidInput("the text has no [MASK]; mark each byte to predict with [MASK]")
        starts = window_starts(len(ids), size)
        chosen = [central_window(m, starts, size) for m in masks]
        windows = sorted(set(chosen))  # only the windows some mask needs
        masked = [[m for m, w in zip(masks, chosen, strict=True) if w == window] for window in windows]
        return MaskedText(ids, size, [starts[w] for w in windows], masked, request.top_k)

    def bucket(self, payload: MaskedText) -> int:
        return text_bucket(min(len(payload.ids), payload.size) + 2)

    def cost(self, payload: MaskedText) -> int:
        return len(payload.starts) * self.bucket(payload)  # ids the forward pass reads, padding included

    def units(self, payload: MaskedText) -> int:
        return len(payload.starts)

    def default_max_batch_cost(self, max_batch_size: int) -> int:
        # A full batch of the longest single-window texts: never binds before max_batch_size for those, and a
        # text of many windows is a batch of its own.
        return max_batch_size * TEXT_BUCKETS[-1]

    def predict(
        self, model: PerceiverHead, payloads: Sequence[MaskedText], batch: Batch = EVERY
    ) -> list[dict[str, Any]]:
        """Every window of every payload in passes of at most max(len(payloads), ROWS_PER_PASS) windows,
        decoding only masked positions; windows of requests that have ended are left out of later passes."""
        rows = [(i, w) for i, p in enumerate(payloads) for w in range(len(p.starts))]
        found: dict[tuple[int, int], tuple[torch.Tensor, list[int]]] = {}  # (payload, window) → probs, positions
        for indices in batch.passes([i for i, _ in rows], max(len(payloads), ROWS_PER_PASS)):
            chunk = [rows[j] for j in indices]
            ids = [payloads[i].row(w) for i, w in chunk]
            local = [[m - payloads[i].starts[w] + 1 for m in payloads[i].masked[w]] for i, w in chunk]  # +1: [CLS]
            positions = sorted({pos for row in local for pos in row})  # decode only masked positions
            column = {pos: j for j, pos in enumerate(positions)}
            padded, mask = pad_ids(ids, text_bucket(max(len(row) for row in ids)))
            logits = model(
                inputs=to_device(padded, model),
                attention_mask=to_device(mask, model),
                positions=to_device(torch.tensor(positions), model),
            ).logits
            probs = logits[..., BYTE_IDS].float().softmax(-1).cpu()  # [B, P, 256]
            for row, key, wanted_positions in zip(probs, chunk, local, strict=True):
                found[key] = (row[[column[pos] for pos in wanted_positions]], payloads[key[0]].masked[key[1]])
        return [self._answer(i, payload, found, batch) for i, payload in enumerate(payloads)]

    def _answer(
        self,
        index: int,
        payload: MaskedText,
        found: dict[tuple[int, int], tuple[torch.Tensor, list[int]]],
        batch: Batch,
    ) -> dict[str, Any]:
        """The filled text and each mask's candidates. Building them is work too (10,000 masks of 256 candidates
        are seconds of Python): it stops as soon as the request has ended, as the passes do."""
        filled = list(payload.ids)
        masks: list[dict[str, Any]] = []
        for window, start in enumerate(payload.starts):
            if (index, window) not in found or batch.ended(index):
                continue  # the request ended: its answer is not sent
            probs, positions = found[(index, window)]
            scores_all, best_all = probs.topk(payload.top_k, dim=-1)  # [masks, k] at once, not one mask at a time
            rows = zip(positions, scores_all.tolist(), best_all.tolist(), strict=True)
            for n, (pos, scores, best) in enumerate(rows):
                if n % ANSWER_CHECK_EVERY == ANSWER_CHECK_EVERY - 1 and batch.ended(index):
                    break
                filled[pos] = best[0] + tokenizer.BYTE_OFFSET
                mask: dict[str, Any] = {
                    # Offset in the filled text's bytes: each id is one byte once the masks are filled.
                    "byte_offset": pos,
                    "candidates": [
                        {"byte": b, "char": chr(b) if b < 128 else None, "score": round(s, 6)}
                        for s, b in zip(scores, best, strict=True)
                    ],
                }
                if payload.windowed:
                    mask["window"] = [start, min(start + payload.size, len(payload.ids))]
                masks.append(mask)
        masks.sort(key=lambda m: m["byte_offset"])
        return {"text": tokenizer.decode(filled, skip_special_tokens=True), "masks": masks}

    def encode(self, result: dict[str, Any], request: FillMaskRequest) -> dict[str, Any]:
        return result

    def warmup_payloads(self, config: PerceiverConfig) -> list[MaskedText]:
        size = config.max_position_embeddings - 2
        return [MaskedText(ids[1:-1], size, [0], [[len(ids) - 3]], 1) for ids in warmup_ids(config)]


TASK = FillMask()
