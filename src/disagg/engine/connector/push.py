"""Remote prefill by layer-wise push (the wire protocol is kv/push.py).

Producer (a prefill request naming push_id/push_host/push_port): a pusher thread connects to the
decode worker's KV port as soon as the request is queued; as the prompt's last chunk passes layer
i, layer i is handed over, and when the request ends its token 1 follows. A confirmed push frees
the held blocks at once (held.py); a failed one leaves them held for the proxy's fallback pull. A
push that has already failed when the request ends is not announced, so the proxy pulls at once.

Consumer (a decode request with do_remote_prefill and a push_id): it waits, like a pulled request,
in WAITING_FOR_KV with blocks for the prompt's tokens beyond what it holds already; the pusher's
connection meets it by push id (either may come first), is told to skip the blocks held here, and
writes straight into the request's blocks. A push that does not come within `wait` seconds, is
cancelled by the proxy, or fails, fails the decode request (the proxy then pulls).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from disagg.engine.connector.base import Ending, Finished, KVConnector, KVMetrics, LoadResult, NoMetrics
from disagg.engine.connector.held import HeldKV
from disagg.engine.connector.target import LoadTarget
from disagg.engine.kv_cache import PagedKVCache
from disagg.engine.sequence import Sequence
from disagg.kv.address import Address, is_loopback
from disagg.kv.block_hash import tokens_digest
from disagg.kv.framing import KVTransferError
from disagg.kv.transport import DTYPES, PushHeader, Transport, dtype_name

log = logging.getLogger("disagg.kv.push")

PUSH_STALL = 600.0  # a pusher waiting this long for its prefill to go on gives up


class Pusher:
    """One request's push, from a thread of its own: the transport pulls layers and token 1 from
    it (the PushSource of kv/transport.py) while the engine hands them over."""

    def __init__(self, header: PushHeader, cache: PagedKVCache, transport: Transport, address: Address,
                 on_end: Callable[[Pusher, int | None, str | None], None]) -> None:
        self.header, self.cache = header, cache
        self.blocks: list[int] = []
        self._layers_ready = -1  # layers handed over so far, minus one
        self._first: list[int] | None = None
        self._aborted = False
        self.failed = False
        self.pinned = False  # the held blocks are pinned for this push until it ends
        self._cond = threading.Condition()
        threading.Thread(target=self._run, args=(transport, address, on_end), name="disagg-kv-push",
                         daemon=True).start()

    def layer_ready(self, layer: int, blocks: list[int]) -> None:
        with self._cond:
            self.blocks, self._layers_ready = blocks, layer
            self._cond.notify_all()

    def finish(self, first_token_ids: list[int], pin: Callable[[], bool]) -> bool:
        """The request ended after token 1: pin its held blocks for the rest of the push and hand
        token 1 over. False if the push has failed already (nothing to announce)."""
        with self._cond:
            if self.failed or not pin():
                return False
            self.pinned = True
            self._first = first_token_ids
            self._cond.notify_all()
        return True

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def _wait(self, ready: Callable[[], bool]) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._aborted, PUSH_STALL) or self._aborted:
                raise KVTransferError("push abandoned: the prefill request ended without it")

    def layer(self, index: int, from_block: int) -> list[memoryview]:
        self._wait(lambda: self._layers_ready >= index)
        return self.cache.block_views(self.blocks[from_block:], range(index, index + 1))

    def first_token_ids(self) -> list[int]:
        self._wait(lambda: self._first is not None)
        return self._first

    def _run(self, transport: Transport, address: Address, on_end: Callable[..., None]) -> None:
        try:
            sent = transport.push(address, self)
        except Exception as e:
            with self._cond:  # from here on finish() announces nothing
                self.failed = True
            on_end(self, None, str(e))
        else:
            on_end(self, sent, None)


@dataclass
class _Slot:
    """A decode request waiting for a push, and the pusher's connection once it arrives."""

    request_id: str
    num_tokens: int
    digest: str
    deadline: float
    target: LoadTarget | None = None  # once the request has its blocks
    first_block: int = 0
    count: int = 0
    nbytes: int = 0
    abort: Callable[[], None] | None = None  # once bytes are arriving: stops the receive
    result: LoadResult | None = None


