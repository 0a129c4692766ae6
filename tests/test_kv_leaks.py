"""Where KV moves between engines, no request may leak a block: refused requests, failed and
abandoned transfers, every path through real workers on loopback."""

from __future__ import annotations

import httpx
import pytest

from test_serve import MODEL, PROMPTS, all_blocks_free, metrics, start, wait_until


def _held(prefill: str, prompt: str, headers: dict) -> dict:
    """A prefill worker's answer: token 1 and where its KV is held."""
    r = httpx.post(prefill + "/v1/completions", timeout=60, headers=headers, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200, r.text
    return r.json()["kv_transfer_params"]


@pytest.mark.parametrize(("change", "body"), [
    ({"first_token_ids": [10**9]}, {}),  # token 1 out of the vocabulary
    ({}, {"max_tokens": 1}),  # token 1 already reaches max_tokens: nothing left to generate
])
def test_a_decode_request_refused_after_its_kv_was_placed_leaks_no_block(change, body):
    with start("disaggregated", kv_lease=2.0) as c:
        urls = c.worker_urls()
        prefill = next(u for n, u in urls.items() if n.startswith("prefill"))
        decode = next(u for n, u in urls.items() if n.startswith("decode"))
        for prompt in PROMPTS[:2]:
            kvp = _held(prefill, prompt, c.worker_headers) | change
            r = httpx.post(decode + "/v1/completions", timeout=60, headers=c.worker_headers, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "kv_transfer_params": kvp}
                | body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["type"] == "invalid_request_error"
        assert metrics(decode)["disagg_kv_blocks_used"] == 0
        assert wait_until(lambda: all_blocks_free(c), timeout=10)  # the prefill's leases expire
