"""The KV transport interface: how one worker's KV reaches another's.

Two halves:

- A worker *serves* a KV port. What it serves is a `KVPortHandler`, which the engine's KV
  connector implements: decode workers pull a held request's KV from it (from a given block on:
  they send only what decode lacks), release it, renew its lease, and push KV into it.
- A worker *uses* a `Transport` to reach other workers' ports: pull, release, renew, push,
  cancel a push.

Implementations: `tcp` (kv/tcp.py: the authenticated control channel, bulk bytes inline), `shm`
and `nixl` (the same control channel, bulk bytes through shared memory or NIXL: kv/shm.py,
kv/nixl.py), and `fake` (kv/fake.py: in process, for tests). Every call blocks; the connector
runs them on its own threads. Every failure is a `KVTransferError`, raised within a bounded time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from disagg.kv.address import Address
from disagg.kv.framing import KVTransferError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (moved to the CPU and made contiguous only if it is not already)."""
    flat = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


@dataclass(frozen=True)
class Exported:
    """A held request's KV as a producer sends it: byte views in export order (straight from a
    CPU cache) or one tensor (a copy, from a GPU cache); `shape` is the export shape of the blocks
    sent, `num_tokens` and `digest` describe the whole prompt the KV was computed from."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    num_tokens: int
    digest: str
    views: tuple[memoryview, ...] = ()
    tensor: torch.Tensor | None = None

    def wire(self) -> tuple[memoryview, ...]:
        return self.views if self.tensor is None else (tensor_bytes(self.tensor),)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Pulled:
    """What a pull brought: the prompt's token count and digest as the producer says, and the bytes
    that crossed the transport (after a codec)."""

    num_tokens: int
    digest: str
    wire_bytes: int


# Memory to receive a pull into, in export order, given the export's shape and dtype.
Destination = Callable[[tuple[int, ...], torch.dtype], "list[memoryview]"]


@dataclass(frozen=True)
class PushHeader:
    """What a pusher announces before sending a byte, checked against the waiting request."""

    push_id: str
    num_tokens: int
    digest: str
    shape: tuple[int, ...]  # export shape of the whole prompt's blocks
    dtype: str

    def to_wire(self) -> dict[str, Any]:
        return {"push_id": self.push_id, "num_tokens": self.num_tokens, "digest": self.digest,
                "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> PushHeader:
        pid, shape, dtype = msg.get("push_id"), msg.get("shape"), msg.get("dtype")
        if not (isinstance(pid, str) and 0 < len(pid) <= 128 and isinstance(msg.get("num_tokens"), int)
                and msg["num_tokens"] > 0 and isinstance(msg.get("digest"), str) and len(msg["digest"]) <= 64
                and is_shape(shape) and len(shape) == 6 and dtype in DTYPES):
            raise KVTransferError("malformed push header")
        return cls(pid, msg["num_tokens"], msg["digest"], tuple(shape), dtype)

    def layer_bytes(self, from_block: int) -> int:
        """Bytes of one layer's share from block `from_block` on."""
        _, kv, heads, blocks, bs, dim = self.shape
        return kv * heads * max(0, blocks - from_block) * bs * dim * DTYPES[self.dtype].itemsize


class PushSource(Protocol):
    """The producer side of one push, as a transport's push reads it (on the transport's thread)."""

    header: PushHeader

    def layer(self, index: int, from_block: int) -> list[memoryview]:
        """Layer `index`'s bytes from block `from_block` on, once computed (blocks until then);
        raises KVTransferError if the push was abandoned."""
        ...

    def first_token_ids(self) -> list[int]:
        """Token 1 (and any further tokens sampled by prefill), once the request finished."""
        ...


class KVPortHandler(Protocol):
    """What a worker's KV port serves. Called from transport threads; must be thread-safe."""

    def export(self, request_id: str, from_block: int) -> Exported:
        """A held request's KV from block `from_block` on; pins it until `export_done`."""
        ...

    def export_done(self, request_id: str, nbytes: int) -> None: ...

    def release(self, request_id: str) -> bool:
        """Free a held request's blocks; False when nothing was held."""
        ...

    def renew(self, request_id: str) -> float | None:
        """Extend a held request's lease; the new lease in seconds, or None when not held."""
        ...

    def accept_push(self, header: PushHeader, abort: Callable[[], None]) -> tuple[list[memoryview], int]:
        """Wait (a bounded time) for the decode request expecting this push to have its blocks;
        return the memory to receive into (export order, blocks from_block on) and from_block.
        `abort()` stops the receive, should the push be cancelled while its bytes arrive."""
        ...

    def push_done(self, push_id: str, first_token_ids: list[int] | None, error: str | None = None) -> None:
        """The pushed bytes are in (with token 1), or the push failed."""
        ...

    def cancel_push(self, push_id: str) -> None:
        """The KV expected under `push_id` will not come."""
        ...


class KVPort(Protocol):
    """A running KV port (tcp.TcpPort, fake.FakePort)."""

    address: Address

    def close(self) -> None: ...


class Transport(Protocol):
    """How a connector reaches other workers' KV ports. Blocking calls, bounded in time."""

    name: str  # what a prefill answer's kv_transport names, and how pulls are counted

    def reaches(self, host: str) -> bool:
        """Whether this transport can pull from a port on `host` (shared memory: this host only)."""
        ...

    def pull(self, address: Address, request_id: str, from_block: int, into: Destination,
             expected_shape: tuple[int, ...]) -> Pulled:
        """Receive a held request's KV from block `from_block` on into `into(shape, dtype)`, then
        release it. `expected_shape`: the export shape, -1 where any size goes."""
        ...

    def release(self, address: Address, request_id: str) -> bool: ...

    def renew(self, address: Address, request_id: str) -> float | None: ...

    def push(self, address: Address, source: PushSource) -> int:
        """Push one request's KV layer by layer as `source` yields it; returns the bytes sent."""
        ...

    def cancel_push(self, address: Address, push_id: str) -> None: ...

    def close(self) -> None: ...


def is_shape(shape: Any, allow_zero: bool = False) -> bool:
    return isinstance(shape, list) and 0 < len(shape) <= 8 and all(
        isinstance(d, int) and not isinstance(d, bool) and (d >= 0 if allow_zero else d > 0) for d in shape)


def check_shape(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if len(shape) != len(expected) or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
        raise KVTransferError(f"KV shape {list(shape)} does not fit this engine ({list(expected)})")


def copy_views(src: list[memoryview] | tuple[memoryview, ...], dst: list[memoryview] | tuple[memoryview, ...]) -> int:
    """Copy the bytes of `src` into `dst`, in order; both cut anyhow but equally long in all.
    Returns the bytes copied."""
    total = sum(v.nbytes for v in src)
    if total != sum(v.nbytes for v in dst):
        raise KVTransferError("KV does not fit the memory given for it")
    di, doff = 0, 0
    for view in src:
        view = view.cast("B") if view.format != "B" else view
        soff = 0
        while soff < view.nbytes:
            d = dst[di]
            n = min(view.nbytes - soff, d.nbytes - doff)
            d[doff : doff + n] = view[soff : soff + n]
            soff += n
            doff += n
            if doff == d.nbytes:
                di, doff = di + 1, 0
    return total
