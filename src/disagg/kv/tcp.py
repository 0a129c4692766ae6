"""KV over plain TCP: a prefill worker serves its held blocks, a decode worker pulls them.

Frames are a 4-byte big-endian length and a msgpack map; tensor bytes follow a header frame raw.
Never pickle. A session:

    server -> {"challenge": hex or None}
    client -> {"op": "auth", "mac": hex}            only when challenged (HMAC-SHA256 of the nonce)
    client -> {"op": "pull", "request_id": id}
    server -> {"ok": True, "num_tokens", "digest", "shape", "dtype", "nbytes"} + nbytes raw bytes + {"xxh3"}
    client -> {"op": "release", "request_id": id}
    server -> {"ok": True}
    client -> {"op": "renew", "request_id": id}     a decode still waiting for cache blocks
    server -> {"ok": True, "lease_s": seconds}

With "via": "shm" the header gives shared memory to copy from (kv/shm.py): the server's KV
cache itself when it lives there, else a segment the server filled. With "via": "nixl" it
carries the server's NIXL agent metadata and memory regions, and the client READs them
(kv/nixl.py). Either way the client answers {"op": "done"} when it has the bytes, so the server
knows the memory is free to reuse.

The payload moves with blocking sockets on worker threads: `sendall` straight from the exported
tensor's memory, `recv_into` straight into the tensor the decode side imports, so no Python object
ever holds a copy of it. The checksum (XXH3-64) goes in a trailer frame, computed chunk by chunk as the bytes
pass, while they are in cache, on both sides. The async API (`KVServer.start`, `KVClient.pull`) wraps those threads.

A shared secret (DISAGG_KV_SECRET) turns the challenge on; binding anywhere but loopback requires
one. Every header field from the network is checked before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import os
import secrets
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from disagg.kv import push
from disagg.kv.codecs import CODECS, decode, encode
from disagg.kv.framing import (
    CHUNK,
    KVTransferError,
    challenge_mac,
    checksum,
    read_frame,
    recv_views,
    send_frame,
    views_checksum,
)
from disagg.kv.netem import Link
from disagg.kv.nixl import NixlAgent, view_regions
from disagg.kv.push import PushMeta, PushSlots
from disagg.kv.shm import SegmentPool, SegmentReader, SharedMemory, check_address

MAX_PAYLOAD = 64 << 30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PART_DTYPES = DTYPES | {"int8": torch.int8, "uint8": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass(frozen=True)
class KVPayload:
    """KV of a request's first `num_tokens` tokens: one tensor, or (sending from a CPU cache) its
    bytes in export order as `chunks`, with `shape` and `dtype` saying what they make up."""

    data: torch.Tensor | None
    num_tokens: int
    digest: str = ""  # of the tokens the KV was computed from
    chunks: tuple[memoryview, ...] = ()
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    wire_bytes: int = 0  # what crossed the transport (after a codec)

    def wire(self) -> tuple[tuple[memoryview, ...], tuple[int, ...], torch.dtype]:
        if self.chunks:
            return self.chunks, self.shape, self.dtype
        return (tensor_bytes(self.data),), tuple(self.data.shape), self.data.dtype


Destination = Callable[[tuple[int, ...], torch.dtype], "list[memoryview] | None"]


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (moved to the CPU and made contiguous only if it is not already)."""
    flat = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


