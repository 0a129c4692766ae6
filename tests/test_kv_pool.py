"""The KV pool's tiers on their own: prefix lookups, promotion, budgets, restarts, corruption."""

from __future__ import annotations

from disagg.kv.block_hash import chain_hashes
from disagg.kv.pool import DiskTier, KVPool, MemoryTier
from disagg.kv.redis_tier import RedisTier

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
    assert disk.stats.corrupt == 2  # both read in one batch, both caught
    assert not first.exists()
    assert not second.exists()
    assert disk.get(keys[1]) is None
    assert disk.used == 0
    KVPool([disk]).store(keys, data)  # recomputed and stored again: usable
    assert KVPool([disk]).lookup(keys).blocks == data


# ---- the Redis tier, against a real redis-server (conftest.py starts one) ----


def test_two_workers_share_blocks_through_redis(redis_url):
    keys, data = blocks(4, size=300_000)
    writer = KVPool([MemoryTier(1 << 30), RedisTier(redis_url, 1 << 30, namespace="t1:")])
    writer.store(keys[:3], data[:3])
    other_redis = RedisTier(redis_url, 1 << 30, namespace="t1:")  # another worker, cold memory
    other_memory = MemoryTier(1 << 30)
    hit = KVPool([other_memory, other_redis]).lookup(keys)
    assert hit.blocks == data[:3]
    assert hit.tiers == ["redis"] * 3
    assert other_redis.stats.hits == 3
    assert other_redis.stats.misses == 1  # block 4: looked up, not there
    assert other_memory.get(keys[0]) == data[0]  # promoted


def test_redis_budget_holds_across_writers_and_evicts_least_recently_used(redis_url):
    import redis

    keys, data = blocks(6, size=100_000)
    a = RedisTier(redis_url, 350_000, namespace="t2:")
    b = RedisTier(redis_url, 350_000, namespace="t2:")
    a.put_many(keys[:2], data[:2])
    b.put_many(keys[2:3], data[2:3])
    assert a.get(keys[0]) == data[0]  # block 0 used again: block 1 is now the oldest
    b.put_many(keys[3:4], data[3:4])  # 4 blocks > 350 kB: one must go
    r = redis.Redis.from_url(redis_url)
    assert int(r.get("t2:bytes")) <= 350_000
    assert a.contains_many(keys[:4]) == [True, False, True, True]
    assert a.stats.evicted + b.stats.evicted == 1


def test_corrupt_redis_entries_are_dropped_and_counted(redis_url):
    import redis

    keys, data = blocks(2)
    tier = RedisTier(redis_url, 1 << 20, namespace="t3:")
    KVPool([tier]).store(keys, data)
    r = redis.Redis.from_url(redis_url)
    r.setrange("t3:" + keys[1].hex(), 40, b"\xff\xff")  # bytes flipped inside the payload
    assert KVPool([tier]).lookup(keys).blocks == data[:1]
    assert tier.stats.corrupt == 1
    assert not r.exists("t3:" + keys[1].hex())


def test_an_unreachable_redis_is_a_clear_error_at_start_and_a_miss_later(tmp_path):
    import pytest

    from conftest import start_redis
    from disagg.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot reach the KV pool's Redis"):
        RedisTier("redis://127.0.0.1:1/0", 1 << 20)
    keys, data = blocks(2)
    proc, url = start_redis(tmp_path)
    tier = RedisTier(url, 1 << 20)
    proc.kill()  # the server goes away mid-run
    proc.wait()
    pool = KVPool([MemoryTier(1 << 20), tier])
    pool.store(keys, data)  # no exception: the memory tier still works
    assert pool.lookup(keys).blocks == data
    assert tier.stats.errors == 1  # then skipped for a while: one timeout, not one per request


def test_a_redis_byte_counter_gone_wrong_heals_itself(redis_url):
    import redis

    keys, data = blocks(3, size=1000)
    tier = RedisTier(redis_url, 10_000, namespace="t6:")
    r = redis.Redis.from_url(redis_url)
    tier.put_many(keys[:1], data[:1])
    r.set("t6:bytes", 10**9)  # e.g. someone flushed the blocks but not the counter
    tier.put_many(keys[1:2], data[1:2])  # finds nothing left worth the count: resets it
    assert int(r.get("t6:bytes")) == 0
    tier.put_many(keys[2:], data[2:])
    assert tier.contains_many(keys[2:]) == [True]
    assert int(r.get("t6:bytes")) == r.strlen("t6:" + keys[2].hex())


