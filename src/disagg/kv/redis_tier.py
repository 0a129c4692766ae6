"""The KV pool's shared tier: blocks in a Redis server that several workers use (kv/pool.py).

One key per block, a sorted set scoring each block by its last use and a byte counter, kept exact
across all writers by scripts that run atomically on the server, so whichever worker pushes the
total past the budget evicts the least recently used blocks, whoever wrote them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

from disagg.errors import ConfigError
from disagg.kv.pool import HEADER, Tier, TierStats, pack, unpack

log = logging.getLogger("disagg.kv.pool")


# Redis scripts: each runs atomically on the server, so concurrent writers keep the byte counter
# exact. KEYS[1] is the LRU sorted set, KEYS[2] the byte counter, further KEYS the blocks.
_PUT = """
local added, count = 0, 0
for i = 3, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[i - 1], 'NX') then
    redis.call('ZADD', KEYS[1], ARGV[1], KEYS[i])
    added = added + string.len(ARGV[i - 1])
    count = count + 1
  end
end
return {added, count, redis.call('INCRBY', KEYS[2], added)}
"""
_EVICT = """
local budget = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local evicted = 0
while used > budget do
  local oldest = redis.call('ZPOPMIN', KEYS[1], 1)
  if #oldest == 0 then  -- nothing left to evict: whatever the counter says, nothing is stored
    redis.call('SET', KEYS[2], 0)
    break
  end
  local size = redis.call('STRLEN', oldest[1])
  if redis.call('DEL', oldest[1]) == 1 then
    used = redis.call('DECRBY', KEYS[2], size)
    evicted = evicted + 1
  end
end
return evicted
"""
_DISCARD = """
local size = redis.call('STRLEN', KEYS[3])
redis.call('ZREM', KEYS[1], KEYS[3])
if redis.call('DEL', KEYS[3]) == 1 then redis.call('DECRBY', KEYS[2], size) end
return size
"""


class RedisTier(Tier):
    """Blocks in a shared Redis server. Keys are `<namespace><hex>`; `<namespace>lru` scores each
    block by its last use and `<namespace>bytes` counts what they take, updated atomically (server
    scripts), so whichever worker pushes the total past the budget evicts the least recently used
    blocks, whoever wrote them. After a failure the tier is skipped for `cooldown` seconds, so a
    Redis that went away costs one timeout, not one per request."""

    name = "redis"

    def __init__(self, url: str, budget_bytes: int, namespace: str = "disagg:kv:", cooldown: float = 5.0,
                 key: bytes | None = None) -> None:
        """`key` (kv/pool.py pool_key): authenticate entries, so none written without it is loaded."""
        import redis

        self._errors = (redis.RedisError, OSError)
        self.key = key
        self.budget = budget_bytes
        self.ns = namespace
        self.stats = TierStats()
        self.cooldown = cooldown
        self._down_until = 0.0
        try:
            self.r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            self.r.ping()
        except (*self._errors, ValueError) as e:
            raise ConfigError(f"cannot reach the KV pool's Redis at {url}: {e}; start redis-server or drop "
                              "--kv-pool-redis") from e
        self._lru, self._bytes = namespace + "lru", namespace + "bytes"
        self._put, self._evict, self._discard = (self.r.register_script(x) for x in (_PUT, _EVICT, _DISCARD))

    def _key(self, key: bytes) -> str:
        return self.ns + key.hex()

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, e: Exception) -> None:
        self.stats.errors += 1
        self._down_until = time.monotonic() + self.cooldown
        log.warning("KV pool's Redis tier failed (%d errors so far): %s; skipped for %.0f s", self.stats.errors, e,
                    self.cooldown)

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys or not self._up():
            return [False] * len(keys)
        try:
            pipe = self.r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._key(k))
            return [bool(x) for x in pipe.execute()]
        except self._errors as e:
            self._failed(e)
            return [False] * len(keys)

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys or not self._up():
            return [None] * len(keys)
        try:
            blobs = self.r.mget([self._key(k) for k in keys])
        except self._errors as e:
            self._failed(e)
            return [None] * len(keys)
        out: list[bytes | None] = []
        used: dict[str, float] = {}
        for k, blob in zip(keys, blobs, strict=True):
            data = unpack(blob, self.key) if blob is not None else None
            if blob is not None and data is None:
                self.stats.corrupt += 1
                self.discard(k)
            elif data is not None:
                used[self._key(k)] = time.time()
            out.append(data)
        if used:
            with contextlib.suppress(*self._errors):
                self.r.zadd(self._lru, used, xx=True)  # only blocks still there: never revive an evicted one
        return out

    def put(self, key: bytes, data: bytes) -> None:
        self.put_many([key], [data])

    def put_many(self, keys: Sequence[bytes], blocks: Sequence[bytes]) -> None:
        if not keys or not self._up():
            return
        blobs = [pack(d, self.key) for d in blocks]
        try:
            added, count, used = self._put(keys=[self._lru, self._bytes, *map(self._key, keys)],
                                           args=[time.time(), *blobs])
            self.stats.bytes_written += added - HEADER.size * count
            if used > self.budget:
                self.stats.evicted += self._evict(keys=[self._lru, self._bytes], args=[self.budget])
        except self._errors as e:
            self._failed(e)

    def discard(self, key: bytes) -> None:
        with contextlib.suppress(*self._errors):
            self._discard(keys=[self._lru, self._bytes, self._key(key)])
