"""KV over TCP: the control channel of every transport, and the bulk bytes inline.

Frames are a 4-byte big-endian length and a msgpack map (kv/framing.py); bulk bytes go raw between
frames. Never pickle. A session:

    server -> {"challenge": hex or None}
    client -> {"op": "auth", "mac": hex}        only when challenged (HMAC-SHA256 of the nonce)
    client -> {"op": "pull", "request_id", "from_block", "via", "codec"}
    server -> {"ok": True, "num_tokens", "digest", "shape", "dtype", "nbytes", "codec", "parts"} and
              then the bytes of blocks from_block on, as the mover named by "via" moves them
    client -> {"op": "release" | "renew", "request_id"}      server -> {"ok", "lease_s"}
    client -> {"op": "push", ...}                             kv/push.py
    client -> {"op": "cancel_push", "request_id": push_id}   server -> {"ok": True}

How the bulk bytes of a pull move is a `Mover`: inline here ("tcp": `sendall` straight from the
cache's memory, `recv_into` straight into the decode's cache blocks, an XXH3 trailer computed as
the bytes pass), or through shared memory (kv/shm.py) or NIXL (kv/nixl.py). The server serves
every mover it was given; a client transport uses one.

A shared secret (DISAGG_KV_SECRET) turns the challenge on (binding beyond loopback needs one).
Every field from the network is checked before use; a frame's memory grows only as it arrives."""

from __future__ import annotations

import contextlib
import hmac
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from disagg.kv import codecs, push
from disagg.kv.address import Address, is_loopback
from disagg.kv.framing import (
    KVTransferError,
    challenge_mac,
    checksum,
    read_frame,
    recv_views,
    send_frame,
    send_views,
)
from disagg.kv.netem import Link, Pacer
from disagg.kv.transport import (
    DTYPES,
    Destination,
    KVPortHandler,
    Pulled,
    PushSource,
    check_shape,
    dtype_name,
    is_shape,
    tensor_bytes,
)

MAX_PAYLOAD = 64 << 30
# A port's connections: the handshake (at most AUTH_FRAME bytes from the peer) must be done within
# HANDSHAKE_TIMEOUT, and no read after it waits longer than IDLE_TIMEOUT (a push waits for prefill
# to compute each layer; the pusher gives up after as long). A silent peer costs a thread that long.
AUTH_FRAME = 4096
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
MAX_CONNECTIONS = 256  # served at once, a thread each (more are closed on arrival); a peer keeps ~4


class Mover(Protocol):
    """How one pull's bulk bytes cross, once the control channel has agreed on them."""

    name: str

    def reaches(self, host: str) -> bool: ...

    def send(self, conn: socket.socket, head: dict[str, Any], views: tuple[memoryview, ...], pacer: Pacer) -> None:
        """Server: make the bytes available to the client (head first), until it has them."""
        ...

    def receive(self, conn: socket.socket, head: dict[str, Any], views: list[memoryview]) -> int:
        """Client: get the bytes into `views`; returns their checksum, checked against the server's."""
        ...


class Inline:
    """The bytes follow the header on the socket itself, then a checksum trailer."""

    name = "tcp"

    def reaches(self, host: str) -> bool:
        return True

    def send(self, conn: socket.socket, head: dict[str, Any], views: tuple[memoryview, ...], pacer: Pacer) -> None:
        send_frame(conn, head)
        crc = checksum()
        send_views(conn, views, crc, pacer)
        send_frame(conn, {"xxh3": crc.intdigest()})

    def receive(self, conn: socket.socket, head: dict[str, Any], views: list[memoryview]) -> int:
        crc = recv_views(conn, views)
        if read_frame(conn).get("xxh3") != crc:
            raise KVTransferError("KV payload checksum mismatch")
        return crc


