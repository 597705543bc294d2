"""The Perceiver byte tokenizer: id = UTF-8 byte + 6, six special tokens, 2048 ids at most.

Same ids as transformers' ``PerceiverTokenizer``: a single text becomes ``[CLS] bytes [SEP]``, a pair
``[CLS] a [SEP] b [SEP]``. ``len(vocab)`` is 262 (transformers' ``vocab_size`` property says 256).
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

PAD, BOS, EOS, MASK, CLS, SEP = range(6)
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
BYTE_OFFSET = len(SPECIAL_TOKENS)
VOCAB_SIZE = 256 + BYTE_OFFSET
MODEL_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Encoding:
    """ids [B, L] padded with [PAD] on the right, and the 1/0 attention mask."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]


_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _bytes_to_ids(text: str) -> list[int]:
    """Special-token strings in the text (e.g. ``[MASK]``) become their ids, as in transformers."""
    ids: list[int] = []
    for i, part in enumerate(_SPECIAL_PATTERN.split(text)):
        if i % 2:
            ids.append(SPECIAL_TOKENS.index(part))
        else:
            ids.extend(b + BYTE_OFFSET for b in part.encode("utf-8"))
    return ids


def encode(text: str, pair: str | None = None, max_length: int = MODEL_MAX_LENGTH, truncate: bool = True) -> list[int]:
    """ids with specials; the longest part is trimmed first when ``truncate`` (transformers' default strategy)."""
    first = _bytes_to_ids(text)
    second = _bytes_to_ids(pair) if pair is not None else None
    specials = 2 if second is None else 3
    excess = len(first) + (len(second) if second else 0) + specials - max_length
    if excess > 0:
        if not truncate:
            raise ValueError(f"text is {excess} ids longer than the {max_length}-id limit")
        for _ in range(excess):  # "longest_first": trim one id at a time from the longer part
            if second is not None and len(second) > len(first):
                second.pop()
            else:
                first.pop()
    ids = [CLS, *first, SEP]
    return ids if second is None else [*ids, *second, SEP]


def encode_batch(texts: Sequence[str], max_length: int = MODEL_MAX_LENGTH) -> Encoding:
    rows = [encode(t, max_length=max_length) for t in texts]
    width = max(len(r) for r in rows)
    return Encoding(
        [r + [PAD] * (width - len(r)) for r in rows],
        [[1] * len(r) + [0] * (width - len(r)) for r in rows],
    )


def decode(ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Bytes back to text (invalid UTF-8 replaced); specials print literally unless skipped."""
    out: list[str] = []
    buffer = bytearray()
    for i in ids:
        if i >= BYTE_OFFSET:
            buffer.append(i - BYTE_OFFSET)
            continue
        if buffer:
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer.clear()
        if not skip_special_tokens:
            out.append(SPECIAL_TOKENS[i])
    if buffer:
        out.append(buffer.decode("utf-8", errors="replace"))
    return "".join(out)


def window_starts(length: int, size: int) -> list[int]:
    """Starts of the windows of ``size`` ids that cover ``length`` ids: evenly spaced, at most size // 2
    apart (so each overlaps the next by at least half), the first at 0 and the last flush with the end."""
    if size < 2:
        raise ValueError(f"window size must be at least 2, got {size}")
    if length <= size:
        return [0]
    count = math.ceil((length - size) / (size // 2)) + 1
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def central_window(position: int, starts: Sequence[int], size: int) -> int:
    """Index of the window (``starts`` ascending) in which ``position`` sits most centrally: the one whose
    nearer edge is farthest from it (the first of equals)."""
    best, margin = -1, -1
    for i in range(bisect.bisect_right(starts, position - size), bisect.bisect_right(starts, position)):
        edge = min(position - starts[i], starts[i] + size - 1 - position)
        if edge > margin:
            best, margin = i, edge
    if best < 0:
        raise ValueError(f"position {position} lies in no window")
    return best
