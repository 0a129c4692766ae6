"""The engine's KV connector with the in-process fake transport: pull, push, pool, composite, and
what happens when KV is late, wrong or never comes. No sockets; real engines on the tiny model."""

from __future__ import annotations

import collections
import threading

import pytest

from disagg.engine.config import EngineConfig
from disagg.engine.connector.factory import KVConnectorConfig, PoolConfig, assemble
from disagg.engine.llm_engine import LLMEngine
from disagg.engine.sampling import SamplingParams
from disagg.kv.block_hash import tokens_digest
from disagg.kv.fake import FakeNetwork
from disagg.kv.params import KVTransferParams
from disagg.kv.transport import PushHeader, dtype_name

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPT = list(range(3, 3 + 70))  # four full blocks of 16 and a partial one


class Counts:
    """A KVMetrics that remembers what it was told."""

    def __init__(self) -> None:
        self.n: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def _add(self, key: str, value: float = 1) -> None:
        with self._lock:
            self.n[key] += value

    def sent(self, nbytes):
        self._add("sent", nbytes)

    def received(self, nbytes, via):
        self._add("received", nbytes)
        self._add(f"via_{via}")

    def load_failed(self):
        self._add("failed")

    def lease_renewed(self):
        self._add("renewed")

    def lease_expired(self):
        self._add("expired")

    def pool_loaded(self, tokens, seconds):
        self._add("pool_tokens", tokens)

    def pool_write_dropped(self):
        self._add("dropped")


class Worker:
    """An engine with a connector on the fake network, driven by hand."""

    def __init__(self, network: FakeNetwork, lease: float = 30.0, pool: PoolConfig | None = None,
                 timeout: float = 5.0, **engine) -> None:
        self.metrics = Counts()
        cfg = KVConnectorConfig(lease=lease, pool=pool or PoolConfig())
        self.engine = LLMEngine(EngineConfig(**({"model": "tiny", "device": "cpu", "threads": 1,
                                                  "kv_cache_memory": "4MiB"} | engine)),
                                lambda e: assemble(e, cfg, {"tcp": network.transport(timeout)},
                                                   network.transport(timeout), network.open_port, self.metrics))
        self.connector = self.engine.connector

    @property
    def address(self):
        return self.connector.port.address

    def used(self) -> int:
        return self.engine.block_manager.num_used_blocks

    def close(self) -> None:
        self.connector.close()


def run(*workers: Worker, timeout: float = 60) -> dict[str, list]:
    """Step every worker until none has work; each request's outputs, by id."""
    import time

    outs: dict[str, list] = collections.defaultdict(list)
    deadline = time.monotonic() + timeout
    while any(w.engine.has_unfinished() for w in workers):
        assert time.monotonic() < deadline, "requests did not finish"
        for w in workers:
            if w.engine.has_unfinished():
                for o in w.engine.step():
                    outs[o.request_id].append(o)
    return outs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture
def network():
    return FakeNetwork()


@pytest.fixture
def expected():
    w = Worker(FakeNetwork())
    try:
        return w.engine.generate([PROMPT], GREEDY)[0].token_ids
    finally:
        w.close()


def prefill_then(prefill: Worker, prompt: list[int] = PROMPT, **kv) -> dict:
    """Phase one on `prefill`: token 1 and the kv_transfer_params of its answer."""
    prefill.engine.add_request("pre", prompt, GREEDY, KVTransferParams(do_remote_decode=True, **kv))
    (last,) = [o for o in run(prefill)["pre"] if o.finished]
    return last.kv_transfer_params


def test_pull_continues_exactly_and_frees_both_sides(network, expected):
    prefill, decode = Worker(network), Worker(network)
    kvp = prefill_then(prefill)
    assert prefill.used() == 5  # held for the decode worker
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected
    assert prefill.used() == decode.used() == 0
    block = decode.engine.kv_cache.block_bytes
    assert decode.metrics.n["received"] == prefill.metrics.n["sent"] == 5 * block
    assert decode.metrics.n["via_fake"] == 1


def test_pull_sends_only_the_blocks_decode_lacks(network, expected):
    prefill, decode = Worker(network), Worker(network)
    # an earlier turn left the prompt's first three blocks in the decode worker's prefix cache
    decode.engine.add_request("turn1", PROMPT[:50], SamplingParams(max_tokens=1))
    run(decode)
    kvp = prefill_then(prefill)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected
    assert decode.metrics.n["received"] == 2 * decode.engine.kv_cache.block_bytes  # blocks 3 and 4 only
    assert prefill.used() == decode.used() == 0


