"""Which KV block holds what: free list, reference counts, prefix cache.

Blocks are ids into the preallocated cache; this module never touches tensors. A full block whose
KV has been computed is registered under its chained content hash (kv/block_hash.py); a later
request with the same prefix shares it (ref count > 1). A block whose ref count falls to 0 goes
to the back of the free list but keeps its hash, so it can still be revived by a prefix hit
until it is reused: eviction is least-recently-freed first.

Every check has its action: `can_allocate` / `allocate`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq

from disagg.engine.sequence import Sequence
from disagg.kv.block_hash import chain_hashes


class Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, model_id: str, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.model_id = model_id
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self._cached: dict[bytes, int] = {}  # content hash -> block id
        self.hits = 0  # prefix-cache hits, in blocks
        self.queries = 0  # full prompt blocks looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self._free)

    # ---- prefix cache ----

    def update_hashes(self, seq: Sequence) -> None:
        seq.block_hashes = chain_hashes(seq.token_ids, self.block_size, self.model_id, seq.block_hashes)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of `seq`'s tokens. At least one token is always
        left to compute (its logits are needed), so a fully cached prompt drops its last block."""
        if not self.enable_caching:
            return []
        self.update_hashes(seq)
        hits: list[int] = []
        for h in seq.block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        if len(hits) * self.block_size >= seq.num_tokens:
            hits.pop()
        self.queries += len(seq.block_hashes)
        self.hits += len(hits)
        return hits

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Offer `seq`'s newly computed full blocks to the prefix cache."""
        if not self.enable_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self.update_hashes(seq)
        for i in range(seq.num_registered_blocks, full):
            block = self.blocks[seq.block_table[i]]
            h = seq.block_hashes[i]
            if block.hash is None and h not in self._cached:
                block.hash = h
                self._cached[h] = block.block_id
        seq.num_registered_blocks = full

    # ---- allocation ----

    def _blocks_needed(self, seq: Sequence, num_tokens: int, cached: Seq[int]) -> int:
        new = -(-num_tokens // self.block_size) - len(seq.block_table) - len(cached)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return max(0, new) + revived

    def can_allocate(self, seq: Sequence, num_tokens: int, cached: Seq[int] = ()) -> bool:
        """Whether `seq`'s block table can grow to cover `num_tokens` tokens (after `cached`)."""
        return self._blocks_needed(seq, num_tokens, cached) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int, cached: Seq[int] = ()) -> None:
        """Append `cached` blocks (shared) and fresh blocks until the table covers `num_tokens`."""
        assert self.can_allocate(seq, num_tokens, cached), "allocate() without a successful can_allocate()"
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_registered_blocks += len(cached)
        while len(seq.block_table) * self.block_size < num_tokens:
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict the cached content this block still held
                del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses join the free list, tail blocks first so
        that a prompt's shared head outlives its private tail."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.hash = None
        self._cached.clear()
