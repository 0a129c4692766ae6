"""Block manager: allocation, reference counts, prefix cache, eviction, placement."""

from __future__ import annotations

from disagg.engine.block_manager import BlockManager
from disagg.engine.sampling import SamplingParams
from disagg.engine.sequence import Sequence

BS = 4


def seq(rid: str, tokens: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens), max_tokens)


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    cached = bm.cached_prefix(s)
    assert bm.can_allocate(s, s.num_tokens, cached)
    bm.allocate(s, s.num_tokens, cached)
    s.num_computed_tokens = s.num_tokens
    bm.register_computed_blocks(s)
    return cached


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, BS, "m")
    a = seq("a", list(range(10)))
    admit(bm, a)
    assert len(a.block_table) == 3
    assert bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 8
    assert a.block_table == []


def test_can_allocate_refuses_beyond_capacity():
    bm = BlockManager(2, BS, "m")
    a = seq("a", list(range(9)))
    assert not bm.can_allocate(a, 9)
    assert bm.can_allocate(a, 8)


def test_prefix_hit_shares_full_blocks_and_counts_refs():
    bm = BlockManager(16, BS, "m")
    a = seq("a", list(range(10)))
    admit(bm, a)
    b = seq("b", [*range(8), 99, 98, 97])
    cached = admit(bm, b)
    assert cached == a.block_table[:2]  # two full blocks of 4 shared; the partial third is not
    assert bm.blocks[cached[0]].ref_count == 2
    bm.free(a)
    assert bm.blocks[cached[0]].ref_count == 1
    bm.free(b)
    assert bm.num_free_blocks == 16


def test_hash_depends_on_model_id_and_position():
    bm = BlockManager(16, BS, "m")
    admit(bm, seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other_model = BlockManager(16, BS, "other")
    assert other_model.cached_prefix(seq("b", [1, 2, 3, 4, 0])) == []
    # the same 4 tokens as the second block, but at the start: a different chained hash
    assert bm.cached_prefix(seq("c", [5, 6, 7, 8, 0])) == []


def test_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(16, BS, "m")
    a = seq("a", list(range(8)))
    admit(bm, a)
    b = seq("b", list(range(8)))
    assert bm.cached_prefix(b) == a.block_table[:1]


def test_freed_cached_blocks_revive_until_evicted_lru():
    bm = BlockManager(4, BS, "m")
    a = seq("a", list(range(8)))
    admit(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = seq("b", [*range(8), 50])
    assert admit(bm, b) == a_blocks  # both full blocks revived from the free list
    bm.free(b)
    # fill the cache with other content: the old blocks are evicted and no longer hit
    c = seq("c", list(range(100, 116)))
    admit(bm, c)
    bm.free(c)
    assert bm.cached_prefix(seq("d", [*range(8), 1])) == []


def test_sequences_get_consecutive_blocks_with_room_to_grow():
    bm = BlockManager(64, BS, "m")
    a, b = seq("a", list(range(6)), max_tokens=10), seq("b", list(range(100, 106)), max_tokens=10)
    admit(bm, a)
    admit(bm, b)
    for _ in range(8):  # both grow one token at a time, interleaved
        for s in (a, b):
            s.token_ids.append(7)
            bm.allocate(s, s.num_tokens)
    for s in (a, b):
        assert s.block_table == list(range(s.block_table[0], s.block_table[0] + len(s.block_table)))
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 64


def test_claimed_blocks_are_still_used_when_memory_is_short():
    bm = BlockManager(6, BS, "m")
    a = seq("a", list(range(4)), max_tokens=20)  # claims room for 6 blocks
    admit(bm, a)
    b = seq("b", list(range(100, 120)))  # needs 5 blocks: takes a's claimed room
    assert bm.can_allocate(b, 20)
    bm.allocate(b, 20)
    assert bm.num_free_blocks == 0
    bm.free(a)
    bm.free(b)


def test_hit_statistics_count_each_admission_once():
    bm = BlockManager(16, BS, "m")
    admit(bm, seq("a", list(range(9))))
    b = seq("b", list(range(9)))
    for _ in range(3):  # looked up repeatedly while waiting: not counted
        bm.cached_prefix(b)
    admit(bm, b)
    assert bm.queries == 4  # two full blocks for each admission
    assert bm.hits == 2