class TcpPort:
    """A worker's KV port: serves `handler` to authenticated clients, one thread per connection."""

    def __init__(self, handler: KVPortHandler, movers: dict[str, Mover], secret: str | None = None,
                 link: Link | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.handler, self.movers, self._secret = handler, movers, secret
        self.handshake_timeout, self.idle_timeout = handshake_timeout, idle_timeout
        self.max_connections = max_connections
        self.refused = 0  # connections closed on arrival because max_connections were open
        self.link = link or Link()
        self.address = Address("", 0)
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()  # open sessions, shut with the port
        self._conns_lock = threading.Lock()
        self._ops: dict[str, Callable[[socket.socket, dict[str, Any], str], None]] = {
            "pull": self._pull, "release": self._release, "renew": self._renew, "cancel_push": self._cancel_push,
            "push": lambda conn, msg, rid: push.receive(conn, msg, self.handler)}

    def start(self, host: str, port: int) -> TcpPort:
        if not is_loopback(host) and not self._secret:
            raise KVTransferError(f"the KV port binds {host}, beyond loopback: set DISAGG_KV_SECRET")
        self._sock = socket.create_server((host, port), backlog=128)
        self.address = Address(host, self._sock.getsockname()[1])
        threading.Thread(target=self._accept, name="disagg-kv-accept", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._conns_lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)  # counted from here, before its thread starts
            if full:
                self.refused += 1
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="disagg-kv-conn", daemon=True).start()

    def _authenticated(self, conn: socket.socket) -> bool:
        nonce = secrets.token_hex(16) if self._secret else None
        send_frame(conn, {"challenge": nonce})
        if nonce is None:
            return True
        msg = read_frame(conn, limit=AUTH_FRAME)
        answer = msg.get("mac")
        if msg.get("op") == "auth" and isinstance(answer, str) and hmac.compare_digest(
                answer, challenge_mac(self._secret, nonce)):
            return True
        send_frame(conn, {"ok": False, "error": "authentication failed"})
        return False

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn.settimeout(self.handshake_timeout)
                if not self._authenticated(conn):
                    return
                conn.settimeout(self.idle_timeout)
                while True:
                    msg = read_frame(conn)
                    rid, op = msg.get("request_id"), self._ops.get(msg.get("op"))
                    if not isinstance(rid, str) or not 0 < len(rid) <= 256:
                        send_frame(conn, {"ok": False, "error": "request_id must be a string"})
                    elif op is None:
                        send_frame(conn, {"ok": False, "error": f"unknown op {msg.get('op')!r}"})
                    else:
                        op(conn, msg, rid)
            except (OSError, ConnectionError, KVTransferError, msgpack.UnpackException, ValueError):
                return
            finally:
                with self._conns_lock:
                    self._conns.discard(conn)

    def _pull(self, conn: socket.socket, msg: dict[str, Any], rid: str) -> None:
        codec, from_block, mover = msg.get("codec", "none"), msg.get("from_block", 0), self.movers.get(msg.get("via"))
        error = ("this KV port does not serve " + repr(msg.get("via")) if mover is None
                 else f"unknown codec {codec!r}" if codec not in codecs.CODECS
                 else "a wire codec needs the bytes inline (tcp)" if codec != "none" and mover.name != "tcp"
                 else "from_block must be an integer >= 0" if not isinstance(from_block, int) or from_block < 0
                 else None)
        if error:
            send_frame(conn, {"ok": False, "error": error})
            return
        try:
            kv = self.handler.export(rid, from_block)
        except KVTransferError as e:
            send_frame(conn, {"ok": False, "error": str(e)})
            return
        sent = 0
        try:
            views, parts = kv.wire(), None
            if codec != "none":  # the wire carries the codec's parts, back to back
                encoded = codecs.encode(codec, codecs.assemble(views, kv.shape, kv.dtype))
                views = tuple(tensor_bytes(t) for t in encoded.values())
                parts = [[name, dtype_name(t.dtype), list(t.shape)] for name, t in encoded.items()]
            nbytes = sum(v.nbytes for v in views)
            mover.send(conn, {"ok": True, "num_tokens": kv.num_tokens, "digest": kv.digest, "shape": list(kv.shape),
                              "dtype": dtype_name(kv.dtype), "nbytes": nbytes, "codec": codec, "parts": parts},
                       views, self.link.pacer())
            sent = nbytes
        finally:
            self.handler.export_done(rid, sent)

    def _release(self, conn: socket.socket, msg: dict[str, Any], rid: str) -> None:
        send_frame(conn, {"ok": self.handler.release(rid)})

    def _renew(self, conn: socket.socket, msg: dict[str, Any], rid: str) -> None:
        lease = self.handler.renew(rid)
        send_frame(conn, {"ok": lease is not None, "lease_s": lease})

    def _cancel_push(self, conn: socket.socket, msg: dict[str, Any], rid: str) -> None:
        self.handler.cancel_push(rid)
        send_frame(conn, {"ok": True})


