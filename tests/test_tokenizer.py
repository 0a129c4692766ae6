"""The bundled model's tokenizer, rebuilt from its GGUF, must tokenize like SmolLM2's original."""

from __future__ import annotations

import pytest

from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(smol):
    return smol.tokenizer


def pieces(tok, text):
    return [tok.id_to_token(i) for i in tok.encode(text)]


def test_digits_are_split_one_by_one(tok):
    # SmolLM2's pre-tokenizer isolates each digit; a naive GPT-2 rebuild would merge "2024"
    assert pieces(tok, "2024") == ["2", "0", "2", "4"]
    assert pieces(tok, "a 12 b") == ["a", "Ġ", "1", "2", "Ġb"]
    assert pieces(tok, "x3.14") == ["x", "3", ".", "1", "4"]
    # where it shows: spaces before a number stay one run, as in the original tokenizer.json
    # (Sequence[Digits(individual), ByteLevel]); the GPT-2 split alone would give "ĠĠ", "Ġ", "4"
    assert pieces(tok, "Total:   42") == ["Total", ":", "ĠĠĠ", "4", "2"]
    assert pieces(tok, "[\n    10,") == ["[", "ĊĠĠĠĠ", "1", "0", ","]


def test_special_tokens_are_atomic_and_skipped_on_decode(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") == 1
    assert ids[-1] == tok.token_to_id("<|im_end|>") == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("text", ["Hello, world!", "  two spaces\tand tab\n", "Ünïcödé — ✓ 😀", "x = f(1, 2) ** 3"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_chat_template_is_chatml_with_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own_system = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    assert own_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_chat_template_rejects_malformed_messages(tok):
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequestError, match=r"messages\[0\]"):
        tok.apply_chat_template([{"role": "user"}])


def test_byte_level_tokenizer_round_trips_anything():
    tok = Tokenizer.byte_level()
    text = "any bytes: é 😀 \x00"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 259
