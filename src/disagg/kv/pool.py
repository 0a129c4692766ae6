"""The KV-cache pool: content-addressed KV blocks kept beyond a worker's cache, in tiers.

A block's key is the engine's chained block hash (kv/block_hash.py: model id + parent hash +
the block's tokens), so every worker computes the same key with no coordination. Tiers, fastest
first, each optional and with a byte budget:

- memory: this process, least recently used first out;
- disk:   a directory (the "NVMe" tier); files are written atomically (a temporary file, then a
          rename) and survive a worker restart; several workers may share one directory;
- redis:  a Redis server several workers share (the remote tier, kv/redis_tier.py): one key per
          block, a sorted set of last uses and a byte counter, so the budget holds across all its
          writers.

Reads walk a prefix: one batched existence check per tier finds the longest run of leading blocks
that some tier holds, then each tier is read once for its part, and what slower tiers gave is
promoted into the faster ones. Writes go through every tier ("through") or into memory only,
reaching the lower tiers when memory evicts them ("back"). Every stored block carries an XXH3-64
of its bytes, or, where the cluster has a secret (DISAGG_KV_SECRET), a MAC keyed with it, so that
the disk and Redis tiers load nothing that someone without the secret wrote; a corrupt, truncated
or unauthenticated entry is dropped and counted, never returned. The disk tier's directory is
created 0700 and its entries 0600: cached KV reveals the prompts it came from. A tier that
fails (Redis gone) answers as a miss and counts the error: the pool never fails a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from disagg.errors import ConfigError

log = logging.getLogger("disagg.kv.pool")

MAGIC, KEYED_MAGIC = b"DKV1", b"DKM1"
HEADER = struct.Struct("<4sQQ")  # magic, payload length, digest of the payload


def pool_key(secret: str | None) -> bytes | None:
    """The key that authenticates pool entries, from the cluster's secret (DISAGG_KV_SECRET)."""
    return hashlib.sha256(b"disagg kv pool\0" + secret.encode()).digest() if secret else None


def _digest(data: bytes, key: bytes | None) -> int:
    if key is None:  # a checksum: catches corruption, not forgery
        return xxhash.xxh3_64_intdigest(data)
    # a keyed MAC: an entry written without the key (a tampered file, another cluster's) never reads
    return int.from_bytes(hashlib.blake2b(data, key=key, digest_size=8).digest(), "little")


def pack(data: bytes, key: bytes | None = None) -> bytes:
    return HEADER.pack(MAGIC if key is None else KEYED_MAGIC, len(data), _digest(data, key)) + data


def unpack(blob: bytes, key: bytes | None = None) -> bytes | None:
    """The payload, or None if the entry is corrupt, truncated, or not written with `key`."""
    if len(blob) < HEADER.size:
        return None
    magic, n, digest = HEADER.unpack_from(blob)
    data = blob[HEADER.size :]
    if magic != (MAGIC if key is None else KEYED_MAGIC) or len(data) != n or _digest(data, key) != digest:
        return None
    return data


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    evicted: int = 0
    errors: int = 0


class Tier:
    """What the pool asks of a tier. The batched forms default to one call per key; a remote tier
    overrides them to make one round trip."""

    name = "tier"
    stats: TierStats

    def get(self, key: bytes) -> bytes | None:
        raise NotImplementedError

    def put(self, key: bytes, data: bytes) -> None:
        raise NotImplementedError

    def contains(self, key: bytes) -> bool:
        raise NotImplementedError

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def put_many(self, keys: Sequence[bytes], blocks: Sequence[bytes]) -> None:
        for key, data in zip(keys, blocks, strict=True):
            self.put(key, data)


class MemoryTier(Tier):
    name = "memory"

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()  # held for dictionary updates only, never across I/O
        self.stats = TierStats()
        self.on_evict: Callable[[bytes, bytes], None] = lambda key, blob: None

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            blob = self._blocks.get(key)
            if blob is None:
                return None
            self._blocks.move_to_end(key)
        return unpack(blob)

    def put(self, key: bytes, data: bytes) -> None:
        blob = pack(data)
        if len(blob) > self.budget:
            return
        evicted = []
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return
            self._blocks[key] = blob
            self.used += len(blob)
            self.stats.bytes_written += len(data)
            while self.used > self.budget:
                old, old_blob = self._blocks.popitem(last=False)
                self.used -= len(old_blob)
                self.stats.evicted += 1
                evicted.append((old, old_blob[HEADER.size :]))
        for old, payload in evicted:  # write-back spills into slower tiers: outside the lock
            self.on_evict(old, payload)

    def discard(self, key: bytes) -> None:
        with self._lock:
            blob = self._blocks.pop(key, None)
            if blob is not None:
                self.used -= len(blob)


