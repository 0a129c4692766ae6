"""Shared-memory segments for same-host KV transfers (`--kv-transport shm`).

A segment is a file in /dev/shm, readable by its owner only, mapped once and reused for many
transfers: fresh tmpfs pages cost a page fault each, which would make every transfer pay for
memory. The server lends one segment per transfer from a pool; the client keeps its mappings.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import threading
from collections.abc import Iterator

from disagg.kv.framing import CHUNK, KVTransferError, checksum

SHM_DIR = "/dev/shm"
SHM_NAME = re.compile(r"disagg-kv-[0-9a-f]{32}")


class SharedSegment:
    """One segment: created, mapped, and unlinked on close."""

    def __init__(self, size: int) -> None:
        self.name = f"disagg-kv-{secrets.token_hex(16)}"
        self.size = size
        fd = os.open(os.path.join(SHM_DIR, self.name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def fill(self, views: tuple[memoryview, ...] | list[memoryview]) -> int:
        """Copy the views in, in order; returns their checksum, computed as they pass."""
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
        self.mm.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, self.name))


class SegmentPool:
    """The server's segments: one is lent to each shared-memory transfer and returned when the
    reader is done with it."""

    def __init__(self, max_idle: int = 4) -> None:
        self._idle: list[SharedSegment] = []
        self._lock = threading.Lock()
        self._closed = False
        self.max_idle = max_idle

    @contextlib.contextmanager
    def lend(self, size: int) -> Iterator[SharedSegment]:
        with self._lock:
            fits = [s for s in self._idle if s.size >= size]
            seg = min(fits, key=lambda s: s.size) if fits else None
            if seg is not None:
                self._idle.remove(seg)
        seg = seg or SharedSegment(max(size, 1))
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


class SegmentReader:
    """The client's mappings of servers' segments, kept open across transfers."""

    def __init__(self, max_open: int = 8) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.max_open = max_open

    def read_into(self, name: str, views: list[memoryview]) -> int:
        with self._lock:
            mm = self._maps.get(name)
            if mm is None:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
                try:
                    mm = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
                self._maps[name] = mm
                while len(self._maps) > self.max_open:
                    self._maps.pop(next(iter(self._maps))).close()
            src = memoryview(mm)
            try:
                crc, off = checksum(), 0
                for view in views:
                    if off + view.nbytes > len(src):
                        raise KVTransferError("shared-memory segment is shorter than its header says")
                    for lo in range(0, view.nbytes, CHUNK):
                        chunk = view[lo : lo + CHUNK]
                        chunk[:] = src[off : off + chunk.nbytes]
                        crc.update(chunk)
                        off += chunk.nbytes
                return crc.intdigest()
            finally:
                src.release()
