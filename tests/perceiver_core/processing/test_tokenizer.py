from __future__ import annotations

import numpy as np
import pytest
from transformers import PerceiverTokenizer

from perceiver_core.processing import tokenizer

TEXTS = ["héllo", "", "The quick brown fox [MASK] jumps.", "日本語のテキスト 🚀", "a\x00b\ttab\nnewline", "x" * 3000]


@pytest.fixture(scope="module")
def hf() -> PerceiverTokenizer:
    return PerceiverTokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(hf: PerceiverTokenizer, text: str) -> None:
    expected = hf(text, truncation=True, max_length=2048)["input_ids"]
    assert tokenizer.encode(text) == expected


def test_known_example() -> None:
    assert tokenizer.encode("héllo") == [4, 110, 201, 175, 114, 114, 117, 5]


def test_pairs_and_truncation_match_transformers(hf: PerceiverTokenizer) -> None:
    for a, b in [("question?", "answer."), ("a" * 1500, "b" * 1000), ("c" * 10, "d" * 4000)]:
        expected = hf(a, b, truncation=True, max_length=2048)["input_ids"]
        assert tokenizer.encode(a, b) == expected
    assert len(tokenizer.encode("x" * 3000)) == 2048


def test_batch_padding_matches_transformers(hf: PerceiverTokenizer) -> None:
    texts = ["short", "a much longer text with ünïcödé"]
    expected = hf(texts, padding="longest")
    ours = tokenizer.encode_batch(texts)
    assert ours.input_ids == expected["input_ids"]
    assert ours.attention_mask == expected["attention_mask"]


def test_decode_matches_transformers(hf: PerceiverTokenizer) -> None:
    for text in TEXTS[:5]:
        ids = hf(text)["input_ids"]
        assert tokenizer.decode(ids) == hf.decode(ids)
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    broken = [4, 0xC3 + 6, 5]  # a lone UTF-8 lead byte
    assert tokenizer.decode(broken) == hf.decode(broken)


def test_vocab_is_262(hf: PerceiverTokenizer) -> None:
    assert tokenizer.VOCAB_SIZE == len(hf) == 262
    assert tokenizer.encode("x", truncate=True, max_length=3) == [4, 126, 5]
    with pytest.raises(ValueError, match="longer"):
        tokenizer.encode("xy", truncate=False, max_length=3)


def test_special_token_strings_in_text_match_transformers(hf: PerceiverTokenizer) -> None:
    for text in ["a[MASK]b", "[PAD][BOS][EOS][CLS][SEP]x", "[mask]", "[MASK][MASK]", "é[MASK]"]:
        assert tokenizer.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("length", [1, 2046, 2047, 3069, 3070, 10_000, 65_536])
def test_windows_cover_the_text_evenly_with_half_overlaps(length: int) -> None:
    size = 2046
    starts = tokenizer.window_starts(length, size)
    assert starts[0] == 0 and starts[-1] == max(0, length - size)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start : start + size] = True
    assert covered.all()
    if length > size:
        gaps = np.diff(starts)
        assert (gaps <= size // 2).all() and (gaps > 0).all()
        assert gaps.max() - gaps.min() <= 1  # evenly spaced, up to rounding
        assert len(starts) == -(-(length - size) // (size // 2)) + 1  # as few as half overlaps allow


def test_each_position_goes_to_the_window_where_it_is_most_central() -> None:
    starts = tokenizer.window_starts(10_000, 2046)
    for position in range(0, 10_000, 7):
        chosen = tokenizer.central_window(position, starts, 2046)
        margins = [min(position - s, s + 2045 - position) if s <= position < s + 2046 else -1 for s in starts]
        assert margins[chosen] == max(margins) and chosen == margins.index(max(margins))
    with pytest.raises(ValueError, match="in no window"):
        tokenizer.central_window(10_000, starts, 2046)
