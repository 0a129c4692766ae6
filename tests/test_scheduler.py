"""Scheduler: token budget, decode priority, chunked prefill, admission, preemption."""

from __future__ import annotations

from disagg.engine.block_manager import BlockManager
from disagg.engine.sampling import SamplingParams
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence, Status


def seq(rid: str, n: int, max_tokens: int = 8) -> Sequence:
    tokens = [100 * len(rid) + i for i in range(n)]
    return Sequence(rid, tokens, n, SamplingParams(max_tokens=max_tokens), max_tokens)


def run_step(s: Scheduler) -> dict[str, int]:
    out = s.schedule()
    sampled = {q.request_id: 1 for q, n in out.scheduled if q.num_computed_tokens + n == q.num_tokens}
    s.update(out, sampled)
    return {q.request_id: n for q, n in out.scheduled}


def test_budget_chunks_a_long_prompt():
    s = Scheduler(BlockManager(64, 4, "m", enable_caching=False), max_num_seqs=4, max_num_batched_tokens=16)
    s.add(seq("long", 40))
    assert run_step(s) == {"long": 16}
    assert run_step(s) == {"long": 16}
    assert run_step(s) == {"long": 8}  # last chunk, then a token is sampled
    assert s.running[0].num_output_tokens == 1


def test_decodes_are_not_starved_by_a_long_prompt():
    s = Scheduler(BlockManager(64, 4, "m", enable_caching=False), max_num_seqs=4, max_num_batched_tokens=16)
    s.add(seq("d", 4))
    s.add(seq("long", 100))
    assert run_step(s) == {"d": 4, "long": 12}
    # put the prompt ahead of the decode in running order (as after a preemption and re-admission):
    # the decode must still go first
    s.running.reverse()
    for _ in range(5):
        step = run_step(s)
        assert step["d"] == 1
        assert step["long"] == 15


def test_running_prompt_chunks_come_before_new_admissions():
    s = Scheduler(BlockManager(64, 4, "m", enable_caching=False), max_num_seqs=4, max_num_batched_tokens=16)
    s.add(seq("a", 30))
    s.add(seq("b", 30))
    assert run_step(s) == {"a": 16}
    assert run_step(s) == {"a": 14, "b": 2}


def test_max_num_seqs_limits_admission():
    s = Scheduler(BlockManager(64, 4, "m", enable_caching=False), max_num_seqs=2, max_num_batched_tokens=64)
    for r in ("a", "bb", "ccc"):
        s.add(seq(r, 4))
    assert set(run_step(s)) == {"a", "bb"}
    assert len(s.waiting) == 1


def test_preemption_frees_the_newest_request_and_recomputes_it():
    bm = BlockManager(6, 4, "m", enable_caching=False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq("a", 8, max_tokens=40), seq("bb", 8, max_tokens=40)
    s.add(a)
    s.add(b)
    run_step(s)  # both admitted: 2 blocks each, 2 free
    preempted = False
    for _ in range(12):
        out = s.schedule()
        preempted |= b in out.preempted
        s.update(out, {q.request_id: 1 for q, n in out.scheduled if q.num_computed_tokens + n == q.num_tokens})
    assert preempted
    assert s.num_preemptions >= 1
    assert a.status is Status.RUNNING  # the older request kept running
    assert b.num_output_tokens >= 1  # its outputs survive preemption and are recomputed
    assert bm.num_used_blocks == sum(len(q.block_table) for q in s.running)


def test_finish_frees_blocks_unless_held_and_release_frees_them():
    bm = BlockManager(16, 4, "m", enable_caching=False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = seq("a", 8), seq("bb", 8)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a, "stop")
    s.finish(b, "length", hold=True)
    assert bm.num_used_blocks == 2
    assert "bb" in s.held
    assert s.release("bb")
    assert bm.num_used_blocks == 0
    assert not s.release("bb")


def test_a_request_waits_for_loaded_kv_apart_and_an_abort_frees_its_blocks_only_once_the_load_ends():
    from disagg.engine.connector.base import KVConnector

    class Loads(KVConnector):  # 8 tokens of the first request come from elsewhere
        def num_loadable_tokens(self, seq, computed):
            return 8 - computed if seq.request_id == "a" else 0

    bm = BlockManager(16, 4, "m", enable_caching=False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, connector=Loads())
    a, b = seq("a", 10), seq("b", 8)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [q.request_id for q, _ in out.scheduled] == ["b"]  # a waits for its KV without holding b up
    assert a.status is Status.WAITING_FOR_KV
    assert len(a.block_table) == 3  # for all its tokens: once its KV is in it runs without asking for more
    s.finish(b, "stop")
    s.finish(a, "abort")
    assert len(a.block_table) == 3  # a transfer may still be writing into them
    s.loaded(a, 8)
    assert not a.block_table
    assert not s.receiving
    c = seq("c", 10)
    c.request_id = "a"  # loads again: this time it arrives
    s.add(c)
    s.schedule()
    s.loaded(c, 8)
    out = s.schedule()
    assert out.scheduled == [(c, 2)]  # the loaded tokens count as computed


def test_requests_back_from_their_load_run_before_a_new_one_that_does_not_fit():
    """A request that found no room must not stall those behind it whose KV is in place: they hold
    the very blocks it waits for."""
    from disagg.engine.connector.base import KVConnector

    class Loads(KVConnector):  # r1 and r2 load their whole prompt from elsewhere
        def num_loadable_tokens(self, seq, computed):
            return 7 - computed if seq.request_id in ("r1", "r2") else 0

    bm = BlockManager(4, 4, "m", enable_caching=False)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, connector=Loads())
    r1, r2 = seq("r1", 8), seq("r2", 8)  # 2 blocks each: the cache is full
    for r in (r1, r2):
        s.add(r)
    s.schedule()
    assert set(s.receiving) == {"r1", "r2"}
    big = seq("big", 12)  # needs 3 blocks: there is no room until r1 or r2 ends
    s.add(big)
    s.loaded(r1, 7)
    s.loaded(r2, 7)
    s.waiting.remove(big)
    s.waiting.appendleft(big)  # at the head, as a preempted request would be
    out = s.schedule()
    assert sorted(q.request_id for q, _ in out.scheduled) == ["r1", "r2"]
    assert s.waiting[0] is big
