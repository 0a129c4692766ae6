"""Layer-wise KV push: the prefill worker streams a request's KV to a decode worker chosen up front,
sending layer i while it computes layer i+1, so that when prefill ends only the last layer is left
to cross the link (the pull path moves everything after prefill ends).

Over the decode worker's KV port (kv/tcp.py framing, same authentication):

    pusher -> {"op": "push", "push_id", "num_tokens", "digest", "shape", "dtype", "nbytes"}
    decode -> {"ok": True}        once the decode request with that push_id has reserved its blocks
    pusher -> layer 0's bytes, layer 1's, ... as each layer is computed (raw, in export order)
    pusher -> {"xxh3": ..., "first_token_ids": [...]}
    decode -> {"ok": True}

The bytes land straight in the reserved cache blocks. The two sides meet by push id: whichever
of the decode request and the pusher's connection arrives first waits for the other
(`PushSlots`). A failure anywhere fails the decode request; the prefill keeps its blocks under the
usual lease, so the proxy can still fall back to a pull.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from disagg.kv.framing import CHUNK, KVTransferError, checksum, read_frame, recv_views, send_frame
from disagg.kv.netem import Link

_END = object()


class Pusher:
    """Sends one request's KV to a decode worker's KV port from a thread of its own. The engine
    thread hands it each layer's views as the layer is computed (`layer_done`); `finish` gives the
    first token(s); `result` resolves when the decode side has confirmed, or fails."""

    def __init__(self, session: Callable[[str, int, Callable[[socket.socket], Any]], Any], host: str, port: int,
                 head: dict[str, Any], num_layers: int, link: Link | None = None) -> None:
        self.head, self.num_layers = head, num_layers
        self.link = link or Link()
        self.sent = 0
        self.result: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._q: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._run, args=(session, host, port), name="disagg-kv-push", daemon=True).start()

    def layer_done(self, layer: int, views: list[memoryview]) -> None:
        self._q.put((layer, views))

    def finish(self, first_token_ids: list[int]) -> None:
        self._q.put((_END, first_token_ids))

    def abort(self) -> None:
        self._q.put(None)

    def _next(self) -> Any:
        item = self._q.get()
        if item is None:
            raise KVTransferError("push aborted")
        return item

    def _run(self, session: Callable[..., Any], host: str, port: int) -> None:
        try:
            self.result.set_result(session(host, port, self._push))
        except BaseException as e:
            self.result.set_exception(e if isinstance(e, KVTransferError) else KVTransferError(f"push failed: {e!r}"))

    def _push(self, sock: socket.socket) -> int:
        send_frame(sock, {"op": "push", "request_id": self.head["push_id"], **self.head})
        reply = read_frame(sock)
        if not reply.get("ok"):
            raise KVTransferError(f"decode worker refused the push: {reply.get('error')}")
        crc, pacer = checksum(), self.link.pacer()
        for expected in range(self.num_layers):
            layer, views = self._next()
            if layer != expected:
                raise KVTransferError(f"layer {layer} came before layer {expected}")
            for view in views:
                for off in range(0, view.nbytes, CHUNK):
                    chunk = view[off : off + CHUNK]
                    crc.update(chunk)
                    pacer.send(sock, chunk)
                    self.sent += chunk.nbytes
        tag, first = self._next()
        if tag is not _END:
            raise KVTransferError("a layer came after the last one")
        send_frame(sock, {"xxh3": crc.intdigest(), "first_token_ids": list(first)})
        reply = read_frame(sock)
        if not reply.get("ok"):
            raise KVTransferError(f"decode worker rejected the pushed KV: {reply.get('error')}")
        return self.sent


@dataclass
class PushMeta:
    """What a pusher announces, checked before any byte is accepted."""

    push_id: str
    num_tokens: int
    digest: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def parse(cls, msg: dict[str, Any], dtypes: dict[str, Any]) -> PushMeta:
        pid, shape, dtype = msg.get("push_id"), msg.get("shape"), msg.get("dtype")
        if not (isinstance(pid, str) and 0 < len(pid) <= 128 and isinstance(msg.get("num_tokens"), int)
                and msg["num_tokens"] > 0 and isinstance(msg.get("digest"), str)
                and isinstance(shape, list) and 0 < len(shape) <= 8
                and all(isinstance(d, int) and d > 0 for d in shape) and dtype in dtypes
                and msg.get("nbytes") == math.prod(shape) * dtypes[dtype].itemsize):
            raise KVTransferError("malformed push header")
        return cls(pid, msg["num_tokens"], msg["digest"], tuple(shape), dtype, msg["nbytes"])


@dataclass
class _Slot:
    reserved: asyncio.Future[tuple[Any, list[memoryview]]]  # (what the pusher must match, views)
    done: asyncio.Future[list[int]]  # the first token ids, once the KV is in
    claimed: bool = False


@dataclass
class PushSlots:
    """The decode side's meeting point between decode requests and pushers, by push id. Runs on
    the worker's event loop."""

    wait: float = 30.0  # how long either side waits for the other
    _slots: dict[str, _Slot] = field(default_factory=dict)

    def _slot(self, push_id: str) -> _Slot:
        slot = self._slots.get(push_id)
        if slot is None:
            loop = asyncio.get_running_loop()
            slot = self._slots[push_id] = _Slot(loop.create_future(), loop.create_future())
        return slot

    async def expect(self, push_id: str, expected: Any, views: list[memoryview]) -> list[int]:
        """The decode request: its blocks are reserved; wait for the KV. Returns token 1's ids."""
        slot = self._slot(push_id)
        try:
            slot.reserved.set_result((expected, views))
            return await asyncio.wait_for(asyncio.shield(slot.done), self.wait)
        except TimeoutError:
            raise KVTransferError(f"no KV was pushed for {push_id} within {self.wait:g} s") from None
        finally:
            self._slots.pop(push_id, None)

    async def accept(self, meta: PushMeta, check: Callable[[Any, PushMeta], None]) -> list[memoryview]:
        """The pusher: wait for the decode request, check the announced KV fits it, get the views."""
        slot = self._slot(meta.push_id)
        if slot.claimed:
            raise KVTransferError(f"push {meta.push_id} is already being received")
        slot.claimed = True
        try:
            expected, views = await asyncio.wait_for(asyncio.shield(slot.reserved), self.wait)
            check(expected, meta)
        except BaseException as e:
            self.fail(meta.push_id, e if isinstance(e, KVTransferError) else KVTransferError(repr(e)))
            if not slot.reserved.done():  # no decode request came: nobody else will clear the slot
                self._slots.pop(meta.push_id, None)
            if isinstance(e, TimeoutError):
                raise KVTransferError(f"no decode request is waiting for push {meta.push_id}") from None
            raise
        return views

    def complete(self, push_id: str, first_token_ids: list[int]) -> None:
        slot = self._slots.get(push_id)
        if slot is not None and not slot.done.done():
            slot.done.set_result(first_token_ids)

    def fail(self, push_id: str, error: BaseException) -> None:
        """Fail the push; a decode request that has not arrived yet finds the failure waiting (for
        as long as it would itself wait) instead of waiting in vain."""
        slot = self._slots.get(push_id)
        if slot is None:
            slot = self._slot(push_id)
            asyncio.get_running_loop().call_later(self.wait, self._slots.pop, push_id, None)
        if not slot.done.done():
            slot.done.set_exception(error)
            slot.done.exception()  # retrieved: nobody may be waiting yet