class KVServer:
    """Serves held KV on a TCP port. `export(request_id)` returns the payload; `release(request_id)`
    frees the blocks; both are coroutines of the caller's event loop, run there from the
    connection threads."""

    def __init__(self, export: Callable[[str], Awaitable[KVPayload]], release: Callable[[str], Awaitable[bool]],
                 secret: str | None = None, on_sent: Callable[[int], None] | None = None,
                 link: Link | None = None, renew: Callable[[str], Awaitable[float | None]] | None = None,
                 nixl: NixlAgent | None = None, push_slots: PushSlots | None = None,
                 push_check: Callable[[Any, PushMeta], None] | None = None) -> None:
        self._export, self._release, self._secret = export, release, secret
        self.push_slots, self._push_check = push_slots, push_check  # a decode worker receiving pushed KV
        self._renew = renew
        self.nixl = nixl  # set (also after start) to serve "via": "nixl"
        self._on_sent = on_sent or (lambda n: None)
        self.link = link or Link()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = threading.Event()
        self._segments = SegmentPool()
        self.arena: SharedMemory | None = None  # shared memory holding the KV cache, if it does
        self._conns: set[socket.socket] = set()  # open sessions, closed with the server
        self._conns_lock = threading.Lock()

    async def start(self, host: str, port: int) -> int:
        if not is_loopback(host) and not self._secret:
            raise KVTransferError(f"the KV port binds {host}, beyond loopback: set DISAGG_KV_SECRET")
        self._loop = asyncio.get_running_loop()
        self._sock = socket.create_server((host, port), backlog=128)
        threading.Thread(target=self._accept, name="disagg-kv-accept", daemon=True).start()
        return self._sock.getsockname()[1]

    async def close(self) -> None:
        self._closed.set()
        self._segments.close()
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
            threading.Thread(target=self._serve, args=(conn,), name="disagg-kv-conn", daemon=True).start()

    def _call(self, coro: Awaitable[Any], timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def _serve(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                nonce = secrets.token_hex(16) if self._secret else None
                send_frame(conn, {"challenge": nonce})
                if nonce is not None:
                    msg = read_frame(conn)
                    answer = msg.get("mac")
                    if msg.get("op") != "auth" or not isinstance(answer, str) or not hmac.compare_digest(
                            answer, challenge_mac(self._secret, nonce)):
                        send_frame(conn, {"ok": False, "error": "authentication failed"})
                        return
                while True:
                    msg = read_frame(conn)
                    op, rid = msg.get("op"), msg.get("request_id")
                    if not isinstance(rid, str) or len(rid) > 256:
                        send_frame(conn, {"ok": False, "error": "request_id must be a string"})
                    elif op == "pull":
                        codec = msg.get("codec", "none")
                        if codec not in CODECS:
                            send_frame(conn, {"ok": False, "error": f"unknown codec {codec!r}"})
                        else:
                            self._send(conn, rid, via=msg.get("via"), codec=codec)
                    elif op == "release":
                        send_frame(conn, {"ok": bool(self._call(self._release(rid)))})
                    elif op == "push" and self.push_slots is not None:
                        # bounded by the slots' own wait, which may exceed _call's default
                        push.receive(conn, msg, lambda c: self._call(c, None), self.push_slots, self._push_check,
                                     DTYPES)
                    elif op == "cancel_push" and self.push_slots is not None:
                        self._call(self._cancel(rid))
                        send_frame(conn, {"ok": True})
                    elif op == "renew":
                        lease = self._call(self._renew(rid)) if self._renew is not None else None
                        send_frame(conn, {"ok": lease is not None, "lease_s": lease})
                    else:
                        send_frame(conn, {"ok": False, "error": f"unknown op {op!r}"})
            except (OSError, ConnectionError, KVTransferError, msgpack.UnpackException, ValueError):
                return
            finally:
                with self._conns_lock:
                    self._conns.discard(conn)

    async def _cancel(self, push_id: str) -> None:
        self.push_slots.fail(push_id, KVTransferError("the proxy cancelled the push"))

    def _send(self, conn: socket.socket, rid: str, via: Any = "tcp", codec: str = "none") -> None:
        if via == "nixl" and (self.nixl is None or codec != "none"):
            send_frame(conn, {"ok": False, "error": "this KV server does not serve NIXL" if self.nixl is None
                              else "NIXL moves KV as is: no wire codec"})
            return
        try:
            payload = self._call(self._export(rid))
        except Exception as e:
            send_frame(conn, {"ok": False, "error": str(e)})
            return
        views, shape, dtype = payload.wire()
        parts_meta = None
        if codec != "none":  # the wire carries the codec's parts, back to back
            parts = encode(codec, _assemble(views, shape, dtype))
            views = tuple(tensor_bytes(t) for t in parts.values())
            parts_meta = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in parts.items()]
        nbytes = sum(v.nbytes for v in views)
        head = {"ok": True, "num_tokens": payload.num_tokens, "digest": payload.digest, "shape": list(shape),
                "dtype": str(dtype).removeprefix("torch."), "nbytes": nbytes, "codec": codec, "parts": parts_meta}
        if via == "shm":
            regions = self.arena.regions(views) if self.arena is not None else None
            if regions is not None:  # straight out of the cache: the reader makes the only copy
                send_frame(conn, head | {"shm": self.arena.address(), "regions": regions,
                                         "xxh3": views_checksum(views)})
                read_frame(conn)  # the reader says when it is done
            else:
                with self._segments.lend(nbytes) as seg:
                    crc = seg.fill(views)
                    send_frame(conn, head | {"shm": seg.address(), "regions": [[0, nbytes]], "xxh3": crc})
                    read_frame(conn)  # the segment is lent until the reader is done
            self._on_sent(nbytes)
            return
        if via == "nixl":
            regions = view_regions(views)
            # views of the cache are registered already; a copy (exported from a GPU cache) is not
            temp = None if self.nixl.covers(regions) else self.nixl.register(regions)
            try:
                send_frame(conn, head | {"xxh3": views_checksum(views), "nixl": {
                    "agent": self.nixl.name, "md": self.nixl.metadata(), "regions": [list(r) for r in regions],
                    "mem": "DRAM"}})
                read_frame(conn)  # the reader is done with the memory
            finally:
                if temp is not None:
                    self.nixl.deregister(temp)
            self._on_sent(nbytes)
            return
        send_frame(conn, head)
        crc, pacer = checksum(), self.link.pacer()
        for view in views:
            for off in range(0, view.nbytes, CHUNK):
                chunk = view[off : off + CHUNK]
                crc.update(chunk)
                pacer.send(conn, chunk)
        send_frame(conn, {"xxh3": crc.intdigest()})
        self._on_sent(nbytes)


class KVClient:
    """Pulls KV from KV servers. Authenticated connections are kept (up to `max_idle` a server)
    and reused, so a pull costs no connect or challenge round trips."""

    def __init__(self, secret: str | None = None, timeout: float = 30.0, max_idle: int = 4,
                 nixl: NixlAgent | None = None) -> None:
        self._secret = secret if secret is not None else os.environ.get("DISAGG_KV_SECRET")
        self.timeout = timeout
        self.nixl = nixl  # needed to pull "via": "nixl"
        self.max_idle = max_idle
        self._segments = SegmentReader()
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._idle_lock = threading.Lock()

    def close(self) -> None:
        with self._idle_lock:
            for socks in self._idle.values():
                for s in socks:
                    s.close()
            self._idle.clear()

    @property
    def has_secret(self) -> bool:
        return bool(self._secret)

    async def pull(self, host: str, port: int, request_id: str, expected_shape: tuple[int, ...] | None = None,
                   release: bool = True, into: Destination | None = None, via: str = "tcp",
                   codec: str = "none") -> KVPayload:
        """Fetch a request's KV and (by default) tell the server to free it. `into(shape, dtype)`
        may give the memory to receive into (in export order); the result's data is then None.
        `via`: tcp; shm, through a shared-memory segment (same host only); or nixl (needs this
        client's `nixl` agent, with `into`'s memory registered). `codec`: compress on the wire
        (kv/codecs.py); the KV then arrives as a tensor, never in place."""
        return await asyncio.to_thread(self.pull_blocking, host, port, request_id, expected_shape, release, into,
                                       via, codec)

    async def release(self, host: str, port: int, request_id: str) -> bool:
        """Tell a KV server to free a request's held blocks without pulling them."""
        return await asyncio.to_thread(self._session, host, port, lambda s: self._release(s, request_id))

    async def cancel_push(self, host: str, port: int, push_id: str) -> None:
        """Tell a decode worker that the KV it waits for under `push_id` will not come."""
        def cancel(sock: socket.socket) -> None:
            send_frame(sock, {"op": "cancel_push", "request_id": push_id})
            read_frame(sock)

        await asyncio.to_thread(self._session, host, port, cancel)

    def session(self, host: str, port: int, work: Callable[[socket.socket], Any]) -> Any:
        """Run `work` on an authenticated connection to a KV port (kept for reuse afterwards)."""
        return self._session(host, port, work)

    async def renew(self, host: str, port: int, request_id: str) -> float | None:
        """Ask a KV server to keep holding a request's blocks; the new lease in seconds, or None
        when it no longer holds them."""
        def renew(sock: socket.socket) -> float | None:
            send_frame(sock, {"op": "renew", "request_id": request_id})
            reply = read_frame(sock)
            lease = reply.get("lease_s")
            return float(lease) if reply.get("ok") and isinstance(lease, (int, float)) and lease > 0 else None

        return await asyncio.to_thread(self._session, host, port, renew)

    def pull_blocking(self, host: str, port: int, request_id: str, expected: tuple[int, ...] | None = None,
                      release: bool = True, into: Destination | None = None, via: str = "tcp",
                      codec: str = "none") -> KVPayload:
        if via == "shm" and not is_loopback(host):
            raise KVTransferError(f"shared memory needs both workers on one host, not {host}")
        if via == "nixl" and self.nixl is None:
            raise KVTransferError("this client has no NIXL agent")

        def pull(sock: socket.socket) -> KVPayload:
            send_frame(sock, {"op": "pull", "request_id": request_id, "via": via, "codec": codec})
            head = read_frame(sock)
            if not head.get("ok"):
                raise KVTransferError(f"KV server refused: {head.get('error')}")
            shape, dtype, parts = self._check(head, expected, codec)
            views = into(shape, dtype) if into is not None and not parts else None
            buf = None
            if views is None:
                buf = torch.empty(head["nbytes"], dtype=torch.uint8)
                views = [memoryview(buf.numpy())]
            elif sum(v.nbytes for v in views) != head["nbytes"]:
                raise KVTransferError("KV payload does not fit the memory given for it")
            if via == "shm":
                try:
                    crc = self._segments.read_into(check_address(head.get("shm")), head.get("regions"), views)
                finally:
                    send_frame(sock, {"op": "done"})
                expected_crc = head.get("xxh3")
            elif via == "nixl":
                try:
                    crc = self._nixl_read(head, views)
                finally:
                    send_frame(sock, {"op": "done"})
                expected_crc = head.get("xxh3")
            else:
                crc = recv_views(sock, views)
                expected_crc = read_frame(sock).get("xxh3")
            if expected_crc != crc:
                raise KVTransferError("KV payload checksum mismatch")
            if release:
                self._release(sock, request_id)
            if parts:
                data = _decode_parts(codec, buf, parts, shape, dtype)
            else:
                data = None if buf is None else buf.view(dtype).reshape(shape)
            return KVPayload(data, head["num_tokens"], str(head.get("digest", "")), shape=shape, dtype=dtype,
                             wire_bytes=head["nbytes"])

        return self._session(host, port, pull)

    def _nixl_read(self, head: dict[str, Any], views: list[memoryview]) -> int:
        """READ the server's regions into `views` through NIXL; returns the XXH3 of what arrived."""
        meta = head.get("nixl")
        if not (isinstance(meta, dict) and isinstance(meta.get("agent"), str) and len(meta["agent"]) <= 128
                and isinstance(meta.get("md"), bytes) and meta.get("mem") in ("DRAM", "VRAM")
                and isinstance(meta.get("regions"), list) and all(
                    isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) and x >= 0 for x in r) and r[1] > 0
                    for r in meta["regions"])):
            raise KVTransferError("malformed NIXL header")
        remote = [tuple(r) for r in meta["regions"]]
        local = view_regions(views)
        handle = None if self.nixl.covers(local) else self.nixl.register(local)
        try:
            self.nixl.read(meta["agent"], meta["md"], remote, meta["mem"], local, "DRAM", self.timeout)
        finally:
            if handle is not None:
                self.nixl.deregister(handle)
        return views_checksum(views)

    def _release(self, sock: socket.socket, request_id: str) -> bool:
        send_frame(sock, {"op": "release", "request_id": request_id})
        return bool(read_frame(sock).get("ok"))

    def _session(self, host: str, port: int, work: Callable[[socket.socket], Any]) -> Any:
        sock = None
        try:
            sock = self._checkout(host, port) or self._connect(host, port)
            result = work(sock)
        except (OSError, ConnectionError, msgpack.UnpackException, ValueError) as e:
            if sock is not None:
                sock.close()
            raise KVTransferError(f"KV transfer with {host}:{port} failed: {e!r}") from e
        except BaseException:
            if sock is not None:  # mid-protocol: the connection's state is unknown
                sock.close()
            raise
        with self._idle_lock:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < self.max_idle:
                idle.append(sock)
                sock = None
        if sock is not None:
            sock.close()
        return result

    def _connect(self, host: str, port: int) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = read_frame(sock)
            if hello.get("challenge"):
                if not self._secret:
                    raise KVTransferError("the KV server wants a secret: set DISAGG_KV_SECRET")
                send_frame(sock, {"op": "auth", "mac": challenge_mac(self._secret, str(hello["challenge"]))})
        except BaseException:
            sock.close()
            raise
        return sock

    def _checkout(self, host: str, port: int) -> socket.socket | None:
        """An idle connection to the server that is still open (a closed one reads as EOF)."""
        while True:
            with self._idle_lock:
                idle = self._idle.get((host, port))
                if not idle:
                    return None
                sock = idle.pop()
            try:
                sock.setblocking(False)
                alive = False
                try:
                    sock.recv(1, socket.MSG_PEEK)  # b"" (closed) or stray bytes: not reusable
                except BlockingIOError:
                    alive = True
                sock.settimeout(self.timeout)
            except OSError:
                alive = False
            if alive:
                return sock
            sock.close()

    @staticmethod
    def _check(head: dict[str, Any], expected: tuple[int, ...] | None,
               codec: str) -> tuple[tuple[int, ...], torch.dtype, list[tuple[str, torch.dtype, tuple[int, ...]]]]:
        shape, dtype, nbytes = head.get("shape"), DTYPES.get(head.get("dtype")), head.get("nbytes")
        if not (_is_shape(shape) and dtype is not None and isinstance(nbytes, int)
                and isinstance(head.get("num_tokens"), int)):
            raise KVTransferError("malformed KV header")
        parts = []
        if codec != "none":
            if head.get("codec") != codec or not isinstance(head.get("parts"), list):
                raise KVTransferError(f"the KV server did not encode with {codec}")
            for meta in head["parts"]:
                if not (isinstance(meta, list) and len(meta) == 3 and isinstance(meta[0], str)
                        and meta[1] in PART_DTYPES and _is_shape(meta[2], allow_zero=True)):
                    raise KVTransferError("malformed KV part")
                parts.append((meta[0], PART_DTYPES[meta[1]], tuple(meta[2])))
            wire = sum(math.prod(s) * d.itemsize for _, d, s in parts)
        else:
            wire = math.prod(shape) * dtype.itemsize
        if nbytes != wire or nbytes > MAX_PAYLOAD:
            raise KVTransferError("KV header size does not match its shape")
        if expected is not None and (len(shape) != len(expected) or any(
                e not in (-1, s) for e, s in zip(expected, shape, strict=True))):
            raise KVTransferError(f"KV shape {shape} does not fit this engine ({list(expected)})")
        return tuple(shape), dtype, parts


def _is_shape(shape: Any, allow_zero: bool = False) -> bool:
    return isinstance(shape, list) and len(shape) <= 8 and all(
        isinstance(d, int) and (d >= 0 if allow_zero else d > 0) for d in shape)


def _assemble(views: tuple[memoryview, ...], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor from byte views in export order (a copy)."""
    buf = torch.empty(sum(v.nbytes for v in views), dtype=torch.uint8)
    off = 0
    for v in views:
        buf[off : off + v.nbytes] = torch.frombuffer(v, dtype=torch.uint8)
        off += v.nbytes
    return buf.view(dtype).reshape(shape)


def _decode_parts(codec: str, buf: torch.Tensor, parts: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    named, off = {}, 0
    for name, d, s in parts:
        n = math.prod(s) * d.itemsize
        named[name] = buf[off : off + n].view(d).reshape(s)
        off += n
    try:
        return decode(codec, named, shape, dtype)
    except (RuntimeError, KeyError, ValueError) as e:
        raise KVTransferError(f"KV parts do not decode with {codec}: {e}") from e
