"""Who may drive a worker and how much: API keys, body size, queue limits, the cap on KV held for
decode workers; and what an engine that stalls or dies tells its server."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from conftest import make_engine
from disagg.engine.async_engine import AsyncEngine, EngineDeadError, EngineRequest
from disagg.engine.sampling import SamplingParams
from disagg.errors import OverloadedError
from disagg.kv.fake import FakeNetwork
from disagg.kv.params import KVTransferParams
from test_kv_connector import Worker, run
from test_serve import MODEL, client, start

PROMPT = list(range(5, 60))  # 55 tokens: 4 blocks of 16


def test_an_api_key_guards_every_route_but_health_and_metrics():
    with start("single", api_key="s3cret") as c:
        with pytest.raises(openai.AuthenticationError):
            client(c).completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # the wrong key
        keyed = openai.OpenAI(base_url=c.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert keyed.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        worker = next(iter(c.worker_urls().values()))
        for url in (c.url, worker):
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.get(url + "/metrics").status_code == 200
            for path in ("/v1/models", "/openapi.json"):
                r = httpx.get(url + path, headers={"Authorization": "Bearer s3cre"})
                assert r.status_code == 401, (url, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
        # the workers have a key of their own: the client's key does not open them, nor does none
        body = {"prompt": "Hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer s3cret"}):
            assert httpx.post(worker + "/v1/completions", json=body, headers=headers).status_code == 401
        for path in ("/kv/tokenizer", "/kv/events"):  # what routing reads needs it too
            assert httpx.get(worker + path).status_code == 401
            assert httpx.get(worker + path, headers=c.worker_headers).status_code == 200
        # a prefill-for-remote request, the way to pin KV, is the workers' key's alone
        pin = body | {"kv_transfer_params": {"do_remote_decode": True}}
        assert httpx.post(worker + "/v1/completions", json=pin).status_code == 401


def test_a_body_beyond_the_limit_is_a_413_and_the_server_goes_on():
    with start("single") as c:
        worker = next(iter(c.worker_urls().values()))
        huge = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
        for url, headers in ((c.url, {}), (worker, c.worker_headers)):
            r = httpx.post(url + "/v1/completions", content=huge, timeout=60,
                           headers=headers | {"content-type": "application/json"})
            assert r.status_code == 413, r.text[:200]
            # without a length up front, counted as it streams in
            r = httpx.post(url + "/v1/completions", content=iter([huge[i:i + (1 << 20)] for i in range(0, len(huge),
                                                                                                   1 << 20)]),
                           headers=headers | {"content-type": "application/json"}, timeout=60)
            assert r.status_code == 413
            assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers,
                              timeout=60).status_code == 200


def _waiting(engine, n: int, tokens: list[int] = PROMPT, **kv) -> None:
    for i in range(n):
        engine.add(engine.make_sequence(f"r{i}-{len(tokens)}", tokens, SamplingParams(max_tokens=2),
                                        KVTransferParams(**kv) if kv else None))


def test_the_queue_limits_refuse_with_503_and_keep_what_is_queued():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB", max_num_queued_reqs=2)
    _waiting(engine, 2)
    with pytest.raises(OverloadedError, match="max-num-queued-reqs") as e:
        _waiting(engine, 1, tokens=[7, 8])
    assert e.value.http_status == 503
    assert e.value.retry_after >= 1
    assert engine.stats()["waiting"] == 2
    while engine.has_unfinished():
        engine.step()
    _waiting(engine, 2)  # room again once the queue drained
    while engine.has_unfinished():
        engine.step()
    engine = make_engine(model="tiny", kv_cache_memory="16MiB", max_num_queued_tokens=100)
    _waiting(engine, 1)  # 55 queued
    with pytest.raises(OverloadedError, match="max-num-queued-tokens"):
        _waiting(engine, 1, tokens=list(range(5, 55)))  # 50 more would pass 100
    _waiting(engine, 1, tokens=list(range(5, 45)))  # 40 more fit
    while engine.has_unfinished():
        engine.step()


def test_kv_held_for_decode_workers_is_capped_and_local_requests_still_run():
    w = Worker(FakeNetwork(), kv_max_held_fraction=0.25)
    engine = w.engine
    cap = int(0.25 * engine.block_manager.num_blocks)
    held = 0
    try:
        for i in range(1000):  # prefill-for-remote requests that nobody pulls: held until their lease ends
            try:
                engine.add(engine.make_sequence(f"pin{i}", PROMPT, SamplingParams(max_tokens=1),
                                                KVTransferParams(do_remote_decode=True)))
            except OverloadedError as e:
                refused = str(e)
                break
            run(w)
            held = w.used()
        else:
            pytest.fail("the cap never refused a prefill-for-remote request")
        assert "kv-max-held-fraction" in refused
        assert 0 < held <= cap
        out = engine.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))  # a local request runs
        assert len(out[0].token_ids) == 4
    finally:
        w.close()


def test_seeded_sampling_continues_the_same_stream_from_tokens_done_elsewhere():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    whole = engine.generate([PROMPT], params)[0].token_ids
    assert len(set(whole)) > 1
    # the first 5 tokens done "elsewhere" (a prefill worker, a worker that died mid-stream)
    seq = engine.make_sequence("cont", PROMPT, params, KVTransferParams(do_remote_prefill=True,
                                                                        first_token_ids=whole[:5]))
    engine.add(seq)
    rest = []
    while engine.has_unfinished():
        rest += [t for o in engine.step() for t in o.new_token_ids]
    assert whole[:5] + rest == whole


def _blocking_step(engine, release: threading.Event):
    real = engine.step

    def step():
        release.wait()
        return real()
    engine.step = step


def test_the_engine_loop_reports_a_stall_while_requests_wait():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")
    release = threading.Event()
    _blocking_step(engine, release)
    ae = AsyncEngine(engine)

    async def scenario() -> tuple[float, float, float]:
        idle = ae.stalled_for()
        stream = ae.generate(EngineRequest("s", PROMPT, SamplingParams(max_tokens=2)))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.6)  # the step is wedged: the stall grows
        stalled = ae.stalled_for()
        release.set()
        await first
        async for _ in stream:
            pass
        return idle, stalled, ae.stalled_for()

    idle, stalled, after = asyncio.run(scenario())
    ae.shutdown()
    assert idle == 0.0  # idle is not stalled
    assert after < 0.1  # progressing is not stalled (the loop may not have gone idle yet)
    assert stalled >= 0.5


def test_an_engine_that_dies_fails_its_requests_and_tells_its_server():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB")

    def broken():
        raise MemoryError("the device is gone")
    engine.step = broken
    told = threading.Event()
    ae = AsyncEngine(engine, on_dead=lambda e: told.set())

    async def scenario() -> None:
        with pytest.raises(EngineDeadError):
            async for _ in ae.generate(EngineRequest("d", PROMPT, SamplingParams(max_tokens=2))):
                pass

    asyncio.run(scenario())
    assert told.wait(5)
    assert not ae.alive
    engine.connector.close()


def test_pinning_attempts_are_refused_and_do_not_slow_a_legitimate_request():
    pin = {"model": MODEL, "prompt": "x " * 4000, "max_tokens": 2,
           "kv_transfer_params": {"do_remote_prefill": True, "push_id": "p", "do_remote_decode": True}}
    with start("disaggregated", api_key="k3y") as c:
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        keyed = openai.OpenAI(base_url=c.url + "/v1", api_key="k3y", max_retries=0, timeout=60)

        def latency() -> float:
            import time
            t0 = time.perf_counter()
            keyed.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                     extra_body={"ignore_eos": True})
            return time.perf_counter() - t0

        latency()  # warm
        idle = sorted(latency() for _ in range(3))[1]
        stop, answers = threading.Event(), []

        def attack() -> None:
            with httpx.Client(timeout=30) as h:
                while not stop.is_set():
                    answers.append(h.post(c.url + "/v1/completions", json=pin,
                                          headers={"Authorization": "Bearer k3y"}).status_code)
                    answers.append(h.post(prefill + "/v1/completions", json=pin,
                                          headers={"Authorization": "Bearer k3y"}).status_code)

        attackers = [threading.Thread(target=attack) for _ in range(4)]
        for t in attackers:
            t.start()
        try:
            busy = sorted(latency() for _ in range(3))[1]
        finally:
            stop.set()
            for t in attackers:
                t.join()
        assert set(answers) <= {400, 401}  # the proxy refuses client transfer params; the worker the client's key
        assert len(answers) > 20
        assert busy < 2 * idle, (busy, idle)
        assert all(httpx.get(u + "/metrics").text.count("disagg_kv_blocks_used 0.0") == 1
                   for u in c.worker_urls().values())


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_two_thousand_idle_connections_to_a_kv_port_stay_within_a_bound():
    """Each announces a 1 MiB frame and sends nothing more: the worker serves at most 256 of them
    (a thread each, closed after the 10 s handshake timeout), refuses the rest on arrival, and grows
    by less than 64 MiB."""
    import socket
    import struct

    with start("single") as c:
        worker = next(iter(c.worker_urls().values()))
        pid = c.procs[next(iter(c.worker_urls()))].pid
        health = httpx.get(worker + "/health").json()
        rss, threads = _status(pid, "VmRSS"), _status(pid, "Threads")
        socks = []
        try:
            for _ in range(2000):
                s = socket.create_connection((health["kv_host"], health["kv_port"]), timeout=10)
                s.sendall(struct.pack(">I", 1 << 20))
                socks.append(s)
            assert _status(pid, "Threads") <= threads + 256 + 2
            assert _status(pid, "VmRSS") - rss < 64 * 1024  # kB
            body = {"prompt": "Hi", "max_tokens": 2}  # the worker serves meanwhile
            assert httpx.post(c.url + "/v1/completions", json=body, timeout=60).status_code == 200
        finally:
            for s in socks:
                s.close()