class Sessions:
    """Authenticated connections to KV ports, kept (up to `max_idle` a port) and reused, so a
    pull costs no connect or challenge round trips. Shared by the transports of one worker."""

    def __init__(self, secret: str | None = None, timeout: float = 30.0, max_idle: int = 4) -> None:
        self.secret, self.timeout, self.max_idle = secret, timeout, max_idle
        self._idle: dict[Address, list[socket.socket]] = {}
        self._lock = threading.Lock()

    def run(self, address: Address, work: Callable[[socket.socket], Any]) -> Any:
        """`work(sock)` on a connection to `address`, kept for reuse if it completes."""
        sock = None
        try:
            sock = self._checkout(address) or self._connect(address)
            result = work(sock)
        except (OSError, ConnectionError, msgpack.UnpackException, ValueError) as e:
            if sock is not None:
                sock.close()
            raise KVTransferError(f"KV transfer with {address} failed: {e!r}") from e
        except BaseException:
            if sock is not None:  # mid-protocol: the connection's state is unknown
                sock.close()
            raise
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < self.max_idle:
                idle.append(sock)
                return result
        sock.close()
        return result

    def close(self) -> None:
        with self._lock:
            for socks in self._idle.values():
                for s in socks:
                    s.close()
            self._idle.clear()

    def _connect(self, address: Address) -> socket.socket:
        sock = socket.create_connection((address.host, address.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = read_frame(sock)
            if hello.get("challenge"):
                if not self.secret:
                    raise KVTransferError("the KV port wants a secret: set DISAGG_KV_SECRET")
                send_frame(sock, {"op": "auth", "mac": challenge_mac(self.secret, str(hello["challenge"]))})
        except BaseException:
            sock.close()
            raise
        return sock

    def _checkout(self, address: Address) -> socket.socket | None:
        """An idle connection to the port that is still open (a closed one reads as EOF)."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                sock = idle.pop()
            try:
                sock.setblocking(False)
                try:
                    sock.recv(1, socket.MSG_PEEK)  # b"" (closed) or stray bytes: not reusable
                    alive = False
                except BlockingIOError:
                    alive = True
                sock.settimeout(self.timeout)
            except OSError:
                alive = False
            if alive:
                return sock
            sock.close()


class TcpTransport:
    """Pulls through one mover (inline by default) over `sessions`; pushes, releases, renewals and
    cancellations always go over the control channel itself."""

    def __init__(self, sessions: Sessions | None = None, mover: Mover | None = None, codec: str = "none",
                 link: Link | None = None) -> None:
        self.sessions = sessions or Sessions()
        self.mover = mover or Inline()
        self.name = self.mover.name
        if codec not in codecs.CODECS or (codec != "none" and self.name != "tcp"):
            raise KVTransferError(f"codec {codec!r} does not apply to the {self.name} transport")
        self.codec = codec
        self.link = link or Link()

    def reaches(self, host: str) -> bool:
        return self.mover.reaches(host)

    def pull(self, address: Address, request_id: str, from_block: int, into: Destination,
             expected_shape: tuple[int, ...]) -> Pulled:
        if not self.reaches(address.host):
            raise KVTransferError(f"the {self.name} transport does not reach {address.host}")

        def pull(sock: socket.socket) -> Pulled:
            send_frame(sock, {"op": "pull", "request_id": request_id, "from_block": from_block, "via": self.name,
                              "codec": self.codec})
            head = read_frame(sock)
            if not head.get("ok"):
                raise KVTransferError(f"KV port refused: {head.get('error')}")
            shape, dtype, parts = _check_head(head, expected_shape, self.codec)
            if parts:  # coded on the wire: decoded here, then copied where it goes
                dest = into(shape, dtype)  # first: it checks the blocks fit, before memory is taken
                buf = codecs.receive_buffer(head["nbytes"])
                self.mover.receive(sock, head, [memoryview(buf.numpy())])
                codecs.copy_into(codecs.decode_parts(self.codec, buf, parts, shape, dtype), dest)
            else:
                views = into(shape, dtype)
                if sum(v.nbytes for v in views) != head["nbytes"]:
                    raise KVTransferError("KV payload does not fit the memory given for it")
                self.mover.receive(sock, head, views)
            _release(sock, request_id)
            return Pulled(head["num_tokens"], str(head.get("digest", "")), head["nbytes"])

        return self.sessions.run(address, pull)

    def release(self, address: Address, request_id: str) -> bool:
        return self.sessions.run(address, lambda sock: _release(sock, request_id))

    def renew(self, address: Address, request_id: str) -> float | None:
        def renew(sock: socket.socket) -> float | None:
            send_frame(sock, {"op": "renew", "request_id": request_id})
            reply = read_frame(sock)
            lease = reply.get("lease_s")
            return float(lease) if reply.get("ok") and isinstance(lease, int | float) and lease > 0 else None

        return self.sessions.run(address, renew)

    def push(self, address: Address, source: PushSource) -> int:
        return self.sessions.run(address, lambda sock: push.send(sock, source, self.link.pacer()))

    def cancel_push(self, address: Address, push_id: str) -> None:
        def cancel(sock: socket.socket) -> None:
            send_frame(sock, {"op": "cancel_push", "request_id": push_id})
            read_frame(sock)

        self.sessions.run(address, cancel)

    def close(self) -> None:
        self.sessions.close()


def _release(sock: socket.socket, request_id: str) -> bool:
    send_frame(sock, {"op": "release", "request_id": request_id})
    return bool(read_frame(sock).get("ok"))


def _check_head(head: dict[str, Any], expected: tuple[int, ...],
                codec: str) -> tuple[tuple[int, ...], Any, list[tuple[str, Any, tuple[int, ...]]]]:
    shape, dtype, nbytes = head.get("shape"), DTYPES.get(head.get("dtype")), head.get("nbytes")
    if not (is_shape(shape, allow_zero=True) and dtype is not None and isinstance(nbytes, int)
            and isinstance(head.get("num_tokens"), int)):
        raise KVTransferError("malformed KV header")
    parts = codecs.check_parts(head, codec) if codec != "none" else []
    wire = codecs.parts_bytes(parts) if parts else codecs.nbytes(tuple(shape), dtype)
    if nbytes != wire or nbytes > MAX_PAYLOAD:
        raise KVTransferError("KV header size does not match its shape")
    check_shape(tuple(shape), expected)
    return tuple(shape), dtype, parts