def receive(conn: socket.socket, msg: dict[str, Any], call: Callable[[Any], Any], slots: PushSlots,
            check: Callable[[Any, PushMeta], None], dtypes: dict[str, Any]) -> int:
    """The decode side of one push, on a KV-port connection thread; returns the bytes received.
    `call` runs a coroutine on the worker's event loop and waits for it."""
    try:
        meta = PushMeta.parse(msg, dtypes)
    except KVTransferError as e:
        send_frame(conn, {"ok": False, "error": str(e)})
        return 0
    try:
        views = call(slots.accept(meta, check))
    except KVTransferError as e:
        send_frame(conn, {"ok": False, "error": str(e)})
        return 0
    try:
        if sum(v.nbytes for v in views) != meta.nbytes:
            raise KVTransferError("pushed KV does not fit the reserved blocks")
        send_frame(conn, {"ok": True})
        crc = recv_views(conn, views)
        trailer = read_frame(conn)
        first = trailer.get("first_token_ids")
        if trailer.get("xxh3") != crc:
            raise KVTransferError("pushed KV checksum mismatch")
        if not (isinstance(first, list) and 0 < len(first) <= 16 and all(isinstance(t, int) for t in first)):
            raise KVTransferError("malformed first_token_ids in the push trailer")
    except BaseException as e:
        err = e if isinstance(e, KVTransferError) else KVTransferError(f"push connection failed: {e!r}")
        call(_run(lambda: slots.fail(meta.push_id, err)))
        if isinstance(e, KVTransferError):
            send_frame(conn, {"ok": False, "error": str(e)})
            return 0
        raise
    call(_run(lambda: slots.complete(meta.push_id, first)))
    send_frame(conn, {"ok": True})
    return meta.nbytes


async def _run(fn: Callable[[], None]) -> None:
    fn()
