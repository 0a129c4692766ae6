"""The preallocated paged KV cache: one tensor per layer, [2 (K, V), kv_heads, blocks,
block_size, head_dim], written by slot index, sized from a memory budget.

Head-major, so that one head's K over a run of consecutive blocks is a single matrix
(model/attention.py reads it without copying). Exports of n blocks are
[layers, 2, kv_heads, n, block_size, head_dim]: block axis BLOCK_DIM.
"""

from __future__ import annotations

import math

import torch

from disagg.kv.layout import kv_bytes_per_token
from disagg.kv.shm import SharedMemory
from disagg.model.config import ModelConfig

BLOCK_DIM = 3  # the block axis of an export


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, shared: bool = False) -> None:
        self.num_blocks, self.block_size, self.dtype, self.device = num_blocks, block_size, dtype, device
        shape = (2, config.num_kv_heads, num_blocks, block_size, config.head_dim)
        self.arena: SharedMemory | None = None
        if shared and device.type == "cpu":  # in shared memory, for same-host transfers in one copy
            n = math.prod(shape)
            self.arena = SharedMemory(config.num_layers * n * dtype.itemsize)
            flat = self.arena.tensor().view(dtype)
            self.layers = [flat[i * n : (i + 1) * n].view(shape) for i in range(config.num_layers)]
        else:
            # empty, not zeros: attention reads exactly each sequence's written slots, never past
            # them, and zeroing gigabytes up front would cost seconds of start-up.
            self.layers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return kv_bytes_per_token(config, str(dtype)) * block_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block's K and V over every layer (an export of one block)."""
        return math.prod(self.export_shape(1)) * self.dtype.itemsize

    def export_shape(self, num_blocks: int) -> tuple[int, ...]:
        _, heads, _, bs, dim = self.layers[0].shape
        return (len(self.layers), 2, heads, num_blocks, bs, dim)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks' K/V, shaped `export_shape(len(block_ids))`."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.layers[0].device)
        return torch.stack([layer.index_select(BLOCK_DIM - 1, idx) for layer in self.layers])

    def block_views(self, block_ids: list[int], layers: range | None = None) -> list[memoryview]:
        """The memory of the given blocks as byte views, in export order (layer, K/V, head, block):
        a transport can send from them or receive into them with no copy. CPU caches only; a run
        of consecutive blocks is one view per (layer, K/V, head). `layers`: only those."""
        runs: list[tuple[int, int]] = []
        for b in block_ids:
            if runs and b == runs[-1][1]:
                runs[-1] = (runs[-1][0], b + 1)
            else:
                runs.append((b, b + 1))
        views = []
        for layer in (self.layers[i] for i in (layers or range(len(self.layers)))):
            for kv in range(2):
                for head in range(layer.shape[1]):
                    for lo, hi in runs:
                        views.append(memoryview(layer[kv, head, lo:hi].view(-1).view(torch.uint8).numpy()))
        return views

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.layers[0].device)
        for layer, src in zip(self.layers, data, strict=True):
            layer.index_copy_(BLOCK_DIM - 1, idx, src.to(device=layer.device, dtype=layer.dtype))
