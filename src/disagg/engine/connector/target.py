"""Where a load's bytes go: a request's cache blocks.

Straight into the blocks when the cache is on the CPU and the KV arrives in its dtype (a transport
receives into the cache's own memory, no copy); otherwise into a staging tensor on the CPU that
`commit` writes into the blocks, on the engine thread, once the load is complete (GPU caches, KV of
another dtype).
"""

from __future__ import annotations

import torch

from disagg.engine.kv_cache import BLOCK_DIM, PagedKVCache
from disagg.kv.framing import KVTransferError
from disagg.kv.transport import copy_views


class LoadTarget:
    def __init__(self, cache: PagedKVCache, block_ids: list[int]) -> None:
        self.cache, self.block_ids = cache, block_ids
        self.staging: torch.Tensor | None = None

    @property
    def in_place(self) -> bool:
        return self.cache.device.type == "cpu"

    def views(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[memoryview]:
        """Memory for the whole range's KV in export order (a transport's `into`)."""
        if tuple(shape) != self.cache.export_shape(len(self.block_ids)):
            raise KVTransferError(f"KV of shape {list(shape)} does not fit {len(self.block_ids)} blocks")
        if self.in_place and dtype == self.cache.dtype:
            return self.cache.block_views(self.block_ids)
        self.staging = torch.empty(shape, dtype=dtype, pin_memory=self.cache.device.type == "cuda")
        return [memoryview(self.staging.view(-1).view(torch.uint8).numpy())]

    def write_block(self, index: int, blob: bytes) -> None:
        """Block `index` of the range from bytes in the cache's own dtype (a pooled block)."""
        if self.in_place:
            copy_views([memoryview(blob)], self.cache.block_views([self.block_ids[index]]))
            return
        if self.staging is None:
            self.staging = torch.empty(self.cache.export_shape(len(self.block_ids)), dtype=self.cache.dtype,
                                       pin_memory=self.cache.device.type == "cuda")
        one = torch.frombuffer(bytearray(blob), dtype=self.cache.dtype).reshape(self.cache.export_shape(1))
        self.staging.narrow(BLOCK_DIM, index, 1).copy_(one)

    def commit(self, num_blocks: int) -> None:
        """On the engine thread: the first `num_blocks` blocks arrived; write them where they belong."""
        if self.staging is not None and num_blocks > 0:
            self.cache.write_blocks(self.block_ids[:num_blocks], self.staging.narrow(BLOCK_DIM, 0, num_blocks))
        self.staging = None
