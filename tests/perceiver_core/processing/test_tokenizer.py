from __future__ import annotations

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
