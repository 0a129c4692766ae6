"""KV over plain TCP: a prefill worker serves its held blocks, a decode worker pulls them.

Frames are a 4-byte big-endian length and a msgpack map; tensor bytes follow a header frame raw.
Never pickle. A session:

    server -> {"challenge": hex or None}
    client -> {"op": "auth", "mac": hex}            only when challenged (HMAC-SHA256 of the nonce)
    client -> {"op": "pull", "request_id": id}
    server -> {"ok": True, "num_tokens", "digest", "shape", "dtype", "nbytes", "crc32"} + nbytes raw bytes
    client -> {"op": "release", "request_id": id}
    server -> {"ok": True}

A shared secret (DISAGG_KV_SECRET) turns the challenge on; binding anywhere but loopback requires
one. Every header field from the network is checked before use.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import os
import secrets
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from disagg.kv.netem import Link

MAX_FRAME = 1 << 20  # metadata frames are small; refuse anything bigger
MAX_PAYLOAD = 64 << 30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class KVTransferError(RuntimeError):
    """A pull failed: refused, unauthenticated, corrupt or timed out."""


@dataclass(frozen=True)
class KVPayload:
    data: torch.Tensor
    num_tokens: int
    digest: str = ""  # of the tokens the KV was computed from


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    if n > MAX_FRAME:
        raise KVTransferError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    obj = msgpack.unpackb(await reader.readexactly(n), raw=False, strict_map_key=True)
    if not isinstance(obj, dict):
        raise KVTransferError("frame is not a map")
    return obj


def _frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), bytes.fromhex(nonce), hashlib.sha256).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU copy of `t` (any dtype, bfloat16 included)."""
    flat = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


class KVServer:
    """Serves held KV on a TCP port. `export(request_id)` returns the payload; `release(request_id)`
    frees the blocks; both are coroutines supplied by the worker."""

    def __init__(self, export: Callable[[str], Awaitable[KVPayload]], release: Callable[[str], Awaitable[bool]],
                 secret: str | None = None, on_sent: Callable[[int], None] | None = None,
                 link: Link | None = None) -> None:
        self._export, self._release, self._secret = export, release, secret
        self.link = link or Link()
        self._on_sent = on_sent or (lambda n: None)
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> int:
        if not is_loopback(host) and not self._secret:
            raise KVTransferError(f"the KV port binds {host}, beyond loopback: set DISAGG_KV_SECRET")
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            nonce = secrets.token_hex(16) if self._secret else None
            writer.write(_frame({"challenge": nonce}))
            await writer.drain()
            if nonce is not None:
                msg = await _read_frame(reader)
                mac = msg.get("mac")
                if msg.get("op") != "auth" or not isinstance(mac, str) or not hmac.compare_digest(
                        mac, _mac(self._secret, nonce)):
                    writer.write(_frame({"ok": False, "error": "authentication failed"}))
                    return
            while True:
                try:
                    msg = await _read_frame(reader)
                except asyncio.IncompleteReadError:
                    return
                op, rid = msg.get("op"), msg.get("request_id")
                if not isinstance(rid, str) or len(rid) > 256:
                    writer.write(_frame({"ok": False, "error": "request_id must be a string"}))
                elif op == "pull":
                    await self._send(writer, rid)
                elif op == "release":
                    writer.write(_frame({"ok": await self._release(rid)}))
                else:
                    writer.write(_frame({"ok": False, "error": f"unknown op {op!r}"}))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, KVTransferError, msgpack.UnpackException):
            pass
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, rid: str) -> None:
        try:
            payload = await self._export(rid)
        except Exception as e:
            writer.write(_frame({"ok": False, "error": str(e)}))
            return
        raw = tensor_bytes(payload.data)
        writer.write(_frame({"ok": True, "num_tokens": payload.num_tokens, "digest": payload.digest,
                             "shape": list(payload.data.shape),
                             "dtype": str(payload.data.dtype).removeprefix("torch."), "nbytes": raw.nbytes,
                             "crc32": zlib.crc32(raw)}))
        await self.link.send(writer, raw)
        self._on_sent(raw.nbytes)


