"""The KV pool's tiers on their own: prefix lookups, promotion, budgets, restarts, corruption."""

from __future__ import annotations

from disagg.kv.block_hash import chain_hashes
from disagg.kv.pool import DiskTier, KVPool, MemoryTier

MODEL = "m/float32"


def blocks(n: int, size: int = 1000) -> tuple[list[bytes], list[bytes]]:
    keys = chain_hashes(list(range(16 * n)), 16, MODEL)
    return keys, [bytes([i % 251]) * size for i in range(n)]


def test_lookup_returns_the_longest_stored_prefix_and_promotes_to_memory(tmp_path):
    keys, data = blocks(4)
    memory, disk = MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20)
    pool = KVPool([memory, disk])
    pool.store(keys[:3], data[:3])
    hit = pool.lookup(keys)
    assert hit.blocks == data[:3]  # block 4 was never stored: the prefix stops there
    assert hit.tiers == ["memory"] * 3
    fresh_memory = MemoryTier(1 << 20)
    again = KVPool([fresh_memory, disk]).lookup(keys)
    assert again.tiers == ["disk"] * 3
    assert KVPool([fresh_memory]).lookup(keys).tiers == ["memory"] * 3  # promoted on the way
    # a hole breaks the prefix: what follows it is not reachable
    missing = chain_hashes(list(range(500, 516)), 16, MODEL)[0]
    assert pool.lookup([keys[0], missing, keys[2]]).blocks == [data[0]]


def test_budgets_evict_least_recently_used(tmp_path):
    keys, data = blocks(5)
    memory = MemoryTier(3 * 1024 + 100)  # three packed blocks fit
    pool = KVPool([memory])
    pool.store(keys[:3], data[:3])
    pool.lookup(keys[:1])  # block 0 is now the most recently used
    pool.store(keys[3:4], data[3:4])
    assert memory.get(keys[1]) is None
    assert memory.get(keys[0]) == data[0]
    assert memory.stats.evicted == 1
    assert memory.used <= memory.budget


def test_a_restarted_worker_still_hits_its_disk_tier(tmp_path):
    keys, data = blocks(3)
    KVPool([DiskTier(tmp_path, 1 << 20)]).store(keys, data)
    reopened = DiskTier(tmp_path, 1 << 20)  # a new process finds the files
    assert reopened.used > 0
    assert KVPool([reopened]).lookup(keys).blocks == data


def test_write_back_reaches_disk_only_when_memory_evicts(tmp_path):
    keys, data = blocks(3)
    memory, disk = MemoryTier(2 * 1024 + 100), DiskTier(tmp_path, 1 << 20)
    pool = KVPool([memory, disk], policy="back")
    pool.store(keys[:2], data[:2])
    assert disk.used == 0
    pool.store(keys[2:], data[2:])  # evicts block 0 from memory, onto disk
    assert disk.get(keys[0]) == data[0]
    assert pool.lookup(keys).blocks == data


def test_corrupt_or_truncated_entries_are_dropped_never_returned(tmp_path):
    keys, data = blocks(2)
    disk = DiskTier(tmp_path, 1 << 20)
    KVPool([disk]).store(keys, data)
    first = disk._path(keys[0])
    raw = bytearray(first.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the payload
    first.write_bytes(bytes(raw))
    second = disk._path(keys[1])
    second.write_bytes(second.read_bytes()[:-10])  # truncated
    assert KVPool([disk]).lookup(keys).blocks == []
    assert disk.stats.corrupt == 1
    assert not first.exists()
    assert disk.get(keys[1]) is None
    assert disk.stats.corrupt == 2
    assert disk.used == 0
