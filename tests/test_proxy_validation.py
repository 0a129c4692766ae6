"""The proxy judges a client's request before any worker works on it: invalid requests are a 400
at once (never HTTP 200, token 1 and then an error event), a prompt that cannot fit its max_tokens
is refused by the prefill worker before it computes anything, and clients cannot drive the
internal two-phase protocol (kv_transfer_params is the proxy's to set)."""

from __future__ import annotations

import httpx
import pytest

from test_serve import MODEL, all_blocks_free, metrics, start


@pytest.fixture(scope="module")
def disaggregated():
    with start("disaggregated") as c:
        yield c


def finished(url: str) -> float:
    return sum(v for k, v in metrics(url).items() if k.startswith("disagg_requests_total"))


def prompt_tokens(url: str) -> float:
    return metrics(url).get("disagg_prompt_tokens_total", 0.0)


def worker_work(c) -> list[float]:
    return [finished(u) + prompt_tokens(u) for u in c.worker_urls().values()]


@pytest.mark.parametrize("kvp", [
    {"do_remote_prefill": True, "push_id": "p-1"},  # would reserve decode blocks and wait for a push
    {"do_remote_decode": True},  # would hold the prompt's KV and reveal where
    {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 9, "remote_request_id": "x"},
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_kv_transfer_params_are_refused(disaggregated, kvp, path):
    c = disaggregated
    before = worker_work(c)
    body = {"model": MODEL, "max_tokens": 4, "kv_transfer_params": kvp}
    body |= {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    for stream in (False, True):
        r = httpx.post(c.url + path, json=body | {"stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        assert "kv_transfer_params" in r.json()["error"]["message"]
    assert worker_work(c) == before
    assert all_blocks_free(c)


@pytest.mark.parametrize("bad", [
    {"max_tokens": -1}, {"max_tokens": "many"}, {"stream_options": "usage"}, {"stream_options": {"include_usage": [1]}},
    {"temperature": -0.5}, {"top_p": 0}, {"logprobs": 1000}, {"n": "two"}, {"stop": [""]},
])
def test_an_invalid_streaming_request_is_a_400_before_any_token(disaggregated, bad):
    c = disaggregated
    before = worker_work(c)
    r = httpx.post(c.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "Hello", "stream": True, "max_tokens": 4} | bad)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert worker_work(c) == before


def test_a_prompt_that_cannot_fit_its_max_tokens_is_refused_before_its_prefill(disaggregated):
    c = disaggregated
    limit = httpx.get(c.url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]
    prompt = [1000 + i % 5000 for i in range(limit - 1)]  # fits alone; not with 2 tokens to generate
    before = worker_work(c)
    for stream in (False, True):
        r = httpx.post(c.url + "/v1/completions", timeout=300,
                       json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": stream})
        assert r.status_code == 400, r.text
        assert "maximum context length" in r.json()["error"]["message"]
    assert worker_work(c) == before  # no worker computed any of it
    assert all_blocks_free(c)


RAW = [
    '{"prompt": "a\\ud800b", "max_tokens": 2}',  # a lone surrogate
    '{"prompt": "Hi", "max_tokens": 2, "temperature": NaN}',
    '{"prompt": "Hi", "max_tokens": 2, "top_p": Infinity}',
    '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",  # nested far deeper than any parser's stack
]


@pytest.mark.parametrize("raw", RAW, ids=["surrogate", "nan", "infinity", "deep"])
def test_malformed_bodies_are_a_400_from_proxy_and_worker(disaggregated, raw):
    c = disaggregated
    prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
    for url in (c.url, prefill):
        r = httpx.post(url + "/v1/completions", content=raw, timeout=30,
                       headers={"content-type": "application/json"} | c.worker_headers)
        assert r.status_code == 400, (url, r.text[:300])
        assert r.json()["error"]["type"] == "invalid_request_error"
    chat = '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    for url in (c.url, prefill):
        r = httpx.post(url + "/v1/chat/completions", content=chat, timeout=30,
                       headers={"content-type": "application/json"} | c.worker_headers)
        assert r.status_code == 400, (url, r.text[:300])
    assert httpx.post(c.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60).status_code == 200
