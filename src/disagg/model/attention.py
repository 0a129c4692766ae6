"""Attention over a paged KV cache.

A step's tokens arrive flattened, decodes first (one token each), then prefill chunks. Each
layer writes its new K/V into the cache by slot, then reads every sequence's K/V back through its
block table. Decodes are batched into one padded SDPA call; each prefill chunk gets its own call
with a causal mask offset by the tokens it already has in the cache.

Grouped-query attention without copying K/V per query head: the query heads that share a KV head
are folded into the query-length axis, so SDPA sees `kv_heads` heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens: rows [start, end) of the flat batch."""

    start: int
    end: int
    block_table: torch.Tensor  # [num_blocks] int64
    context_len: int  # tokens in the cache after this chunk (cached + new)
    mask: torch.Tensor  # [group * chunk, context_len] bool, True = attend


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSpan]


def causal_chunk_mask(num_new: int, context_len: int, group: int, device: torch.device) -> torch.Tensor:
    """Mask for `num_new` queries that are the last tokens of a `context_len` context, repeated
    for the `group` query heads folded into the query axis."""
    q_pos = torch.arange(context_len - num_new, context_len, device=device)
    k_pos = torch.arange(context_len, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    return mask.repeat(group, 1)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache: [2, num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim]."""
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], reading K/V (already written) from `cache`."""
    _, num_heads, head_dim = q.shape
    kv_heads = cache.shape[3]
    group = num_heads // kv_heads
    out = torch.empty_like(q)

    if meta.num_decodes:
        n = meta.num_decodes
        k = cache[0][meta.decode_block_tables]  # [n, blocks, block_size, kv_heads, hd]
        v = cache[1][meta.decode_block_tables]
        k = k.view(n, -1, kv_heads, head_dim).transpose(1, 2)  # [n, kv_heads, L, hd]
        v = v.view(n, -1, kv_heads, head_dim).transpose(1, 2)
        qd = q[:n].view(n, kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.decode_mask, scale=scale)
        out[:n] = o.reshape(n, num_heads, head_dim)

    for span in meta.prefills:
        m = span.end - span.start
        k = cache[0][span.block_table].view(-1, kv_heads, head_dim)[: span.context_len]
        v = cache[1][span.block_table].view(-1, kv_heads, head_dim)[: span.context_len]
        # [m, heads, hd] -> [kv_heads, group * m, hd]: queries of one KV head side by side
        qp = q[span.start : span.end].view(m, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qp = qp.reshape(kv_heads, group * m, head_dim)
        o = F.scaled_dot_product_attention(
            qp, k.transpose(0, 1), v.transpose(0, 1), attn_mask=span.mask, scale=scale
        )  # [kv_heads, group * m, hd]
        out[span.start : span.end] = o.view(kv_heads, group, m, head_dim).permute(2, 0, 1, 3).reshape(
            m, num_heads, head_dim
        )
    return out