class KVClient:
    def __init__(self, secret: str | None = None, timeout: float = 30.0) -> None:
        self._secret = secret if secret is not None else os.environ.get("DISAGG_KV_SECRET")
        self.timeout = timeout

    @property
    def has_secret(self) -> bool:
        return bool(self._secret)

    async def pull(self, host: str, port: int, request_id: str, expected_shape: tuple[int, ...] | None = None,
                   release: bool = True) -> KVPayload:
        """Fetch a request's KV and (by default) tell the server to free it."""
        try:
            return await asyncio.wait_for(self._pull(host, port, request_id, expected_shape, release), self.timeout)
        except (OSError, asyncio.IncompleteReadError, msgpack.UnpackException, TimeoutError) as e:
            raise KVTransferError(f"KV pull from {host}:{port} failed: {e!r}") from e

    async def _pull(self, host: str, port: int, rid: str, expected: tuple[int, ...] | None,
                    release: bool) -> KVPayload:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await self._hello(reader, writer)
            writer.write(_frame({"op": "pull", "request_id": rid}))
            await writer.drain()
            head = await _read_frame(reader)
            if not head.get("ok"):
                raise KVTransferError(f"KV server refused: {head.get('error')}")
            payload = self._check(head, expected)
            raw = await reader.readexactly(head["nbytes"])
            if zlib.crc32(raw) != head["crc32"]:
                raise KVTransferError("KV payload checksum mismatch")
            data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(payload[1]).reshape(payload[0])
            if release:
                writer.write(_frame({"op": "release", "request_id": rid}))
                await writer.drain()
                await _read_frame(reader)
            return KVPayload(data, head["num_tokens"], str(head.get("digest", "")))
        finally:
            writer.close()

    async def release(self, host: str, port: int, request_id: str) -> bool:
        """Tell a KV server to free a request's held blocks without pulling them."""
        try:
            return await asyncio.wait_for(self._release(host, port, request_id), self.timeout)
        except (OSError, asyncio.IncompleteReadError, msgpack.UnpackException, TimeoutError) as e:
            raise KVTransferError(f"KV release at {host}:{port} failed: {e!r}") from e

    async def _release(self, host: str, port: int, rid: str) -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await self._hello(reader, writer)
            writer.write(_frame({"op": "release", "request_id": rid}))
            await writer.drain()
            return bool((await _read_frame(reader)).get("ok"))
        finally:
            writer.close()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await _read_frame(reader)
        if hello.get("challenge"):
            if not self._secret:
                raise KVTransferError("the KV server wants a secret: set DISAGG_KV_SECRET")
            writer.write(_frame({"op": "auth", "mac": _mac(self._secret, str(hello["challenge"]))}))

    @staticmethod
    def _check(head: dict[str, Any], expected: tuple[int, ...] | None) -> tuple[tuple[int, ...], torch.dtype]:
        shape, dtype, nbytes = head.get("shape"), DTYPES.get(head.get("dtype")), head.get("nbytes")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape) and dtype is not None
                and isinstance(nbytes, int) and isinstance(head.get("num_tokens"), int)
                and isinstance(head.get("crc32"), int)):
            raise KVTransferError("malformed KV header")
        if nbytes != math.prod(shape) * torch.tensor([], dtype=dtype).element_size() or nbytes > MAX_PAYLOAD:
            raise KVTransferError("KV header size does not match its shape")
        if expected is not None and (len(shape) != len(expected) or any(
                e not in (-1, s) for e, s in zip(expected, shape, strict=True))):
            raise KVTransferError(f"KV shape {shape} does not fit this engine ({list(expected)})")
        return tuple(shape), dtype
