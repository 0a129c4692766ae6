"""Attention over a paged KV cache.

A step's tokens arrive flattened; each sequence owns a span of rows. Every layer writes the new
K/V into the cache by slot, then attends per sequence. Where a sequence's blocks are consecutive
in the cache (the block manager arranges this when it can), its K/V are read through a view, with
no copy; otherwise they are gathered through the block table. Reading K/V once is what bounds
decode attention, so avoiding the gather's extra copy matters more than batching the calls.

Grouped-query attention without repeating K/V: the query heads that share a KV head are folded
into the query axis, so each KV head is one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """One sequence's rows [start, end) of the flat batch, the last tokens of its context."""

    start: int
    end: int
    context_len: int  # tokens in the cache after this step (cached + new)
    first_block: int | None  # blocks [first_block, ...) hold the context consecutively; or None:
    block_table: torch.Tensor | None  # gather the context through this table [num_blocks]
    mask: torch.Tensor | None  # [group * (end - start), context_len] causal mask; None for one token


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    spans: list[SeqSpan]


def causal_chunk_mask(num_new: int, context_len: int, group: int, device: torch.device) -> torch.Tensor:
    """Mask for `num_new` queries that are the last tokens of a `context_len` context, repeated
    for the `group` query heads folded into the query axis."""
    q_pos = torch.arange(context_len - num_new, context_len, device=device)
    k_pos = torch.arange(context_len, device=device)
    return (k_pos[None, :] <= q_pos[:, None]).repeat(group, 1)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache: [2, kv_heads, num_blocks, block_size, head_dim]; k, v: [T, kv_heads, head_dim]."""
    flat = cache.view(2, cache.shape[1], -1, cache.shape[-1])
    flat[0].index_copy_(1, slot_mapping, k.transpose(0, 1))
    flat[1].index_copy_(1, slot_mapping, v.transpose(0, 1))


def _context(cache: torch.Tensor, span: SeqSpan) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the span's context, [kv_heads, context_len, head_dim] each. The cache is
    head-major, so consecutive blocks of one head form one matrix: a view, not a copy."""
    kv_heads, head_dim = cache.shape[1], cache.shape[4]
    if span.first_block is not None:
        blocks = -(-span.context_len // cache.shape[3])
        kv = cache[:, :, span.first_block : span.first_block + blocks]
    else:
        kv = cache.index_select(2, span.block_table)
    kv = kv.reshape(2, kv_heads, -1, head_dim)[:, :, : span.context_len]
    return kv[0], kv[1]


def paged_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, head_dim] -> [T, heads, head_dim], reading K/V (already written) from `cache`."""
    _, num_heads, head_dim = q.shape
    kv_heads = cache.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    for span in meta.spans:
        m = span.end - span.start
        k, v = _context(cache, span)
        # [m, heads, hd] -> [kv_heads, group * m, hd]: the queries of one KV head side by side
        qs = q[span.start : span.end].view(m, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qs = qs.reshape(kv_heads, group * m, head_dim)
        if span.mask is None:  # one new token sees its whole context: a plain softmax, no mask
            unused = qs.new_empty(1, 1, 1).expand(kv_heads, group, k.shape[1])  # beta=0: never read
            scores = torch.baddbmm(unused, qs, k.transpose(1, 2), beta=0, alpha=scale)
            o = torch.bmm(scores.softmax(-1), v)
        else:
            # 4-D inputs: with 3-D ones SDPA falls back to its slow math path on CPU
            o = F.scaled_dot_product_attention(qs[None], k[None], v[None], attn_mask=span.mask[None, None],
                                               scale=scale)[0]
        out[span.start : span.end] = o.view(kv_heads, group, m, head_dim).permute(2, 0, 1, 3).reshape(
            m, num_heads, head_dim)
    return out
