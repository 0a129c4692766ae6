"""The KV pool as a connector: load a prompt's longest pooled prefix, store what the pool lacks.

Before a request is queued (`prepare`, on the caller's thread) the pool says how many leading
blocks of the prompt it holds, reading none of them. At admission, if that beats the engine's own
prefix cache, the blocks beyond it are read on the pool's thread straight into the request's
blocks (a block that has vanished or is corrupt ends the load there: the rest is recomputed). Once
a prompt is computed here, its full blocks the pool lacks are copied and handed to a writer thread,
unless that writer is `MAX_PENDING` prompts behind (each waiting copy holds memory).

Requests whose KV came from a prefill worker are not stored: the prefill stored them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import torch

from disagg.engine.connector.base import Finished, KVConnector, KVMetrics, LoadResult, NoMetrics
from disagg.engine.connector.target import LoadTarget
from disagg.engine.kv_cache import BLOCK_DIM, PagedKVCache
from disagg.engine.sequence import Sequence
from disagg.kv.pool import KVPool

log = logging.getLogger("disagg.kv.pool")

MAX_PENDING = 8  # prompts waiting for the pool writer beyond which new ones are not kept


class PoolConnector(KVConnector):
    prepares = True

    def __init__(self, pool: KVPool, cache: PagedKVCache, metrics: KVMetrics | None = None) -> None:
        self.pool, self.cache = pool, cache
        self.metrics = metrics or NoMetrics()
        self.block_size = cache.block_size
        self._planned: list[tuple[str, list[bytes], LoadTarget]] = []
        self._done: dict[str, tuple[LoadResult, LoadTarget]] = {}
        self._lock = threading.Lock()
        self._reader = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="disagg-kv-pool-read")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disagg-kv-pool-write")
        self._pending = 0  # prompts copied for the writer, not yet written

    @staticmethod
    def _remote(seq: Sequence) -> bool:
        return seq.kv is not None and seq.kv.do_remote_prefill

    def prepare(self, seq: Sequence) -> None:
        keys = seq.block_hashes[: seq.num_prompt_tokens // self.block_size]
        seq.num_pooled_blocks = self.pool.leading(keys) if keys else 0

    def num_loadable_tokens(self, seq: Sequence, computed: int) -> int | None:
        blocks = seq.num_pooled_blocks
        if seq.kv is not None and seq.kv.awaits_push:
            # token 1 comes with the push, so the push must have a share: its last block at least
            blocks = min(blocks, (seq.num_prompt_tokens - 1) // self.block_size)
        return max(0, blocks * self.block_size - computed)

    def on_allocated(self, seq: Sequence, start: int, count: int) -> None:
        if not count:
            return
        first, end = start // self.block_size, (start + count) // self.block_size
        target = LoadTarget(self.cache, seq.block_table[first:end])
        self._planned.append((seq.request_id, seq.block_hashes[first:end], target))

    def start_load(self) -> None:
        planned, self._planned = self._planned, []
        for job in planned:
            self._reader.submit(self._load, *job)

    def _load(self, rid: str, keys: list[bytes], target: LoadTarget) -> None:
        size = self.cache.block_bytes
        n = 0
        try:
            hit = self.pool.lookup(keys)
            for i, blob in enumerate(hit.blocks):
                if len(blob) != size:  # another model's or another dtype's: a miss
                    break
                target.write_block(i, blob)
                n += 1
            self.metrics.pool_loaded(n * self.block_size, hit.seconds)
        except Exception as e:  # the pool never fails a request: what did not load is recomputed
            log.warning("KV pool load failed: %r", e)
        with self._lock:
            self._done[rid] = (LoadResult(n * self.block_size, via="pool"), target)
        self.notify()

    def take_finished(self) -> Finished:
        with self._lock:
            done, self._done = self._done, {}
        finished = Finished()
        for rid, (result, target) in done.items():
            target.commit(result.tokens // self.block_size)
            finished.loads[rid] = result
        return finished

    def has_finished(self) -> bool:
        return bool(self._done)

    def step_done(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            full = seq.num_prompt_tokens // self.block_size
            pooled = seq.num_pooled_blocks
            if pooled < full and not self._remote(seq):
                seq.num_pooled_blocks = full  # stored once, even if preempted and recomputed
                self._store(seq.block_hashes[pooled:full], seq.block_table[pooled:full])

    def _store(self, keys: list[bytes], blocks: list[int]) -> None:
        """On the engine thread: copy the blocks for the writer, unless it is too far behind."""
        with self._lock:
            if self._pending >= MAX_PENDING:
                self.metrics.pool_write_dropped()
                return
            self._pending += 1
        self._writer.submit(self._write, keys, self.cache.read_blocks(blocks))

    def _write(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """On the writer thread: split the prompt's full blocks and store them."""
        try:
            cpu = kv.to("cpu").contiguous()
            del kv
            blocks = [cpu.narrow(BLOCK_DIM, j, 1).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      for j in range(cpu.shape[BLOCK_DIM])]
            self.pool.store(keys[: len(blocks)], blocks)
        except Exception as e:
            log.warning("KV pool store failed: %r", e)
        finally:
            with self._lock:
                self._pending -= 1

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=True)
