"""No request can hurt the engine or the requests beside it: hostile sampling parameters are
refused or made safe before a request enters a batch, and a step that still fails ends only the
requests that make it fail; the engine goes on serving."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import make_engine
from disagg.engine.sampling import SamplingParams
from disagg.errors import InvalidRequestError
from test_serve import MODEL, metrics, start

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
PROMPTS = [[5, 9, 12, 40, 7], [100, 3, 77, 250, 18, 31]]


@pytest.mark.parametrize("params", [
    {"top_p": 1e-50}, {"top_p": 6.6e-162}, {"temperature": 1e-40}, {"temperature": 1e-5, "top_k": 3},
    {"temperature": 100.0, "top_p": 1e-30, "seed": 2**63 - 1}, {"seed": -(2**63), "temperature": 2.0},
])
def test_extreme_but_valid_sampling_parameters_sample_safely(params):
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=5, ignore_eos=True, **params))
    vocab = engine.model_config.vocab_size
    assert all(len(c.token_ids) == 5 and all(0 <= t < vocab for t in c.token_ids) for c in out)


def test_a_vanishing_temperature_or_top_p_is_greedy():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")
    greedy = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    for params in ({"temperature": 1e-40}, {"top_p": 1e-50, "temperature": 1.0}):
        got = engine.generate(PROMPTS, SamplingParams(max_tokens=5, ignore_eos=True, seed=1, **params))
        assert [c.token_ids for c in got] == greedy, params


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_refused(seed):
    with pytest.raises(InvalidRequestError, match="seed"):
        SamplingParams(seed=seed, temperature=1.0)


BAD = 499  # a prompt starting with this token makes the poisoned model fail


def _poison(engine, how: str) -> None:
    """Make the model fail (raise, or give NaN logits) on every step that computes the start of a
    prompt beginning with BAD."""
    model = engine.runner.model
    real = model.forward

    def forward(input_ids, positions, *args, **kwargs):
        logits = real(input_ids, positions, *args, **kwargs)
        starts = (positions == 0).nonzero().flatten().tolist()
        if any(input_ids[i].item() == BAD for i in starts):
            if how == "raise":
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
            logits = logits.clone()
            logits[:] = float("nan")
        return logits

    model.forward = forward


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_a_step_that_fails_ends_only_the_request_that_makes_it_fail(how):
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")
    good = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    _poison(engine, how)
    rids = ["good0", "bad", "good1"]
    for rid, prompt in zip(rids, [PROMPTS[0], [BAD, 1, 2, 3], PROMPTS[1]], strict=True):
        engine.add_request(rid, prompt, GREEDY)
    outs: dict[str, list] = {r: [] for r in rids}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    assert outs["bad"][-1].finish_reason == "abort"
    assert outs["bad"][-1].error
    assert [t for o in outs["good0"] for t in o.new_token_ids] == good[0]
    assert [t for o in outs["good1"] for t in o.new_token_ids] == good[1]
    assert engine.block_manager.num_used_blocks == 0
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == good  # and it goes on serving


def test_hostile_sampling_parameters_never_take_a_worker_down():
    bodies = [
        ({"top_p": 1e-50}, 200), ({"top_p": 6.6e-162}, 200), ({"temperature": 1e-40}, 200),
        ({"seed": 2**64, "temperature": 1.0}, 400), ({"seed": -(2**63) - 1, "temperature": 0.5}, 400),
        ({"top_p": 0}, 400), ({"temperature": -1}, 400), ({"top_k": -5}, 400),
    ]
    with start("single") as c:
        url = next(iter(c.worker_urls().values()))
        for path, prompt in (("/v1/completions", {"prompt": "Hello"}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})):
            for extra, status in bodies:
                for stream in (False, True):
                    r = httpx.post(url + path, timeout=60, headers=c.worker_headers, json={
                        "model": MODEL, "max_tokens": 3, "stream": stream, **prompt, **extra})
                    assert r.status_code == status, (path, extra, stream, r.text)
                    if status == 200 and stream:
                        assert r.text.rstrip().endswith("data: [DONE]"), r.text
                        assert '"error"' not in r.text, r.text
                    if status == 400:
                        assert r.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        r = httpx.post(url + "/v1/completions", timeout=60, headers=c.worker_headers,
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        assert metrics(url)["disagg_kv_blocks_used"] == 0


def test_the_sampler_keeps_the_best_token_whatever_top_p():
    from disagg.engine.sampler import sample

    logits = torch.tensor([[0.0, 5.0, 1.0, 4.999], [3.0, 3.0, 3.0, 3.0]])
    for top_p in (1e-300, 1e-50, 1e-9):
        tokens, _ = sample(logits, [SamplingParams(temperature=1.0, top_p=top_p)] * 2,
                           [torch.Generator().manual_seed(0)] * 2)
        assert tokens[0] == 1
        assert tokens[1] in (0, 1, 2, 3)
