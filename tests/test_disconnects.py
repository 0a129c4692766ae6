"""A client that goes away stops its work: a non-streaming request whose client left is aborted on
the worker (directly, or through the proxy in any architecture), as a streaming one already is, and
no KV stays held."""

from __future__ import annotations

import httpx
import pytest

from test_serve import MODEL, all_blocks_free, metrics, start, wait_until

LONG = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True}


def running(c) -> float:
    return sum(metrics(u)["disagg_requests_running"] + metrics(u)["disagg_requests_waiting"]
               for u in c.worker_urls().values())


def leave_after(url: str, body: dict, seconds: float, headers: dict | None = None) -> None:
    """Send a request and give up on it after `seconds` (the client's own timeout)."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=seconds, headers=headers)


@pytest.mark.parametrize("arch", ["single", "disaggregated"])
def test_a_non_streaming_client_that_leaves_aborts_its_request(arch):
    with start(arch) as c:
        targets = [c.url] + ([next(iter(c.worker_urls().values()))] if arch == "single" else [])
        for url in targets:  # through the proxy, and straight to the worker
            leave_after(url, LONG, 3.0, c.worker_headers)
            assert wait_until(lambda: running(c) == 0, timeout=10), (url, running(c))
        assert wait_until(lambda: all_blocks_free(c), timeout=10)
        r = httpx.post(c.url + "/v1/completions", json=LONG | {"max_tokens": 2}, timeout=60)
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_during_prefill_stops_the_prefill(stream):
    with start("disaggregated") as c:
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        limit = httpx.get(c.url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]
        body = {"model": MODEL, "prompt": [1000 + i % 5000 for i in range(limit - 64)], "max_tokens": 8,
                "stream": stream}  # seconds of prefill on one core
        before = metrics(prefill).get("disagg_prompt_tokens_total", 0.0)
        leave_after(c.url, body, 1.0)
        assert wait_until(lambda: running(c) == 0, timeout=60)
        # an aborted request is not counted as finished: had the prefill run to its end, it would be
        assert metrics(prefill).get("disagg_prompt_tokens_total", 0.0) == before
        assert wait_until(lambda: all_blocks_free(c), timeout=10)
