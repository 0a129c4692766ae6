"""Finished prefills whose KV blocks are held for a decode worker, each under a lease.

A held request keeps its blocks (the scheduler keeps it in `held`) until a decode worker has pulled
them and says release, a push of them is confirmed, or its lease runs out unrenewed. Pulls read the
blocks from the KV port's threads while the engine runs: a held block's contents never change, and
an export (or a push still sending them) pins its request so that the lease cannot run out
mid-transfer. Releases are queued here
and applied by the engine at its next step boundary (it is woken for them).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from disagg.engine.connector.base import KVMetrics, NoMetrics
from disagg.engine.kv_cache import PagedKVCache
from disagg.kv.framing import KVTransferError
from disagg.kv.transport import Exported


@dataclass
class _Held:
    blocks: list[int]
    num_tokens: int
    digest: str
    expiry: float
    pins: int = 0  # exports in progress
    releasing: bool = False  # released while pinned: freed when the last export ends


class HeldKV:
    def __init__(self, cache: PagedKVCache, lease: float, metrics: KVMetrics | None = None) -> None:
        self.cache, self.lease = cache, lease
        self.metrics = metrics or NoMetrics()
        self.notify = lambda: None  # wakes the engine for a release
        self._held: dict[str, _Held] = {}
        self._released: list[str] = []
        self._lock = threading.Lock()

    def hold(self, request_id: str, blocks: list[int], num_tokens: int, digest: str) -> None:
        with self._lock:
            self._held[request_id] = _Held(list(blocks), num_tokens, digest, time.monotonic() + self.lease)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._held

    def pin(self, request_id: str) -> bool:
        """Keep a held request's blocks (lease or release notwithstanding) until `export_done`: a
        push still reading them. False if it is not held."""
        with self._lock:
            held = self._held.get(request_id)
            if held is None or held.releasing:
                return False
            held.pins += 1
        return True

    def export(self, request_id: str, from_block: int) -> Exported:
        """The held KV from block `from_block` on: views of the cache itself (CPU) or a copy (GPU)."""
        with self._lock:
            held = self._held.get(request_id)
            if held is None or held.releasing:
                raise KVTransferError(f"no KV held for request {request_id!r} (released or lease expired)")
            if from_block > len(held.blocks):
                raise KVTransferError(f"from_block {from_block} is past the {len(held.blocks)} blocks held")
            held.pins += 1
            held.expiry = time.monotonic() + self.lease  # renewed: never expires mid-transfer
        blocks = held.blocks[from_block:]
        shape = self.cache.export_shape(len(blocks))
        try:
            if self.cache.device.type == "cpu":
                return Exported(shape, self.cache.dtype, held.num_tokens, held.digest,
                                views=tuple(self.cache.block_views(blocks)))
            tensor = self.cache.read_blocks(blocks).cpu() if blocks else None
            return Exported(shape, self.cache.dtype, held.num_tokens, held.digest, tensor=tensor)
        except BaseException:
            self.export_done(request_id, 0)
            raise

    def export_done(self, request_id: str, nbytes: int) -> None:
        with self._lock:
            held = self._held.get(request_id)
            freed = False
            if held is not None:
                held.pins -= 1
                held.expiry = time.monotonic() + self.lease
                freed = held.releasing and not held.pins and self._free(request_id)
        if nbytes:
            self.metrics.sent(nbytes)
        if held is not None and freed:
            self.notify()

    def release(self, request_id: str) -> bool:
        """Free a held request's blocks: now, or when the exports reading them end."""
        with self._lock:
            held = self._held.get(request_id)
            if held is None or held.releasing:
                return False
            held.releasing = True
            freed = not held.pins and self._free(request_id)
        if freed:
            self.notify()
        return True

    def _free(self, request_id: str) -> bool:
        del self._held[request_id]
        self._released.append(request_id)
        return True

    def renew(self, request_id: str) -> float | None:
        with self._lock:
            held = self._held.get(request_id)
            if held is None:
                return None
            held.expiry = time.monotonic() + self.lease
        self.metrics.lease_renewed()
        return self.lease

    def expire(self, now: float) -> None:
        """Release what nobody pulled in time (not what is being pulled)."""
        with self._lock:
            gone = [rid for rid, h in self._held.items() if h.expiry <= now and not h.pins and not h.releasing]
            for rid in gone:
                self._free(rid)
        for _ in gone:
            self.metrics.lease_expired()
        if gone:
            self.notify()

    def take_released(self) -> list[str]:
        with self._lock:
            out, self._released = self._released, []
        return out

    def has_released(self) -> bool:
        return bool(self._released)