class DiskTier(Tier):
    name = "disk"

    def __init__(self, root: str | Path, budget_bytes: int, key: bytes | None = None) -> None:
        """`key` (pool_key): authenticate entries, for a directory others can write to."""
        self.root = Path(root)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # cached KV reveals prompts
        except OSError as e:
            raise ConfigError(f"cannot use {self.root} as the KV pool's disk tier: {e.strerror}; "
                              "pass another --kv-pool-dir, or '' for none") from e
        if self.root.stat().st_mode & 0o077 and key is None:
            log.warning("the KV pool directory %s is open to other users, whose files it would load: set "
                        "DISAGG_KV_SECRET to authenticate its entries, or chmod 700 it", self.root)
        self.key = key
        self.budget = budget_bytes
        self.stats = TierStats()
        self._lock = threading.Lock()  # held for bookkeeping only, never across file I/O
        # what is there already (a restarted worker keeps its blocks), oldest first
        entries = sorted(e for p in self.root.glob("*/*.kv") if (e := _entry(p)) is not None)
        self._files: OrderedDict[str, int] = OrderedDict((p.stem, size) for _, size, p in entries)
        self.used = sum(self._files.values())

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}.kv"

    def contains(self, key: bytes) -> bool:
        return self._path(key).exists()  # a file another worker sharing the directory wrote counts

    def get(self, key: bytes) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            with self._lock:
                self._forget(key.hex())
            return None
        data = unpack(blob, self.key)
        if data is None:
            self.stats.corrupt += 1
            self.discard(key)
            return None
        with self._lock:
            if key.hex() in self._files:
                self._files.move_to_end(key.hex())
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used, for eviction after a restart too
        return data

    def put(self, key: bytes, data: bytes) -> None:
        blob = pack(data, self.key)
        with self._lock:
            if len(blob) > self.budget or key.hex() in self._files:
                return
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # readers see the old state or the whole new file, never half of it
        except OSError as e:  # a full or read-only disk: counted, the block simply not kept
            self.stats.errors += 1
            if self.stats.errors == 1 or self.stats.errors % 1000 == 0:
                log.warning("KV pool's disk tier cannot write (%d errors so far): %s", self.stats.errors, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        evicted = []
        with self._lock:
            self._forget(key.hex())  # written twice meanwhile: counted once
            self._files[key.hex()] = len(blob)
            self.used += len(blob)
            self.stats.bytes_written += len(data)
            while self.used > self.budget and self._files:
                old, size = self._files.popitem(last=False)
                self.used -= size
                self.stats.evicted += 1
                evicted.append(old)
        for old in evicted:
            with contextlib.suppress(OSError):
                (self.root / old[:2] / f"{old}.kv").unlink()

    def _forget(self, name: str) -> None:
        size = self._files.pop(name, None)
        if size is not None:
            self.used -= size

    def discard(self, key: bytes) -> None:
        with self._lock:
            self._forget(key.hex())
        with contextlib.suppress(OSError):
            self._path(key).unlink()


def _entry(path: Path) -> tuple[float, int, Path] | None:
    """(last use, size, path) of a pool file, or None when it vanished since it was listed (another
    worker sharing the directory evicted it)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size, path


@dataclass
class LookupResult:
    blocks: list[bytes]
    tiers: list[str]  # where each block was found
    seconds: float


@dataclass
class KVPool:
    """The tiers as one store. Thread-safe without a pool-wide lock: each tier guards its own
    bookkeeping, so a lookup never waits behind another request's write to a slow tier."""

    tiers: list[Tier]
    policy: str = "through"  # or "back"

    def __post_init__(self) -> None:
        if self.policy not in ("through", "back"):
            raise ValueError(f"write policy must be through or back, got {self.policy!r}")
        if self.policy == "back" and len(self.tiers) > 1 and isinstance(self.tiers[0], MemoryTier):
            lower = self.tiers[1:]

            def spill(key: bytes, data: bytes) -> None:
                for tier in lower:
                    tier.put(key, data)

            self.tiers[0].on_evict = spill

    def _where(self, keys: Sequence[bytes]) -> list[int]:
        """For the leading run of `keys` some tier holds: the fastest tier holding each (one batched
        existence check per tier)."""
        where: list[int | None] = [None] * len(keys)
        for i, tier in enumerate(self.tiers):
            todo = [j for j, w in enumerate(where) if w is None]
            for j, present in zip(todo, tier.contains_many([keys[j] for j in todo]), strict=True):
                if present:
                    where[j] = i
        n = next((j for j, w in enumerate(where) if w is None), len(keys))
        return [w for w in where[:n] if w is not None]

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many leading blocks of `keys` the pool holds, reading none of them."""
        return len(self._where(keys))

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """The longest run of leading blocks the pool holds, promoted into faster tiers."""
        t0 = time.perf_counter()
        where = self._where(keys)
        n = len(where)
        found: list[bytes | None] = [None] * n
        for i, tier in enumerate(self.tiers):  # one read per tier, of its part of the prefix
            mine = [j for j in range(n) if where[j] == i]
            for j, data in zip(mine, tier.get_many([keys[j] for j in mine]), strict=True):
                found[j] = data
        n = next((j for j, d in enumerate(found) if d is None), n)  # vanished or corrupt: cut there
        looked = len(keys[: n + 1])  # the prefix, and the first block nobody had
        for i, tier in enumerate(self.tiers):
            mine = [j for j in range(n) if where[j] == i]
            tier.stats.hits += len(mine)
            tier.stats.bytes_read += sum(len(found[j]) for j in mine)
            tier.stats.misses += looked - sum(1 for w in where[:n] if w <= i)
            for j in mine:
                for faster in self.tiers[:i]:
                    faster.put(keys[j], found[j])
        blocks = [b for b in found[:n] if b is not None]
        return LookupResult(blocks, [self.tiers[where[j]].name for j in range(n)], time.perf_counter() - t0)

    def store(self, keys: Sequence[bytes], blocks: Sequence[bytes]) -> None:
        for tier in self.tiers if self.policy == "through" else self.tiers[:1]:
            tier.put_many(keys, blocks)
