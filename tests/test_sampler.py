"""Sampler and detokenizer on synthetic inputs."""

from __future__ import annotations

import pytest
import torch

from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.engine.sampler import sample
from disagg.engine.sampling import SamplingParams
from disagg.errors import InvalidRequestError
from disagg.model.tokenizer import Tokenizer

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draws(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(n):
        [t], _ = sample(LOGITS.clone(), [params], [gen])
        counts[t] += 1
    return counts / n


def test_temperature_one_follows_the_model_distribution():
    freq = draws(SamplingParams(temperature=1.0))
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_low_temperature_sharpens():
    assert draws(SamplingParams(temperature=0.3), 1000)[0] > 0.75


def test_top_k_and_top_p_truncate():
    assert draws(SamplingParams(temperature=1.0, top_k=2), 1000)[2:].sum() == 0
    freq = draws(SamplingParams(temperature=1.0, top_p=0.7), 1000)  # 0.5 + 0.3 reach 0.7: two tokens kept
    assert freq[2:].sum() == 0
    assert freq[1] > 0.2


def test_greedy_ignores_the_generator_and_logprobs_are_of_the_model():
    [t], [lp] = sample(LOGITS.clone(), [SamplingParams(temperature=0, logprobs=2)], [None])
    assert t == 0
    assert lp.logprob == pytest.approx(torch.log(torch.tensor(0.5)).item(), abs=1e-6)
    assert [tok for tok, _ in lp.top] == [0, 1]


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"max_tokens": 0},
    {"logprobs": 21}, {"stop": ("",)}, {"stop_token_ids": (-1,)}, {"seed": "x"},
])
def test_invalid_sampling_values_are_rejected(bad):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def test_detokenizer_waits_for_whole_characters():
    tok = Tokenizer.byte_level()
    text = "naïve 😀 ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, SamplingParams())
    pieces = []
    for t in ids:
        detok.add([t])
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_detokenizer_holds_back_a_possible_stop_string():
    tok = Tokenizer.byte_level()
    detok = IncrementalDetokenizer(tok, SamplingParams(stop=("END",)))
    sent = ""
    for ch in "abcEN":
        assert detok.add(tok.encode(ch)) is None
        sent += detok.take(final=False)
    assert sent == "abc"  # "EN" might start "END"
    assert detok.add(tok.encode("D")) == "END"
    assert sent + detok.take(final=True) == "abc"
