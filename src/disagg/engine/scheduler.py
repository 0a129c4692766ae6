"""Which requests run in the next step, and how many of their tokens.

There is no prefill phase and no decode phase. Each request has `num_tokens` (prompt + outputs)
and `num_computed_tokens` (those whose KV is cached); every step spends a token budget to let the
computed count catch up. A decode is a request one token behind; a long prompt simply takes
several steps (chunked prefill); prefix-cache hits and KV imported from a prefill worker start a
request with tokens already computed.

Order within a step: running decodes first (a long prompt never starves them), then running
prompts in chunks, then waiting requests, first come first served. When blocks run out, the most
recently admitted request is preempted: its blocks are freed and it is recomputed later.

The scheduler holds no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.engine.block_manager import BlockManager
from disagg.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, new tokens this step)
    imports: list[Sequence] = field(default_factory=list)  # admitted with imported KV to write first
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.held: dict[str, Sequence] = {}  # finished, blocks kept until released
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prompts = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prompts:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, seq.num_computed_tokens + n)
                out.scheduled.append((seq, n))
                budget -= n
        if not out.preempted:
            budget = self._admit(budget, out)
        return out

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_imported_tokens:
                cached: list[int] = []
                start = seq.num_imported_tokens
            else:
                cached = self.bm.cached_prefix(seq)
                start = len(cached) * self.bm.block_size
            n = min(seq.num_tokens - start, budget)
            if not self.bm.can_allocate(seq, start + n, cached):
                break
            self.bm.allocate(seq, start + n, cached)
            self.waiting.popleft()
            seq.num_computed_tokens = start
            seq.num_cached_tokens = len(cached) * self.bm.block_size
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.num_imported_tokens:
                out.imports.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return budget

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free `seq`'s blocks and queue it for recompute; returns the budget it had taken."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        seq.num_imported_tokens = 0  # imported KV is gone with the blocks: recompute it
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
        for i, (s, n) in enumerate(out.scheduled):
            if s is seq:
                del out.scheduled[i]
                return n
        return 0

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens; returns requests that got a token."""
        got_token = []
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            self.bm.register_computed_blocks(seq)
            token = sampled.get(seq.request_id)
            if token is not None:
                seq.token_ids.append(token)
                got_token.append(seq)
        return got_token

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request (any state); frees its blocks unless it holds them for a KV export."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq.hold_blocks and reason != "abort":
            self.held[seq.request_id] = seq
        else:
            self.bm.free(seq)

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished request was holding; False if it held none."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.bm.free(seq)
        return True
