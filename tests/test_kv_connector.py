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


def prefill_then(prefill: Worker, prompt: list[int] = PROMPT, rid: str = "pre", **kv) -> dict:
    """Phase one on `prefill`: token 1 and the kv_transfer_params of its answer."""
    prefill.engine.add_request(rid, prompt, GREEDY, KVTransferParams(do_remote_decode=True, **kv))
    (last,) = [o for o in run(prefill)[rid] if o.finished]
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


# ---- found in review: each of these failed before its fix ----

def _blocks(n: int) -> str:
    """A KV cache of `n` blocks of the tiny model."""
    probe = Worker(FakeNetwork())
    try:
        return str(n * probe.engine.kv_cache.block_bytes)
    finally:
        probe.close()


def test_received_requests_that_fill_the_cache_still_run(network):
    """Two pulls whose prompts fill a small decode cache exactly: each needs one more block for
    token 1 than its KV takes, and neither may wait for the other for ever."""
    prompts = [list(range(3, 3 + 64)), list(range(200, 200 + 64))]  # 4 whole blocks each
    prefill, decode = Worker(network), Worker(network, kv_cache_memory=_blocks(8))
    want = [prefill.engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    firsts = []
    for i, p in enumerate(prompts):
        kvp = prefill_then(prefill, p, rid=f"pre{i}")
        firsts.append(kvp["first_token_ids"])
        decode.engine.add_request(f"dec{i}", p, GREEDY, KVTransferParams.model_validate(kvp))
    outs = run(prefill, decode)
    for i in range(len(prompts)):
        assert firsts[i] + tokens(outs[f"dec{i}"]) == want[i]
    assert decode.metrics.n["received"] > 0
    assert prefill.used() == decode.used() == 0


def test_a_push_is_used_even_when_the_decode_pool_holds_the_whole_prompt(network):
    """Token 1 comes with the push; a decode worker that could load every prompt block from its pool
    must still wait for it rather than sample a token 1 of its own (the client would get it twice)."""
    prompt = PROMPT[:64]  # whole blocks
    prefill, decode = Worker(network), Worker(network, pool=PoolConfig(memory=1 << 22))
    want = decode.engine.generate([prompt], GREEDY)[0].token_ids  # now pooled (and cached) on decode
    push = {"push_id": "p2", "push_host": decode.address.host, "push_port": decode.address.port}
    decode.engine.add_request("dec", prompt, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p2"))
    prefill.engine.add_request("pre", prompt, GREEDY, KVTransferParams(do_remote_decode=True, **push))
    outs = run(prefill, decode)
    assert tokens(outs["pre"]) + tokens(outs["dec"]) == want
    assert decode.metrics.n["via_push"] == 1
    assert decode.metrics.n["failed"] == 0
    assert prefill.used() == decode.used() == 0


def test_held_kv_being_pushed_outlives_its_lease(network, expected):
    """The decode worker takes its time to admit the pushed request: the prefill's held blocks must
    not expire (and be taken by another prompt) while the push still has to read them."""
    import time

    prefill, decode = Worker(network, lease=0.3, kv_cache_memory=_blocks(6)), Worker(network)
    push = {"push_id": "p3", "push_host": decode.address.host, "push_port": decode.address.port}
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p3"))
    prefill.engine.add_request("pre", PROMPT, GREEDY, KVTransferParams(do_remote_decode=True, **push))
    first = tokens(run(prefill)["pre"])  # prefill is done; decode has not been stepped yet
    time.sleep(1.0)  # past the lease: the keeper would have freed unpinned held blocks by now
    # another prompt on prefill (6 blocks: it needs 5, mostly those the held KV has), stepped before
    # the decode worker admits the pushed request and the push reads its blocks
    other = [3 + (7 * i) % 500 for i in range(70)]
    prefill.engine.add_request("other", other, GREEDY)
    outs = run(prefill, decode)
    assert first + tokens(outs["dec"]) == expected
    alone = Worker(FakeNetwork())
    assert tokens(outs["other"]) == alone.engine.generate([other], GREEDY)[0].token_ids
    alone.close()
    assert prefill.used() == decode.used() == 0


def test_a_source_lost_between_admission_and_allocation_recomputes(network, expected, monkeypatch):
    """A lease renewal that fails right after the scheduler was told KV could be loaded: the request
    must still finish (recomputed), not wait for a load nobody planned."""
    from disagg.engine.connector.pull import PullConnector

    prefill, decode = Worker(network), Worker(network)
    kvp = prefill_then(prefill)
    pull = next(c for c in decode.connector.children if isinstance(c, PullConnector))
    answer = PullConnector.num_loadable_tokens

    def then_lose(self, seq, computed):
        n = answer(self, seq, computed)
        if n and seq.request_id in self._sources:
            self._lose(seq.request_id, self._sources[seq.request_id])  # what a failed renewal does
        return n

    monkeypatch.setattr(pull, "num_loadable_tokens", then_lose.__get__(pull))
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected
    assert decode.used() == 0


def test_the_keeper_survives_a_failing_housekeeping_round(network):
    """One tick that raises must not stop the thread that expires leases."""
    from disagg.engine.connector.pull import PullConnector

    prefill = Worker(network, lease=0.3)
    pull = next(c for c in prefill.connector.children if isinstance(c, PullConnector))
    real, failed = pull.tick, []

    def flaky(now):
        if not failed:
            failed.append(now)
            raise RuntimeError("dictionary changed size during iteration")
        real(now)

    pull.tick = flaky
    prefill_then(prefill)
    assert prefill.used() == 5
    import time

    deadline = time.monotonic() + 10
    while prefill.used() and time.monotonic() < deadline:
        run(prefill)
        prefill.engine.step()
    assert failed
    assert prefill.used() == 0  # the lease expired after all


def test_aborting_a_held_prefill_refuses_later_pulls(network, expected):
    """A prefill whose client left once it had finished: abort releases its held KV through the
    connector, so no pull can read the blocks after another request takes them."""
    prefill, decode = Worker(network, kv_cache_memory=_blocks(6)), Worker(network)
    kvp = prefill_then(prefill)
    assert prefill.engine.abort("pre")
    prefill.engine.generate([[3 + (7 * i) % 500 for i in range(70)]], GREEDY)  # takes the freed blocks over
    assert prefill.used() == 0
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    got = tokens(run(prefill, decode)["dec"])
    assert kvp["first_token_ids"] + got == expected  # recomputed, not read from someone else's blocks
    assert decode.metrics.n["failed"] == 1


def test_a_push_whose_memory_cannot_be_had_fails_its_request(network, monkeypatch):
    from disagg.engine.connector.target import LoadTarget

    def no_memory(self, shape, dtype):
        raise MemoryError("no room for a staging buffer")

    monkeypatch.setattr(LoadTarget, "views", no_memory)
    decode = Worker(network, lease=30.0)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p4"))
    decode.engine.step()  # admitted: waiting for the push with its blocks
    cache = decode.engine.kv_cache
    header = PushHeader("p4", len(PROMPT), tokens_digest(PROMPT), cache.export_shape(5), dtype_name(cache.dtype))
    with pytest.raises(Exception, match="staging"):
        network.ports[decode.address].accept_push(header, abort=lambda: None)
    outs = run(decode, timeout=10)["dec"]
    assert outs[-1].finish_reason == "abort"
    assert decode.used() == 0


def test_loopback_means_a_loopback_address():
    from disagg.kv.address import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "localhost", "::1"]))
    assert not any(map(is_loopback, ["127.evil.example", "10.0.0.1", "example.com", "", "0.0.0.0"]))
