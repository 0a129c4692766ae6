"""Remote prefill by pull (vLLM's protocol).

Producer (a prefill request, kv_transfer_params.do_remote_decode): when it ends after token 1, its
blocks are held under a lease (held.py) and its answer says where: this worker's KV port, the
block ids, the request id, the token count and dtype.

Consumer (a decode request carrying such an answer): at admission it asks to load the prompt's
tokens beyond what its prefix cache (and a pool before it, composite.py) already holds; once its
blocks are allocated, a transport thread pulls just those blocks into them and the producer
releases its copy. A pull that fails, or brings KV computed from other tokens, is recomputed
instead. While the request waits for blocks the lease is renewed (at a third of its length), so
the KV outlives the wait.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from disagg.engine.connector.base import Ending, Finished, KVConnector, KVMetrics, LoadResult, NoMetrics
from disagg.engine.connector.held import HeldKV
from disagg.engine.connector.target import LoadTarget
from disagg.engine.kv_cache import PagedKVCache
from disagg.engine.sequence import Sequence
from disagg.kv.address import Address, is_loopback
from disagg.kv.block_hash import tokens_digest
from disagg.kv.framing import KVTransferError
from disagg.kv.transport import Transport, dtype_name

log = logging.getLogger("disagg.kv.pull")

FIRST_RENEWAL = 1.0  # seconds before a waiting request first renews a lease of unknown length


@dataclass
class _Source:
    address: Address
    remote_id: str
    transport: Transport
    num_tokens: int
    digest: str  # of the prompt tokens the KV must have been computed from
    renew_at: float
    loading: bool = False


class PullConnector(KVConnector):
    def __init__(self, cache: PagedKVCache, held: HeldKV, transports: dict[str, Transport], port: Address,
                 served: str, engine_id: str, secret: bool, metrics: KVMetrics | None = None) -> None:
        """`transports`: by name, "tcp" among them; `port`: this worker's KV port, served over
        `served` (what prefill answers name); `secret`: whether pulls beyond loopback may happen."""
        self.cache, self.held, self.transports = cache, held, transports
        self.port, self.served, self.engine_id, self.secret = port, served, engine_id, secret
        self.metrics = metrics or NoMetrics()
        self.block_size = cache.block_size
        self._sources: dict[str, _Source] = {}
        self._planned: list[tuple[str, _Source, int, LoadTarget, int]] = []
        self._done: dict[str, tuple[LoadResult, LoadTarget]] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="disagg-kv-pull")

    # ---- producer ----

    def request_finished(self, seq: Sequence) -> Ending:
        with self._lock:
            source = self._sources.pop(seq.request_id, None)
        if source is not None and not source.loading:  # never pulled (aborted, or cached here after all)
            self._pool.submit(self._release, source)
        kv = seq.kv
        if kv is None or not kv.do_remote_decode or seq.finish_reason != "length":
            return Ending()  # token 1 ended the request (or it was aborted): nothing to hand over
        n = seq.num_prompt_tokens
        blocks = seq.block_table[: -(-n // self.block_size)]
        self.held.hold(seq.request_id, blocks, n, tokens_digest(seq.prompt_token_ids))
        return Ending(hold=True, params={
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
            "remote_host": self.port.host, "remote_port": self.port.port, "remote_block_ids": blocks,
            "remote_request_id": seq.request_id, "num_tokens": n, "kv_dtype": dtype_name(self.cache.dtype),
            "kv_transport": self.served, "lease_s": self.held.lease, "first_token_ids": seq.output_token_ids})

    def release(self, request_id: str) -> bool:
        return self.held.release(request_id)

    # ---- consumer ----

    def request_added(self, seq: Sequence) -> None:
        kv = seq.kv
        if kv is None or not kv.pulls:
            return
        if not is_loopback(kv.remote_host) and not self.secret:
            # a request must not make this worker connect anywhere it likes: beyond loopback, only to
            # KV ports that share our secret
            log.warning("refusing a KV pull from %s without DISAGG_KV_SECRET; recomputing", kv.remote_host)
            self.metrics.load_failed()
            return
        transport = self.transports.get(kv.kv_transport)
        if transport is None or not transport.reaches(kv.remote_host):
            transport = self.transports["tcp"]
        n = kv.num_tokens or seq.num_prompt_tokens
        first_renewal = kv.lease_s / 3 if kv.lease_s else FIRST_RENEWAL
        source = _Source(Address(kv.remote_host, kv.remote_port), kv.remote_request_id, transport, n,
                         tokens_digest(seq.prompt_token_ids[:n]), time.monotonic() + first_renewal)
        if n > seq.num_prompt_tokens:  # KV of another prompt: of no use here, nor to anyone else
            log.warning("KV for %d tokens offered to a %d-token prompt; recomputing", n, seq.num_prompt_tokens)
            self.metrics.load_failed()
            self._pool.submit(self._release, source)
            return
        with self._lock:
            self._sources[seq.request_id] = source

    def num_loadable_tokens(self, seq: Sequence, computed: int) -> int | None:
        source = self._sources.get(seq.request_id)
        return 0 if source is None or source.loading else max(0, source.num_tokens - computed)

    def on_allocated(self, seq: Sequence, start: int, count: int) -> None:
        with self._lock:
            source = self._sources.get(seq.request_id)
            if source is None and not count:  # nothing of ours (every admitted request comes here)
                return
            if not count:  # held here already: the producer may let go of it now
                del self._sources[seq.request_id]
                self._pool.submit(self._release, source)
                return
            first = start // self.block_size
            target = LoadTarget(self.cache, seq.block_table[first : -(-(start + count) // self.block_size)])
            if source is None or source.loading:
                # lost since the scheduler asked (a renewal found the KV gone): a load of nothing, so
                # that the request, waiting for it, goes on to recompute
                self._done[seq.request_id] = (LoadResult(0), target)
                self.notify()
                return
            source.loading = True
        self._planned.append((seq.request_id, source, first, target, count))

    def start_load(self) -> None:
        planned, self._planned = self._planned, []
        for job in planned:
            self._pool.submit(self._pull, *job)

    def _pull(self, rid: str, source: _Source, first: int, target: LoadTarget, count: int) -> None:
        try:
            pulled = source.transport.pull(source.address, source.remote_id, first, target.views,
                                           self.cache.export_shape(-1))
            if pulled.num_tokens != source.num_tokens or pulled.digest != source.digest:
                raise KVTransferError(f"KV from {source.address} was computed from other tokens than this prompt")
            self.metrics.received(pulled.wire_bytes, source.transport.name)
            result = LoadResult(count, via=source.transport.name)
        except Exception as e:  # any failure: the prompt is recomputed, the request carries on
            log.warning("%s; recomputing the prompt instead", e if isinstance(e, KVTransferError) else repr(e))
            self.metrics.load_failed()
            result = LoadResult(0)
        with self._lock:
            self._done[rid] = (result, target)
        self.notify()

    def take_finished(self) -> Finished:
        with self._lock:
            done, self._done = self._done, {}
        finished = Finished(released=self.held.take_released())
        for rid, (result, target) in done.items():
            target.commit(-(-result.tokens // self.block_size))
            finished.loads[rid] = result
        with self._lock:
            for rid in done:
                self._sources.pop(rid, None)
        return finished

    def has_finished(self) -> bool:
        return bool(self._done) or self.held.has_released()

    # ---- housekeeping ----

    def tick(self, now: float) -> None:
        self.held.expire(now)
        with self._lock:
            due = [(rid, s) for rid, s in self._sources.items() if not s.loading and s.renew_at <= now]
            for _, source in due:
                source.renew_at = float("inf")  # until the renewal answers
        for rid, source in due:
            self._pool.submit(self._renew, rid, source)

    def _renew(self, rid: str, source: _Source) -> None:
        try:
            lease = source.transport.renew(source.address, source.remote_id)
        except KVTransferError as e:
            lease = None
            log.warning("could not renew the lease of %s's KV: %s", rid, e)
        if lease is None:  # the producer let go of it: recompute
            self._lose(rid, source)
        else:
            source.renew_at = time.monotonic() + lease / 3

    def _lose(self, rid: str, source: _Source) -> None:
        """The KV at `source` is gone (any thread): `rid` will recompute instead of loading it."""
        with self._lock:
            if self._sources.get(rid) is source and not source.loading:
                del self._sources[rid]
                self.metrics.load_failed()

    def _release(self, source: _Source) -> None:
        try:
            source.transport.release(source.address, source.remote_id)
        except KVTransferError as e:
            log.warning("could not release KV at %s: %s (its lease will)", source.address, e)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