class PushConnector(KVConnector):
    def __init__(self, cache: PagedKVCache, held: HeldKV, transport: Transport, wait: float, secret: bool,
                 metrics: KVMetrics | None = None) -> None:
        self.cache, self.held, self.transport, self.wait, self.secret = cache, held, transport, wait, secret
        self.metrics = metrics or NoMetrics()
        self.block_size = cache.block_size
        self._pushers: dict[str, Pusher] = {}
        self._slots: dict[str, _Slot] = {}  # by push id
        self._cancelled: dict[str, float] = {}  # push ids cancelled before their request came, until when
        self._done: dict[str, LoadResult] = {}
        self._cond = threading.Condition()

    # ---- producer ----

    def request_added(self, seq: Sequence) -> None:
        kv = seq.kv
        if kv is not None and kv.pushes:
            self._start_pusher(seq)
        elif kv is not None and kv.awaits_push:
            self._expect(seq)

    def _start_pusher(self, seq: Sequence) -> None:
        kv = seq.kv
        if self.cache.device.type != "cpu":  # layers of a GPU cache would need a copy each: pull instead
            return
        if not is_loopback(kv.push_host) and not self.secret:
            log.warning("refusing to push KV to %s without DISAGG_KV_SECRET", kv.push_host)
            return
        n = seq.num_prompt_tokens
        header = PushHeader(kv.push_id, n, tokens_digest(seq.prompt_token_ids),
                            self.cache.export_shape(-(-n // self.block_size)), dtype_name(self.cache.dtype))
        self._pushers[seq.request_id] = Pusher(header, self.cache, self.transport,
                                               Address(kv.push_host, kv.push_port),
                                               lambda p, sent, err, rid=seq.request_id: self._pushed(rid, p, sent, err))

    def _pushed(self, rid: str, pusher: Pusher, sent: int | None, error: str | None) -> None:
        """On the pusher's thread: a confirmed push frees the held blocks; a failed one leaves them
        held (under a fresh lease) for the proxy's fallback pull."""
        if pusher.pinned:
            self.held.export_done(rid, 0)
        if error is not None:
            log.warning("KV push for %s failed: %s; its KV stays held for a pull", rid, error)
            return
        self.metrics.sent(sent)
        self.held.release(rid)

    def wants_layers(self, seqs: list[Sequence]) -> bool:
        return any(s.request_id in self._pushers for s in seqs)

    def save_layer(self, layer: int, seqs: list[Sequence]) -> None:
        for seq in seqs:
            pusher = self._pushers.get(seq.request_id)
            if pusher is not None:
                pusher.layer_ready(layer, seq.block_table[: -(-seq.num_prompt_tokens // self.block_size)])

    def request_finished(self, seq: Sequence) -> Ending:
        self._forget_slot(seq)
        pusher = self._pushers.pop(seq.request_id, None)
        if pusher is None:
            return Ending()
        if seq.finish_reason != "length" or not pusher.finish(seq.output_token_ids,
                                                             lambda: self.held.pin(seq.request_id)):
            pusher.abort()  # token 1 ended it, or the push is lost already: no push to announce
            return Ending()
        return Ending(params={"push_id": pusher.header.push_id})

    # ---- consumer ----

    def _expect(self, seq: Sequence) -> None:
        pid = seq.kv.push_id
        slot = _Slot(seq.request_id, seq.num_prompt_tokens, tokens_digest(seq.prompt_token_ids),
                     time.monotonic() + self.wait)
        with self._cond:
            error = (f"push {pid} is already awaited by another request" if pid in self._slots
                     else "the proxy cancelled the push" if self._cancelled.pop(pid, None) is not None else None)
            if error is None:
                self._slots[pid] = slot
            else:  # a failed transfer, counted as one whichever came first, the cancel or the request
                self.metrics.load_failed()
                self._done[seq.request_id] = LoadResult(0, error=error)
            self._cond.notify_all()
        self.notify()

    def _slot_of(self, seq: Sequence) -> _Slot | None:
        kv = seq.kv
        slot = self._slots.get(kv.push_id) if kv is not None and kv.awaits_push else None
        return slot if slot is not None and slot.request_id == seq.request_id else None

    def num_loadable_tokens(self, seq: Sequence, computed: int) -> int | None:
        slot = self._slot_of(seq)
        return 0 if slot is None or slot.result is not None else max(0, slot.num_tokens - computed)

    def on_allocated(self, seq: Sequence, start: int, count: int) -> None:
        with self._cond:
            slot = self._slot_of(seq)
            if slot is None or not count:
                return
            first = start // self.block_size
            blocks = seq.block_table[first : -(-(start + count) // self.block_size)]
            slot.target, slot.first_block, slot.count = LoadTarget(self.cache, blocks), first, count
            self._cond.notify_all()

    def accept_push(self, header: PushHeader, abort: Callable[[], None]) -> tuple[list[memoryview], int]:
        """On a KV-port thread: wait for the decode request to have its blocks, check the push fits."""
        with self._cond:
            ready = self._cond.wait_for(lambda: (s := self._slots.get(header.push_id)) is not None and (
                s.target is not None or s.result is not None), self.wait)
            slot = self._slots.get(header.push_id)
            if not ready or slot is None or slot.result is not None or slot.abort is not None:
                raise KVTransferError(f"no decode request is waiting for push {header.push_id}")
            blocks = -(-slot.num_tokens // self.block_size)
            if (header.num_tokens, header.digest, header.shape) != (
                    slot.num_tokens, slot.digest, self.cache.export_shape(blocks)):
                self._end(slot, LoadResult(0, error="pushed KV does not match the waiting request (tokens or shape)"))
                raise KVTransferError("pushed KV does not match the waiting request (tokens, shape or dtype)")
            try:
                views = slot.target.views(self.cache.export_shape(len(slot.target.block_ids)), DTYPES[header.dtype])
            except Exception as e:  # e.g. no memory for a staging buffer: the request must not wait on
                self._end(slot, LoadResult(0, error=f"cannot receive the pushed KV: {e!r}"))
                raise KVTransferError(f"cannot receive the pushed KV: {e!r}") from e
            slot.abort = abort
            slot.nbytes = sum(v.nbytes for v in views)
            return views, slot.first_block

    def push_done(self, push_id: str, first_token_ids: list[int] | None, error: str | None = None) -> None:
        with self._cond:
            slot = self._slots.get(push_id)
            if slot is None:
                return
            if error is not None:
                self._end(slot, LoadResult(0, error=f"pushed KV did not arrive: {error}"))
                return
            self._end(slot, LoadResult(slot.count, tuple(first_token_ids), via="push"))
        self.metrics.received(slot.nbytes, "push")

    def cancel_push(self, push_id: str) -> None:
        with self._cond:
            slot = self._slots.get(push_id)
            if slot is None:  # the decode request has not come yet: it will find the cancellation
                self._cancelled[push_id] = time.monotonic() + self.wait
            elif slot.abort is not None:
                slot.abort()  # bytes are arriving: stop them; the receive then reports the failure
            else:
                self._end(slot, LoadResult(0, error="the proxy cancelled the push"))

    def _end(self, slot: _Slot, result: LoadResult, failure: bool = True) -> None:
        """Under the lock: the slot's one and only result (an error counts as a failed transfer,
        unless the request itself ended)."""
        if slot.result is None:
            if result.error and failure:
                self.metrics.load_failed()
            slot.result = result
            self._done[slot.request_id] = result
            self._cond.notify_all()
            self.notify()

    def _forget_slot(self, seq: Sequence) -> None:
        """The decode request ended: a push still to come is refused; one arriving is stopped."""
        with self._cond:
            slot = self._slot_of(seq)
            if slot is None:
                return
            if slot.abort is not None and slot.result is None:
                slot.abort()
            elif slot.result is None:
                self._end(slot, LoadResult(0, error="the request ended"), failure=False)
            if slot.result is not None:
                del self._slots[seq.kv.push_id]

    def take_finished(self) -> Finished:
        with self._cond:
            done, self._done = self._done, {}
            for pid in [pid for pid, s in self._slots.items() if s.request_id in done]:
                slot = self._slots.pop(pid)
                if slot.target is not None:
                    slot.target.commit(-(-slot.result.tokens // self.block_size))
        return Finished(loads=done)

    def has_finished(self) -> bool:
        return bool(self._done)

    def tick(self, now: float) -> None:
        with self._cond:
            for slot in self._slots.values():
                if slot.deadline <= now and slot.abort is None and slot.result is None:
                    self._end(slot, LoadResult(0, error=f"no KV was pushed within {self.wait:g} s"))
            self._cancelled = {pid: t for pid, t in self._cancelled.items() if t > now}

    def close(self) -> None:
        for pusher in list(self._pushers.values()):
            pusher.abort()
