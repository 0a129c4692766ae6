"""KV over NIXL (`--kv-transport nixl`): the decode worker READs the prefill worker's cache blocks
itself, through NVIDIA's transfer library, which uses RDMA (UCX over InfiniBand/RoCE) where the
hardware has it and TCP where it does not (UCX_TLS=tcp on a CPU-only machine).

Optional: `pip install --no-deps nixl-cu12` (or the `nixl` meta package). Only the bulk bytes go
through NIXL; the session around them stays on our authenticated TCP KV port (kv/tcp.py): the
decode worker asks for a request's KV there and gets the prefill agent's metadata and the memory
regions to read, reads them, checks the XXH3 of what arrived, and says when it is done.

Each worker registers its whole KV cache with its agent once, at start, so a transfer costs no
registration; memory from anywhere else is registered for the one transfer. `NixlMover` is the
transport's side of it (kv/tcp.py's `Mover`).
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from disagg.kv.framing import KVTransferError, read_frame, send_frame, views_checksum
from disagg.kv.netem import Pacer
from disagg.kv.shm import address

Region = tuple[int, int, int]  # address, bytes, device id


def _api() -> Any | None:
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def available() -> bool:
    return _api() is not None


def view_regions(views: Sequence[memoryview]) -> list[Region]:
    """Host-memory regions of byte views (device id 0)."""
    return [(address(v), v.nbytes, 0) for v in views]


def tensor_regions(t: torch.Tensor) -> list[Region]:
    return [(t.data_ptr(), t.numel() * t.element_size(), t.device.index or 0)]


def mem_type(device: torch.device) -> str:
    return "VRAM" if device.type == "cuda" else "DRAM"


def align(a: Sequence[Region], b: Sequence[Region]) -> tuple[list[Region], list[Region]]:
    """Split two region lists that cover the same byte stream at each other's boundaries, so the
    i-th pieces have equal lengths (NIXL pairs descriptors one to one)."""
    if sum(r[1] for r in a) != sum(r[1] for r in b):
        raise KVTransferError("the two sides' KV regions differ in size")
    out_a: list[Region] = []
    out_b: list[Region] = []
    i = j = 0
    off_a = off_b = 0
    while i < len(a) and j < len(b):
        n = min(a[i][1] - off_a, b[j][1] - off_b)
        out_a.append((a[i][0] + off_a, n, a[i][2]))
        out_b.append((b[j][0] + off_b, n, b[j][2]))
        off_a += n
        off_b += n
        if off_a == a[i][1]:
            i, off_a = i + 1, 0
        if off_b == b[j][1]:
            j, off_b = j + 1, 0
    return out_a, out_b


class NixlAgent:
    """One worker's NIXL agent, with its KV cache tensors registered."""

    def __init__(self, tensors: Sequence[torch.Tensor] = ()) -> None:
        api = _api()
        if api is None:
            raise KVTransferError("--kv-transport nixl needs NIXL: pip install --no-deps nixl-cu12")
        self.name = f"disagg-{uuid.uuid4().hex[:12]}"
        self.agent = api.nixl_agent(self.name, api.nixl_agent_config(backends=["UCX"]))
        if tensors:
            self.agent.register_memory(list(tensors))
        self._ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
        self._remotes: set[str] = set()
        self._lock = threading.Lock()  # one transfer at a time through this agent

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def covers(self, regions: Sequence[Region]) -> bool:
        """Whether every region lies inside memory registered at start (the KV cache)."""
        return all(any(lo <= a and a + n <= hi for lo, hi in self._ranges) for a, n, _ in regions)

    def register(self, regions: Sequence[Region], mem: str = "DRAM") -> Any:
        """Register memory for one transfer; `deregister` the handle after it."""
        return self.agent.register_memory([(a, n, d, "") for a, n, d in regions], mem)

    def deregister(self, handle: Any) -> None:
        self.agent.deregister_memory(handle)

    def read(self, remote_name: str, remote_md: bytes, remote: Sequence[Region], remote_mem: str,
             local: Sequence[Region], local_mem: str, timeout: float) -> None:
        """Copy the remote regions into the local ones (both in the same byte order)."""
        local_a, remote_a = align(local, remote)
        with self._lock:
            if remote_name not in self._remotes:
                added = self.agent.add_remote_agent(remote_md)
                if (added.decode() if isinstance(added, bytes) else added) != remote_name:
                    raise KVTransferError("NIXL metadata does not belong to the agent it claims")
                self._remotes.add(remote_name)
            handle = self.agent.initialize_xfer(
                "READ", self.agent.get_xfer_descs(local_a, local_mem),
                self.agent.get_xfer_descs(remote_a, remote_mem), remote_name)
            try:
                state = self.agent.transfer(handle)
                deadline = time.monotonic() + timeout
                while state == "PROC":
                    if time.monotonic() > deadline:
                        raise KVTransferError(f"NIXL read did not finish within {timeout:g} s")
                    time.sleep(20e-6)
                    state = self.agent.check_xfer_state(handle)
                if state != "DONE":
                    raise KVTransferError("NIXL read failed")
            finally:
                self.agent.release_xfer_handle(handle)


class NixlMover:
    """A pull's bytes through NIXL: the server announces its agent and the memory regions to read,
    the client READs them into its own (registered) memory and answers {"op": "done"}."""

    name = "nixl"

    def __init__(self, agent: NixlAgent, timeout: float = 30.0) -> None:
        self.agent, self.timeout = agent, timeout

    def reaches(self, host: str) -> bool:
        return True

    def send(self, conn: socket.socket, head: dict[str, Any], views: tuple[memoryview, ...], pacer: Pacer) -> None:
        regions = view_regions(views)
        # views of the cache are registered already; a copy (exported from a GPU cache) is not
        temp = None if self.agent.covers(regions) else self.agent.register(regions)
        try:
            send_frame(conn, head | {"xxh3": views_checksum(views), "nixl": {
                "agent": self.agent.name, "md": self.agent.metadata(), "regions": [list(r) for r in regions],
                "mem": "DRAM"}})
            read_frame(conn)  # the reader is done with the memory
        finally:
            if temp is not None:
                self.agent.deregister(temp)

    def receive(self, conn: socket.socket, head: dict[str, Any], views: list[memoryview]) -> int:
        try:
            meta = head.get("nixl")
            if not (isinstance(meta, dict) and isinstance(meta.get("agent"), str) and len(meta["agent"]) <= 128
                    and isinstance(meta.get("md"), bytes) and meta.get("mem") in ("DRAM", "VRAM")
                    and isinstance(meta.get("regions"), list) and all(
                        isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) and x >= 0 for x in r)
                        and r[1] > 0 for r in meta["regions"])):
                raise KVTransferError("malformed NIXL header")
            local = view_regions(views)
            handle = None if self.agent.covers(local) else self.agent.register(local)
            try:
                self.agent.read(meta["agent"], meta["md"], [tuple(r) for r in meta["regions"]], meta["mem"], local,
                                "DRAM", self.timeout)
            finally:
                if handle is not None:
                    self.agent.deregister(handle)
        finally:
            send_frame(conn, {"op": "done"})
        crc = views_checksum(views)
        if head.get("xxh3") != crc:
            raise KVTransferError("KV payload checksum mismatch")
        return crc