def test_a_decode_worker_holding_the_whole_prompt_pulls_nothing_and_releases_the_kv(network):
    prompt = PROMPT[:64]  # whole blocks: the prefix cache can hold all of it
    prefill, decode = Worker(network), Worker(network)
    expected = decode.engine.generate([prompt], GREEDY)[0].token_ids  # and leaves it cached
    kvp = prefill_then(prefill, prompt)
    decode.engine.add_request("dec", prompt, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected
    assert decode.metrics.n["received"] == 0
    assert prefill.used() == 0  # released without a pull


def test_push_lands_in_the_decode_blocks_and_releases_the_prefill(network, expected):
    prefill, decode = Worker(network), Worker(network)
    push = {"push_id": "p1", "push_host": decode.address.host, "push_port": decode.address.port}
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p1"))
    prefill.engine.add_request("pre", PROMPT, GREEDY, KVTransferParams(do_remote_decode=True, **push))
    outs = run(prefill, decode)
    assert outs["pre"][-1].kv_transfer_params["push_id"] == "p1"
    assert tokens(outs["pre"]) + tokens(outs["dec"]) == expected
    assert decode.metrics.n["via_push"] == 1
    assert decode.metrics.n["received"] == prefill.metrics.n["sent"] == 5 * decode.engine.kv_cache.block_bytes
    assert prefill.used() == decode.used() == 0


def test_a_push_that_never_comes_fails_its_request_after_the_wait_and_frees_its_blocks(network):
    decode = Worker(network, lease=0.5)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p1"))
    outs = run(decode)["dec"]
    assert outs[-1].finished
    assert outs[-1].finish_reason == "abort"
    assert "no KV was pushed within 0.5 s" in outs[-1].error
    assert decode.used() == 0
    assert decode.metrics.n["failed"] == 1


def test_a_pull_from_a_silent_port_times_out_and_recomputes(network, expected):
    prefill, decode = Worker(network), Worker(network, timeout=0.5)
    kvp = prefill_then(prefill)
    network.silent.add(prefill.address)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(decode)["dec"])
    assert kvp["first_token_ids"] + got == expected  # recomputed
    assert decode.metrics.n["failed"] == 1
    assert decode.used() == 0


def test_a_push_with_unusable_first_tokens_fails_the_request_and_leaks_nothing(network):
    decode = Worker(network)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p1"))
    cache = decode.engine.kv_cache
    header = PushHeader("p1", len(PROMPT), tokens_digest(PROMPT), cache.export_shape(5), dtype_name(cache.dtype))

    class Rogue:  # a pusher whose trailer carries a token outside the vocabulary
        def __init__(self):
            self.header = header

        def layer(self, index, from_block):
            return [memoryview(bytearray(cache.block_bytes // cache.export_shape(1)[0] * (5 - from_block)))]

        def first_token_ids(self):
            return [10**9]

    pushing = threading.Thread(target=network.transport().push, args=(decode.address, Rogue()))
    pushing.start()
    outs = run(decode)["dec"]
    pushing.join(10)
    assert outs[-1].finish_reason == "abort"
    assert "first tokens are unusable" in outs[-1].error
    assert decode.used() == 0


def test_aborting_a_request_that_waits_for_its_kv_frees_its_blocks_once_the_load_ends(network):
    decode = Worker(network)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p1"))
    decode.engine.step()  # admitted: blocks allocated, waiting for the push
    assert decode.used() == 5
    assert decode.engine.abort("dec")
    run(decode)
    assert decode.used() == 0
    assert not decode.engine.has_unfinished()


def test_pool_then_remote_loads_each_part_once(network, expected, tmp_path):
    shared = PoolConfig(directory=str(tmp_path))
    prefill, decode = Worker(network), Worker(network, pool=shared)
    # another worker sharing the decode worker's pool computed the prompt's first three blocks
    other = Worker(network, pool=shared)
    other.engine.add_request("earlier", PROMPT[:50], SamplingParams(max_tokens=1))
    run(other)
    other.close()  # waits for its pool writes
    kvp = prefill_then(prefill)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected
    assert decode.metrics.n["pool_tokens"] == 3 * 16  # from the pool
    assert decode.metrics.n["received"] == 2 * decode.engine.kv_cache.block_bytes  # the rest from prefill
    assert prefill.used() == decode.used() == 0


def test_a_pool_load_serves_a_fresh_worker_the_same_tokens(network, expected, tmp_path):
    shared = PoolConfig(directory=str(tmp_path))
    first = Worker(network, pool=shared)
    assert first.engine.generate([PROMPT], GREEDY)[0].token_ids == expected
    first.close()
    second = Worker(network, pool=shared)
    assert second.engine.generate([PROMPT], GREEDY)[0].token_ids == expected
    assert second.metrics.n["pool_tokens"] == 4 * 16  # every full block of the prompt
    assert second.used() == 0


def test_the_pool_writer_keeps_at_most_a_few_prompts_waiting(network):
    from disagg.engine.connector.pool import MAX_PENDING, PoolConnector

    w = Worker(network, pool=PoolConfig(memory=1 << 20))
    pool = next(c for c in w.connector.children if isinstance(c, PoolConnector))
    gate = threading.Event()
    pool._writer.submit(gate.wait)  # the writer is busy
    prompts = [[7 + i] * 32 for i in range(MAX_PENDING + 3)]
    w.engine.generate(prompts, SamplingParams(max_tokens=1))
    assert w.metrics.n["dropped"] == 3
    gate.set()
    w.close()
    assert sum(pool.pool.leading(w.engine.make_sequence("x", p, GREEDY).block_hashes) for p in prompts) == \
        2 * MAX_PENDING  # what was queued got written: two blocks each
