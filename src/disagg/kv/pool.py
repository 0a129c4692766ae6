"""The KV-cache pool: content-addressed KV blocks kept beyond a worker's cache, in tiers.

A block's key is the engine's chained block hash (kv/block_hash.py: model id + parent hash +
the block's tokens), so every worker computes the same key with no coordination. Tiers, fastest
first, each optional and with a byte budget:

- memory: this process, least recently used first out;
- disk:   a directory (the "NVMe" tier); files are written atomically (a temporary file, then a
          rename) and survive a worker restart.

Reads walk a prefix: the longest run of leading blocks that some tier holds, promoted into the
faster tiers on the way. Writes go through every tier ("through") or into memory only, reaching
disk when memory evicts them ("back"). Every stored block carries an XXH3-64 of its bytes; a
corrupt or truncated entry is dropped and counted, never returned.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

MAGIC = b"DKV1"
HEADER = struct.Struct("<4sQQ")  # magic, payload length, xxh3 of the payload


def pack(data: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(data), xxhash.xxh3_64_intdigest(data)) + data


def unpack(blob: bytes) -> bytes | None:
    """The payload, or None if the entry is corrupt or truncated."""
    if len(blob) < HEADER.size:
        return None
    magic, n, digest = HEADER.unpack_from(blob)
    data = blob[HEADER.size :]
    if magic != MAGIC or len(data) != n or xxhash.xxh3_64_intdigest(data) != digest:
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


class MemoryTier:
    name = "memory"

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._blocks: OrderedDict[bytes, bytes] = OrderedDict()
        self.stats = TierStats()
        self.on_evict: Callable[[bytes, bytes], None] = lambda key, blob: None

    def get(self, key: bytes) -> bytes | None:
        blob = self._blocks.get(key)
        if blob is None:
            return None
        self._blocks.move_to_end(key)
        return unpack(blob)

    def put(self, key: bytes, data: bytes) -> None:
        blob = pack(data)
        if len(blob) > self.budget:
            return
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        self._blocks[key] = blob
        self.used += len(blob)
        while self.used > self.budget:
            old, old_blob = self._blocks.popitem(last=False)
            self.used -= len(old_blob)
            self.stats.evicted += 1
            self.on_evict(old, old_blob[HEADER.size :])

    def discard(self, key: bytes) -> None:
        blob = self._blocks.pop(key, None)
        if blob is not None:
            self.used -= len(blob)


class DiskTier:
    name = "disk"

    def __init__(self, root: str | Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget = budget_bytes
        self.stats = TierStats()
        # what is there already (a restarted worker keeps its blocks), oldest first
        entries = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in self.root.glob("*/*.kv"))
        self._files: OrderedDict[str, int] = OrderedDict((p.stem, size) for _, size, p in entries)
        self.used = sum(self._files.values())

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.root / name[:2] / f"{name}.kv"

    def get(self, key: bytes) -> bytes | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except OSError:
            self._files.pop(key.hex(), None)
            return None
        data = unpack(blob)
        if data is None:
            self.stats.corrupt += 1
            self.discard(key)
            return None
        if key.hex() in self._files:
            self._files.move_to_end(key.hex())
        os.utime(path)  # most recently used, for eviction after a restart too
        return data

    def put(self, key: bytes, data: bytes) -> None:
        blob = pack(data)
        if len(blob) > self.budget or key.hex() in self._files:
            return
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)  # readers see the old state or the whole new file, never half of it
        self._files[key.hex()] = len(blob)
        self.used += len(blob)
        while self.used > self.budget and self._files:
            old, size = self._files.popitem(last=False)
            self.used -= size
            self.stats.evicted += 1
            with contextlib.suppress(OSError):
                (self.root / old[:2] / f"{old}.kv").unlink()

    def discard(self, key: bytes) -> None:
        size = self._files.pop(key.hex(), None)
        if size is not None:
            self.used -= size
        with contextlib.suppress(OSError):
            self._path(key).unlink()


@dataclass
class LookupResult:
    blocks: list[bytes]
    tiers: list[str]  # where each block was found
    seconds: float


@dataclass
class KVPool:
    tiers: list[MemoryTier | DiskTier]
    policy: str = "through"  # or "back"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.policy not in ("through", "back"):
            raise ValueError(f"write policy must be through or back, got {self.policy!r}")
        if self.policy == "back" and len(self.tiers) > 1 and isinstance(self.tiers[0], MemoryTier):
            lower = self.tiers[1:]

            def spill(key: bytes, data: bytes) -> None:
                for tier in lower:
                    tier.put(key, data)
                    tier.stats.bytes_written += len(data)

            self.tiers[0].on_evict = spill

    def lookup(self, keys: Sequence[bytes]) -> LookupResult:
        """The longest run of leading blocks the pool holds, promoted into faster tiers."""
        t0 = time.perf_counter()
        found, where = [], []
        with self._lock:
            for key in keys:
                for i, tier in enumerate(self.tiers):
                    data = tier.get(key)
                    if data is not None:
                        tier.stats.hits += 1
                        tier.stats.bytes_read += len(data)
                        for faster in self.tiers[:i]:
                            faster.put(key, data)
                        found.append(data)
                        where.append(tier.name)
                        break
                    tier.stats.misses += 1
                else:
                    break
        return LookupResult(found, where, time.perf_counter() - t0)

    def store(self, keys: Sequence[bytes], blocks: Sequence[bytes]) -> None:
        with self._lock:
            targets = self.tiers if self.policy == "through" else self.tiers[:1]
            for key, data in zip(keys, blocks, strict=True):
                for tier in targets:
                    tier.put(key, data)
                    tier.stats.bytes_written += len(data)
