"""The proxy's bookkeeping through real processes: every routing charge settled once, one rule for
the token limit, and a restarted decode worker's new KV port."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import httpx
import pytest

from disagg.serve.launcher import free_port
from test_serve import (
    MODEL,
    PROMPTS,
    all_blocks_free,
    cluster,  # noqa: F401 - a fixture, found by name
    metrics,
    start,
    wait_until,
)


def loads(proxy_url: str) -> dict[str, int]:
    return httpx.get(proxy_url + "/health", timeout=5).json()["load"]


def first_token(url: str, prompt: str) -> int:
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0, "return_token_ids": True})
    return r.json()["choices"][0]["token_ids"][0]


def stream_lines(url: str, body: dict, keep: int | None = None) -> list[str]:
    """The data lines of a streamed answer; with `keep`, the client leaves after that many."""
    lines = []
    with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                lines.append(line)
                if keep is not None and len(lines) >= keep:
                    break
    return lines


def test_every_routing_charge_is_settled_when_its_request_ends():
    with start("disaggregated", kv_push=True, routing="least-load") as c:
        prompt = PROMPTS[0]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        stop = body | {"stop_token_ids": [first_token(c.url, prompt)]}
        for _ in range(4):  # token 1 is a stop token: prefill ends the request and starts no push
            r = httpx.post(c.url + "/v1/completions", json=stop, timeout=60).json()
            assert r["choices"][0]["finish_reason"] == "stop"
            assert json.loads(stream_lines(c.url, stop)[0][6:])["choices"][0]["finish_reason"] == "stop"
        ordinary = body | {"ignore_eos": True}
        assert httpx.post(c.url + "/v1/completions", json=ordinary, timeout=60).json()["usage"][
            "completion_tokens"] == 8
        assert stream_lines(c.url, ordinary)[-1] == "data: [DONE]"
        assert wait_until(lambda: all_blocks_free(c))
        for _ in range(2):  # the client leaves after token 1, before decode's stream is read
            stream_lines(c.url, ordinary | {"max_tokens": 200}, keep=1)
        assert wait_until(lambda: not any(loads(c.url).values())), loads(c.url)


def test_a_push_to_a_decode_worker_that_is_down_moves_and_settles_its_charge():
    with start("disaggregated", kv_push=True, routing="least-load", restart=False) as c:
        decode = c.procs["decode-1"]
        decode.send_signal(signal.SIGKILL)
        decode.wait()
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "ignore_eos": True}
        for stream in (False, True, False):  # its KV port unknown, then the decode request refused
            r = httpx.post(c.url + "/v1/completions", json=body | {"stream": stream}, timeout=60)
            assert r.status_code == 200, r.text  # the prefill worker, the one left, serves it whole
            assert (b'"finish_reason":"length"' in r.content) if stream else r.json()["usage"][
                "completion_tokens"] == 8
        assert not any(loads(c.url).values()), loads(c.url)


@pytest.mark.parametrize(("max_tokens", "max_completion_tokens"), [(20, 1), (1, 4), (5, 3)])
def test_chat_max_completion_tokens_wins_over_max_tokens_everywhere(cluster, max_tokens,  # noqa: F811
                                                                     max_completion_tokens):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}], "ignore_eos": True,
            "max_tokens": max_tokens, "max_completion_tokens": max_completion_tokens, "return_token_ids": True}
    r = httpx.post(cluster.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == max_completion_tokens
    assert len(r.json()["choices"][0]["token_ids"]) == max_completion_tokens


def _spawn(args: list[str], port: int, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "disagg.cli", *args, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    ok = wait_until(lambda: proc.poll() is None and _healthy(port), timeout=120)
    assert ok, f"{args[0]} on {port} did not start"
    return proc


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_restarted_decode_worker_gets_pushes_at_its_new_kv_port(tmp_path):
    engine = ["--model", MODEL, "--kv-cache-memory", "256MiB", "--threads", "1"]
    ports = {name: free_port() for name in ("prefill", "decode", "proxy")}
    serve = {role: ["serve", "--role", role, *engine] for role in ("prefill", "decode")}
    procs = []
    with open(tmp_path / "log", "wb") as log:
        try:
            procs.append(_spawn(serve["prefill"], ports["prefill"], log))
            decode = _spawn(serve["decode"], ports["decode"], log)
            procs.append(decode)
            procs.append(_spawn(["proxy", "--mode", "disaggregated", "--kv-push", "--prefill",
                                 f"http://127.0.0.1:{ports['prefill']}", "--decode",
                                 f"http://127.0.0.1:{ports['decode']}"], ports["proxy"], log))
            url = f"http://127.0.0.1:{ports['proxy']}/v1/completions"
            body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            expected = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
            decode.send_signal(signal.SIGKILL)
            decode.wait()
            procs.append(_spawn(serve["decode"], ports["decode"], log))  # same HTTP port, a new KV port
            for _ in range(3):
                t0 = time.monotonic()
                r = httpx.post(url, json=body, timeout=60)
                assert r.json()["choices"][0]["text"] == expected
                assert time.monotonic() - t0 < 10
            # the first went astray (to the old port) and was pulled; the others were pushed again
            decode_url = f"http://127.0.0.1:{ports['decode']}"
            assert metrics(decode_url)['disagg_kv_pulls_total{via="push"}'] == 2
            assert wait_until(lambda: metrics(decode_url)["disagg_kv_blocks_used"] == 0, timeout=5)
        finally:
            for p in procs:
                p.kill()
                p.wait()
