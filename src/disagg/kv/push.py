"""Layer-wise KV push on the wire: a prefill worker streams a request's KV to a decode worker chosen
up front, sending layer i while it computes layer i+1, so that when prefill ends only the last
layer is left to cross (a pull moves everything after prefill ends).

Over the decode worker's KV port (kv/tcp.py framing and authentication):

    pusher -> {"op": "push", "request_id": push_id, "push_id", "num_tokens", "digest", "shape", "dtype"}
    decode -> {"ok": True, "from_block": k}   once the decode request waiting for this push has its
                                              blocks; k leading blocks it holds already (prefix cache,
                                              pool) are not sent
    pusher -> layer 0's bytes of blocks k.., layer 1's, ... as each layer is computed (export order)
    pusher -> {"xxh3": ..., "first_token_ids": [...]}
    decode -> {"ok": True}

The bytes land straight in the decode request's blocks. A failure anywhere fails the decode
request; the prefill keeps its blocks under the usual lease, so the proxy can still fall back to a
pull.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from disagg.kv.framing import KVTransferError, checksum, read_frame, recv_views, send_frame, send_views
from disagg.kv.netem import Pacer
from disagg.kv.transport import KVPortHandler, PushHeader, PushSource

MAX_FIRST_TOKENS = 16


def send(sock: socket.socket, source: PushSource, pacer: Pacer) -> int:
    """The pusher's side of one push; returns the bytes sent."""
    header = source.header
    send_frame(sock, {"op": "push", "request_id": header.push_id, **header.to_wire()})
    reply = read_frame(sock)
    if not reply.get("ok"):
        raise KVTransferError(f"decode worker refused the push: {reply.get('error')}")
    from_block = reply.get("from_block")
    if not isinstance(from_block, int) or not 0 <= from_block <= header.shape[3]:
        raise KVTransferError("decode worker answered the push with a malformed from_block")
    crc = checksum()
    sent = sum(send_views(sock, source.layer(layer, from_block), crc, pacer) for layer in range(header.shape[0]))
    send_frame(sock, {"xxh3": crc.intdigest(), "first_token_ids": source.first_token_ids()})
    reply = read_frame(sock)
    if not reply.get("ok"):
        raise KVTransferError(f"decode worker rejected the pushed KV: {reply.get('error')}")
    return sent


def receive(conn: socket.socket, msg: dict[str, Any], handler: KVPortHandler) -> None:
    """The decode side of one push, on a KV-port connection thread."""
    try:
        header = PushHeader.from_wire(msg)
        views, from_block = handler.accept_push(header, abort=lambda: _shut(conn))
    except KVTransferError as e:
        send_frame(conn, {"ok": False, "error": str(e)})
        return
    # the waiting request's blocks are being written from here on: push_done on every path
    try:
        if sum(v.nbytes for v in views) != header.layer_bytes(from_block) * header.shape[0]:
            raise KVTransferError("pushed KV does not fit the waiting request's blocks")
        send_frame(conn, {"ok": True, "from_block": from_block})
        crc = recv_views(conn, views)
        trailer = read_frame(conn)
        first = trailer.get("first_token_ids")
        if trailer.get("xxh3") != crc:
            raise KVTransferError("pushed KV checksum mismatch")
        if not (isinstance(first, list) and 0 < len(first) <= MAX_FIRST_TOKENS
                and all(isinstance(t, int) and not isinstance(t, bool) for t in first)):
            raise KVTransferError("malformed first_token_ids in the push trailer")
    except BaseException as e:
        handler.push_done(header.push_id, None, str(e) if isinstance(e, KVTransferError) else f"push failed: {e!r}")
        if isinstance(e, KVTransferError):
            with contextlib.suppress(OSError):
                send_frame(conn, {"ok": False, "error": str(e)})
            return
        raise
    handler.push_done(header.push_id, first)
    send_frame(conn, {"ok": True})


def _shut(conn: socket.socket) -> None:
    """Wake a receive blocked on this connection (the push was cancelled)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
