"""Shared memory for same-host KV transfers (`--kv-transport shm`).

Memory here is an unnamed tmpfs file (O_TMPFILE in /dev/shm, mode 0600): it has no name to leave
behind, even when its process is killed, and another process of the same user opens it through
/proc/<pid>/fd/<fd>. A prefill worker serving shm allocates its whole KV cache in one such
`SharedMemory` (an arena), so a pull is a single copy, from the prefill's cache blocks straight
into the decode's; KV that is not in the arena (a copy exported from a GPU cache) goes through a
pooled segment first. Readers keep their mappings, checked by inode, across transfers.

`ShmMover` moves a pull's bytes this way over the TCP control channel (kv/tcp.py): the header
says which memory to copy from, the reader copies and answers {"op": "done"}, and only then may
the server reuse the memory.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from disagg.kv.address import is_loopback
from disagg.kv.framing import CHUNK, KVTransferError, checksum, read_frame, send_frame, views_checksum
from disagg.kv.netem import Pacer

SHM_DIR = "/dev/shm"


def address(buf: Any) -> int:
    """Where a buffer (memoryview, mmap) starts in this process's memory."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class SharedMemory:
    """An unnamed shared-memory file of `size` bytes, mapped read-write."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self.fd = os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            os.ftruncate(self.fd, self.size)
            self.mm = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self.ino = os.fstat(self.fd).st_ino
        self.base = address(self.mm)

    def tensor(self) -> torch.Tensor:
        """The whole memory as a uint8 tensor (shares it)."""
        return torch.frombuffer(self.mm, dtype=torch.uint8)

    def address(self) -> dict[str, int]:
        """What another process needs to map this memory."""
        return {"pid": os.getpid(), "fd": self.fd, "ino": self.ino, "size": self.size}

    def regions(self, views: Sequence[memoryview]) -> list[list[int]] | None:
        """[offset, length] of each view inside this memory, or None if any lies outside."""
        out = []
        for v in views:
            off = address(v) - self.base
            if not 0 <= off <= self.size - v.nbytes:
                return None
            out.append([off, v.nbytes])
        return out

    def fill(self, views: Sequence[memoryview]) -> int:
        """Copy the views in, back to back from offset 0; returns their checksum."""
        crc, off = checksum(), 0
        dst = memoryview(self.mm)
        try:
            for view in views:
                for lo in range(0, view.nbytes, CHUNK):
                    chunk = view[lo : lo + CHUNK]
                    dst[off : off + chunk.nbytes] = chunk
                    crc.update(chunk)
                    off += chunk.nbytes
        finally:
            dst.release()
        return crc.intdigest()

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # tensors still viewing it keep the mapping alive
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SegmentPool:
    """The server's staging segments, for KV that is not already in shared memory: one is lent to
    each transfer and returned when the reader is done with it."""

    def __init__(self, max_idle: int = 4) -> None:
        self._idle: list[SharedMemory] = []
        self._lock = threading.Lock()
        self._closed = False
        self.max_idle = max_idle

    @contextlib.contextmanager
    def lend(self, size: int) -> Iterator[SharedMemory]:
        with self._lock:
            fits = [s for s in self._idle if s.size >= size]
            seg = min(fits, key=lambda s: s.size) if fits else None
            if seg is not None:
                self._idle.remove(seg)
        seg = seg or SharedMemory(size)
        try:
            yield seg
        finally:
            with self._lock:
                self._idle.append(seg)
                while len(self._idle) > (0 if self._closed else self.max_idle):
                    self._idle.pop(0).close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for seg in self._idle:
                seg.close()
            self._idle.clear()


def check_address(obj: Any) -> dict[str, int]:
    if not (isinstance(obj, dict) and all(isinstance(obj.get(k), int) and obj[k] >= 0
                                          for k in ("pid", "fd", "ino", "size")) and obj["size"] > 0):
        raise KVTransferError("malformed shared-memory address")
    return obj


class SegmentReader:
    """The client's mappings of servers' shared memory, kept open across transfers."""

    def __init__(self, max_open: int = 8) -> None:
        self._maps: dict[tuple[int, int, int], mmap.mmap] = {}
        self._lock = threading.Lock()
        self.max_open = max_open

    def _map(self, addr: dict[str, int]) -> mmap.mmap:
        key = (addr["pid"], addr["fd"], addr["ino"])
        mm = self._maps.get(key)
        if mm is not None and len(mm) == addr["size"]:
            return mm
        try:
            fd = os.open(f"/proc/{addr['pid']}/fd/{addr['fd']}", os.O_RDONLY)
        except OSError as e:
            raise KVTransferError(f"cannot open the server's shared memory: {e}") from e
        try:
            st = os.fstat(fd)
            if st.st_ino != addr["ino"] or st.st_size < addr["size"]:
                raise KVTransferError("the server's shared memory is not what its header says")
            mm = mmap.mmap(fd, addr["size"], prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._maps[key] = mm
        while len(self._maps) > self.max_open:
            self._maps.pop(next(iter(self._maps))).close()
        return mm

    def read_into(self, addr: dict[str, int], regions: Any, views: list[memoryview]) -> int:
        """Copy the regions ([offset, length], in order) of the server's memory into `views` (the
        same bytes, maybe cut differently); returns the checksum of what was copied."""
        if not (isinstance(regions, list) and all(
                isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)
                and r[0] >= 0 and r[1] > 0 and r[0] + r[1] <= addr["size"] for r in regions)):
            raise KVTransferError("malformed shared-memory regions")
        if sum(r[1] for r in regions) != sum(v.nbytes for v in views):
            raise KVTransferError("shared-memory regions do not match the payload size")
        with self._lock:
            src = memoryview(self._map(addr))
            try:
                crc = checksum()
                ri, roff = 0, 0
                for view in views:
                    voff = 0
                    while voff < view.nbytes:
                        start, length = regions[ri]
                        n = min(length - roff, view.nbytes - voff, CHUNK)
                        chunk = view[voff : voff + n]
                        chunk[:] = src[start + roff : start + roff + n]
                        crc.update(chunk)
                        voff += n
                        roff += n
                        if roff == length:
                            ri, roff = ri + 1, 0
                return crc.intdigest()
            finally:
                src.release()


class ShmMover:
    """A pull's bytes through shared memory: the server's KV cache itself when it lives in an arena,
    else a staging segment the server fills; one host only."""

    name = "shm"

    def __init__(self, arena: SharedMemory | None = None) -> None:
        self.arena = arena
        self._segments = SegmentPool()
        self._reader = SegmentReader()

    def reaches(self, host: str) -> bool:
        return is_loopback(host)

    def send(self, conn: socket.socket, head: dict[str, Any], views: tuple[memoryview, ...], pacer: Pacer) -> None:
        regions = self.arena.regions(views) if self.arena is not None else None
        if regions is not None:  # straight out of the cache: the reader makes the only copy
            send_frame(conn, head | {"shm": self.arena.address(), "regions": regions, "xxh3": views_checksum(views)})
            read_frame(conn)  # the reader says when it is done
            return
        with self._segments.lend(sum(v.nbytes for v in views)) as seg:
            crc = seg.fill(views)
            send_frame(conn, head | {"shm": seg.address(), "regions": [[0, head["nbytes"]]], "xxh3": crc})
            read_frame(conn)  # the segment is lent until the reader is done

    def receive(self, conn: socket.socket, head: dict[str, Any], views: list[memoryview]) -> int:
        try:
            crc = self._reader.read_into(check_address(head.get("shm")), head.get("regions"), views)
        finally:
            send_frame(conn, {"op": "done"})
        if head.get("xxh3") != crc:
            raise KVTransferError("KV payload checksum mismatch")
        return crc

    def close(self) -> None:
        self._segments.close()
