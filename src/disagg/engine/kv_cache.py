"""The preallocated paged KV cache: one tensor per layer, [2 (K, V), blocks, block_size,
kv_heads, head_dim], written by slot index, sized from a memory budget."""

from __future__ import annotations

import torch

from disagg.model.config import ModelConfig


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # zeros, not empty: padded attention reads slots no token has written yet, and garbage
        # there (NaN) would poison the masked softmax's matmul.
        self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * block_size * elem

    def block_shape(self) -> tuple[int, ...]:
        """Shape of an export of n blocks, with n replaced by -1."""
        _, _, bs, heads, dim = self.layers[0].shape
        return (len(self.layers), 2, -1, bs, heads, dim)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks' K/V: [layers, 2, len(block_ids), block_size, kv_heads, head_dim]."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.layers[0].device)
        return torch.stack([layer.index_select(1, idx) for layer in self.layers])

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.layers[0].device)
        for layer, src in zip(self.layers, data, strict=True):
            layer.index_copy_(1, idx, src.to(device=layer.device, dtype=layer.dtype))