def test_a_disk_tier_that_cannot_write_counts_errors_and_fails_nothing(tmp_path):
    keys, data = blocks(2)
    disk = DiskTier(tmp_path, 1 << 20)
    (tmp_path / keys[0].hex()[:2]).write_bytes(b"a file where the directory should be")
    pool = KVPool([MemoryTier(1 << 20), disk])
    pool.store(keys, data)
    assert disk.stats.errors == (1 if keys[0].hex()[:2] != keys[1].hex()[:2] else 2)
    assert pool.lookup(keys).blocks == data  # memory still serves them
    assert not list(tmp_path.glob("**/*.tmp*"))


def test_a_disk_tier_starts_when_a_shared_directory_loses_files_meanwhile(tmp_path):
    keys, data = blocks(2)
    KVPool([DiskTier(tmp_path, 1 << 20)]).store(keys, data)
    # another worker sharing the directory evicts a file between this one's listing and its stat:
    # a dangling link is exactly that state, frozen
    (tmp_path / "ff").mkdir(exist_ok=True)
    (tmp_path / "ff" / f"{'ff' * 16}.kv").symlink_to(tmp_path / "gone.kv")
    disk = DiskTier(tmp_path, 1 << 20)
    assert KVPool([disk]).lookup(keys).blocks == data


def test_a_lookup_does_not_wait_behind_a_slow_write():
    import threading

    keys, data = blocks(2)
    gate, writing = threading.Event(), threading.Event()

    class SlowTier(MemoryTier):  # a remote tier whose writes hang (a slow Redis, a full disk)
        name = "slow"

        def put_many(self, keys, blocks):
            writing.set()
            gate.wait(30)

    memory = MemoryTier(1 << 20)
    pool = KVPool([memory, SlowTier(1 << 20)])
    gate.set()
    pool.store(keys[:1], data[:1])  # in memory (and through the slow tier, fast for now)
    gate.clear()
    writing.clear()
    writer = threading.Thread(target=pool.store, args=(keys[1:], data[1:]))
    writer.start()
    assert writing.wait(10)
    found = []
    reader = threading.Thread(target=lambda: found.append(pool.lookup(keys[:1]).blocks))
    reader.start()
    reader.join(10)
    alive = reader.is_alive()
    gate.set()
    writer.join(10)
    reader.join(10)
    assert not alive, "a lookup waited for another request's write to a slow tier"
    assert found == [data[:1]]


def test_the_disk_tier_keeps_its_entries_to_this_user(tmp_path):
    import stat

    root = tmp_path / "pool"
    keys, data = blocks(2)
    KVPool([DiskTier(root, 1 << 20)]).store(keys, data)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = list(root.glob("*/*.kv"))
    assert len(files) == 2
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert all(stat.S_IMODE(f.parent.stat().st_mode) == 0o700 for f in files)


def test_with_a_secret_a_forged_entry_is_never_loaded(tmp_path):
    """Someone who can write the directory but lacks the secret rewrites an entry with other KV and
    a checksum that matches it: read with the secret it is dropped; the untouched one still reads."""
    from disagg.kv.pool import pack, pool_key

    key = pool_key("cluster secret")
    keys, data = blocks(2)
    DiskTier(tmp_path, 1 << 20, key).put(keys[0], data[0])
    DiskTier(tmp_path, 1 << 20, key).put(keys[1], data[1])
    forged = next(p for p in tmp_path.glob("*/*.kv") if p.stem == keys[0].hex())
    forged.write_bytes(pack(b"\x07" * len(data[0])))  # valid as an unkeyed entry
    reader = DiskTier(tmp_path, 1 << 20, key)
    assert reader.get(keys[0]) is None
    assert reader.stats.corrupt == 1
    assert reader.get(keys[1]) == data[1]
    assert DiskTier(tmp_path, 1 << 20, pool_key("another secret")).get(keys[1]) is None  # another cluster's
    assert DiskTier(tmp_path, 1 << 20).get(keys[1]) is None  # keyed entries need the key


def test_with_a_secret_redis_entries_are_authenticated(redis_url):
    import redis as redis_py

    from disagg.kv.pool import pack, pool_key

    key = pool_key("cluster secret")
    keys, data = blocks(2)
    writer = RedisTier(redis_url, 1 << 30, namespace="t9:", key=key)
    writer.put_many(keys, data)
    redis_py.Redis.from_url(redis_url).set(writer._key(keys[0]), pack(b"\x07" * len(data[0])))  # forged
    reader = RedisTier(redis_url, 1 << 30, namespace="t9:", key=key)
    assert reader.get_many(keys) == [None, data[1]]
    assert reader.stats.corrupt == 1
    other = RedisTier(redis_url, 1 << 30, namespace="t9:", key=pool_key("another secret"))
    assert other.get_many([keys[1]]) == [None]  # another cluster's entry: its MAC does not verify
