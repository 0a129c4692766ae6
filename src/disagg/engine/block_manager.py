"""Which KV block holds what: free list, reference counts, prefix cache.

Blocks are ids into the preallocated cache; this module never touches tensors. A full block whose
KV has been computed is registered under its chained content hash (kv/block_hash.py); a later
request with the same prefix shares it (ref count > 1). A block whose ref count falls to 0 goes
to the back of the free list but keeps its hash, so it can still be revived by a prefix hit
until it is reused: eviction is least-recently-freed first.

Placement: attention reads a sequence's K/V through a plain view when its blocks are consecutive,
and must gather them otherwise (model/attention.py). So a new sequence starts at a run of free,
uncached blocks long enough for its prompt plus max_tokens, softly claims that run, and grows
into it block by block. Claims are hints: when blocks run short anyone may take a claimed block.

Every check has its action: `can_allocate` / `allocate`.

Every block entering or leaving the prefix cache is logged (`events`), so a router can follow
which prefixes this worker holds (serve/kv_index.py), as Dynamo's KV events do.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

from disagg.engine.sequence import Sequence
from disagg.kv.block_hash import chain_hashes


class Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class KVEvents:
    """Numbered log of prefix-cache changes: (number, stored?, hash); the oldest fall off, and a
    reader that fell behind them must start again from a snapshot of the whole cache."""

    def __init__(self, keep: int = 65_536) -> None:
        self.number = 0
        self._log: deque[tuple[int, bool, bytes]] = deque(maxlen=keep)

    def add(self, stored: bool, h: bytes) -> None:
        self.number += 1
        self._log.append((self.number, stored, h))

    def clear(self) -> None:
        self.number += 1
        self._log.clear()

    def since(self, number: int) -> list[tuple[int, bool, bytes]] | None:
        """What happened after event `number`, or None when some of it is no longer kept."""
        log = list(self._log)  # a copy: the engine thread appends while an HTTP thread reads
        if number >= self.number:
            return []
        if not log or log[0][0] > number + 1:
            return None
        return [e for e in log if e[0] > number]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, model_id: str, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.model_id = model_id
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self._cached: dict[bytes, int] = {}  # content hash -> block id
        self._claims: dict[int, str] = {}  # free block id -> request id that means to grow into it
        self._claimed_by: dict[str, list[int]] = {}
        self._watermark = 0  # blocks at and above it were never handed out: one long free run
        self.events = KVEvents()
        self.hits = 0  # prefix-cache hits, in blocks, counted when a request is admitted
        self.queries = 0  # full blocks looked up at admission

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
                self.events.add(True, h)
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
        if not seq.block_table and self.enable_caching:  # admission: count the prefix lookup once
            self.queries += len(seq.block_hashes)
            self.hits += len(cached)
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_registered_blocks += len(cached)
        while len(seq.block_table) * self.block_size < num_tokens:
            block_id = self._next_block(seq)
            self._take(block_id)
            seq.block_table.append(block_id)

    def _take(self, block_id: int) -> None:
        del self._free[block_id]
        owner = self._claims.pop(block_id, None)
        if owner is not None:
            self._claimed_by[owner].remove(block_id)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict the cached content this block still held
            del self._cached[block.hash]
            self.events.add(False, block.hash)
            block.hash = None
        block.ref_count = 1

    def _next_block(self, seq: Sequence) -> int:
        """The block right after `seq`'s last one if it is free and not meant for another
        sequence; else the start of a fresh run for `seq` to grow into; else the LRU free block."""
        if seq.block_table:
            nxt = seq.block_table[-1] + 1
            if nxt in self._free and self._claims.get(nxt, seq.request_id) == seq.request_id:
                return nxt
        final_blocks = -(-(seq.num_prompt_tokens + seq.max_tokens) // self.block_size)
        want = max(1, final_blocks - len(seq.block_table))
        start = self._find_run(want)
        if start is None:
            return next(iter(self._free))
        claimed = self._claimed_by.setdefault(seq.request_id, [])
        for b in range(start, start + want):
            if b not in self._free or b in self._claims:
                break
            self._claims[b] = seq.request_id
            claimed.append(b)
        return start

    def _find_run(self, length: int) -> int | None:
        """Start of the first run of `length` free, unclaimed, uncached blocks; else of the
        longest such run; None if there is none. Never-used blocks are tried first, in O(length)."""
        start = self._watermark
        if start + length <= self.num_blocks and all(b in self._free and b not in self._claims
                                                     for b in range(start, start + length)):
            self._watermark = start + length
            return start
        best_start, best_len = None, 0
        run_start, run_len = -2, 0
        for b in sorted(self._free):
            if b in self._claims or self.blocks[b].hash is not None:
                run_len = 0
                continue
            if run_len and b == run_start + run_len:
                run_len += 1
            else:
                run_start, run_len = b, 1
            if run_len > best_len:
                best_start, best_len = run_start, run_len
                if best_len >= length:
                    break
        return best_start

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody uses join the free list, tail blocks first so
        that a prompt's shared head outlives its private tail."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        for block_id in self._claimed_by.pop(seq.request_id, ()):
            del self._claims[block_id]
        seq.block_table = []
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.hash = None
        self._cached.clear()
        self.events.clear()

    def cached_hashes(self) -> list[bytes]:
        return list(self._cached)
