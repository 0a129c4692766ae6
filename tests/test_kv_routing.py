"""KV-aware routing and conditional disaggregation through real clusters on loopback."""

from __future__ import annotations

import signal
import threading

import httpx

from disagg.serve.options import NO_KV_POOL
from test_serve import (
    MODEL,
    client,
    metrics,
    reference,  # noqa: F401 - a fixture, found by name
    start,
    wait_until,
)

SYSTEM = "You are a patient assistant who explains the sea, its tides, its salt and its depths. " * 12  # ~220 tokens


def finished(url: str) -> float:
    return sum(v for k, v in metrics(url).items() if k.startswith("disagg_requests_total"))


def index_blocks(proxy_url: str, worker: str) -> int:
    return httpx.get(proxy_url + "/health", timeout=5).json()["kv_index"].get(worker, {}).get("blocks", 0)


def test_prefix_routing_follows_what_a_worker_reports_holding():
    with start("replicated") as c:  # the default routing is prefix-aware
        urls = c.worker_urls()
        holder_name = sorted(urls)[1]
        holder = urls[holder_name]
        # computed on one replica behind the proxy's back: only the worker's own report can tell
        r = httpx.post(holder + "/v1/chat/completions", timeout=60, headers=c.worker_headers, json={
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert r.status_code == 200
        assert wait_until(lambda: index_blocks(c.url, holder) >= 12)
        before = {n: finished(u) for n, u in urls.items()}
        hits = metrics(holder)["disagg_prefix_cache_hit_blocks"]
        cl = client(c)
        for q in ("What is a tide?", "Why is the sea salty?", "How deep is it?"):
            cl.chat.completions.create(model=MODEL, max_tokens=2, messages=[
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        served = {n: finished(u) - before[n] for n, u in urls.items()}
        assert served[holder_name] == 3, served
        assert metrics(holder)["disagg_prefix_cache_hit_blocks"] >= hits + 3 * 12  # the system prompt, reused


def test_short_uncached_prompts_are_prefilled_on_the_decode_worker(request):
    from test_serve import MAX_TOKENS, PROMPTS

    expected = request.getfixturevalue("reference")
    with start("disaggregated", local_prefill_threshold=10_000) as c:
        urls = c.worker_urls()
        prefill = next(u for n, u in urls.items() if n.startswith("prefill"))
        cl = client(c)
        texts = [cl.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]
        assert texts == expected
        assert metrics(c.url)['disagg_proxy_requests_total{path="local_prefill"}'] == len(PROMPTS)
        assert finished(prefill) == 0  # prefill never saw them, no KV moved


def test_a_follow_up_turn_prefills_locally_where_the_first_turn_left_its_kv():
    turn1 = list(range(1000, 1200))  # 200 token ids: 12 full blocks
    turn2 = turn1 + list(range(2000, 2020))  # the history plus 20 new tokens
    with start("disaggregated", local_prefill_threshold=48) as c:
        urls = c.worker_urls()
        decode = next(u for n, u in urls.items() if n.startswith("decode"))
        prefill = next(u for n, u in urls.items() if n.startswith("prefill"))
        body = {"model": MODEL, "max_tokens": 4, "ignore_eos": True}
        assert httpx.post(c.url + "/v1/completions", json=body | {"prompt": turn1}, timeout=60).status_code == 200
        assert wait_until(lambda: index_blocks(c.url, decode) >= 12)  # the pulled KV is in decode's cache
        hits = metrics(decode)["disagg_prefix_cache_hit_blocks"]
        r = httpx.post(c.url + "/v1/completions", json=body | {"prompt": turn2}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 4
        m = metrics(c.url)
        assert m['disagg_proxy_requests_total{path="remote_prefill"}'] == 1
        assert m['disagg_proxy_requests_total{path="local_prefill"}'] == 1
        assert finished(prefill) == 1
        assert metrics(decode)["disagg_prefix_cache_hit_blocks"] >= hits + 12


def test_a_saturated_prefill_pool_sends_new_requests_to_decode():
    with start("disaggregated", prefill_queue_limit=1) as c:
        prefill = c.procs["prefill-0"]
        body = {"model": MODEL, "max_tokens": 2, "ignore_eos": True}
        answers = []
        # The prefill worker is stopped, so the first request stays in flight on it for as long as
        # the test needs, however fast or slow this machine is; its kernel still queues the request.
        prefill.send_signal(signal.SIGSTOP)
        try:
            busy = threading.Thread(target=lambda: answers.append(
                httpx.post(c.url + "/v1/completions", json=body | {"prompt": "A long story"}, timeout=120)))
            busy.start()
            assert wait_until(lambda: metrics(c.url)["disagg_proxy_prefills_in_flight"] == 1)
            r = httpx.post(c.url + "/v1/completions", json=body | {"prompt": "Hello there"}, timeout=60)
            assert r.json()["usage"]["completion_tokens"] == 2
            assert metrics(c.url)["disagg_proxy_prefills_in_flight"] == 1  # the first is still waiting
        finally:
            prefill.send_signal(signal.SIGCONT)
        busy.join()
        assert answers[0].json()["usage"]["completion_tokens"] == 2
        m = metrics(c.url)
        assert m['disagg_proxy_requests_total{path="local_prefill"}'] == 1
        assert m['disagg_proxy_requests_total{path="remote_prefill"}'] == 1
        assert m["disagg_proxy_prefills_in_flight"] == 0


def test_multi_turn_benchmark_sends_the_real_answers_so_history_hits_the_cache():
    import asyncio

    from disagg.bench.client import BenchClient
    from disagg.bench.runner import Load, run_load
    from disagg.bench.workloads import Session, Turn

    # turn 1: 32 prompt tokens, 48 generated -> 79 tokens computed = 4 full blocks of history. With
    # stand-in answers only the prompt's 2 blocks would match at turn 2.
    session = Session((Turn(tuple(range(3000, 3032)), 48), Turn(tuple(range(4000, 4016)), 4)))
    with start("single") as c:
        url = next(iter(c.worker_urls().values()))

        async def main():
            client = BenchClient(c.url, MODEL)
            try:
                return await run_load(client, [session], Load(concurrency=1))
            finally:
                await client.aclose()

        hits = metrics(url)["disagg_prefix_cache_hit_blocks"]
        records, _ = asyncio.run(main())
        assert [r.ok for r in records] == [True, True]
        assert records[1].prompt_tokens == 32 + 48 + 16
        assert metrics(url)["disagg_prefix_cache_hit_blocks"] - hits == 4


def test_shared_prefix_and_multi_turn_answers_are_the_same_with_and_without_reuse():
    """Greedy answers from the defaults (prefix routing, memory + disk pool, prefix caches) equal a
    single worker's with no reuse at all, request for request."""
    import asyncio
    import dataclasses

    from disagg.bench.client import BenchClient
    from test_serve import ENGINE

    prefix = list(range(5000, 5100))  # 100 shared tokens: 6 full blocks
    prompts = [prefix + list(range(6000 + 10 * i, 6000 + 10 * i + 12)) for i in range(4)]
    turns = [list(range(7000, 7040)), list(range(7100, 7120)), list(range(7200, 7230))]

    async def answers(url: str) -> list[list[int]]:
        client = BenchClient(url, MODEL)
        try:
            out = []
            for p in prompts + prompts[:2]:  # repeats: served from caches and the pool the second time
                rec, ids = await client.send(p, 6)
                assert rec.ok, rec.error
                assert isinstance(ids, list)
                out.append(ids)
            history: list[int] = []
            for new in turns:  # one conversation, its history sent back each turn
                history += new
                rec, ids = await client.send(history, 8)
                assert rec.ok, rec.error
                assert isinstance(ids, list)
                out.append(ids)
                history += ids
            return out
        finally:
            await client.aclose()

    with start("single", **NO_KV_POOL,
               engine=dataclasses.replace(ENGINE, enable_prefix_caching=False)) as c:
        expected = asyncio.run(answers(c.url))
    with start("replicated") as c:
        got = asyncio.run(answers(c.url))
        saved = sum(metrics(u).get("disagg_prefix_cache_hit_blocks", 0) for u in c.worker_urls().values())
    assert got == expected
    assert saved > 0  # and reuse did happen
