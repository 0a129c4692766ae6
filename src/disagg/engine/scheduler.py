"""Which requests run in the next step, and how many of their tokens.

There is no prefill phase and no decode phase. Each request has `num_tokens` (prompt + outputs)
and `num_computed_tokens` (those whose KV is cached); every step spends a token budget to let the
computed count catch up. A decode is a request one token behind; a long prompt simply takes
several steps (chunked prefill); prefix-cache hits and KV loaded from elsewhere (a prefill worker,
the KV pool: engine/connector) start a request with tokens already computed.

Order within a step: running decodes first (a long prompt never starves them), then running
prompts in chunks, then waiting requests, first come first served. When blocks run out, the most
recently admitted request is preempted: its blocks are freed and it is recomputed later.

On admission the KV connector says how many tokens beyond the prefix cache's can be loaded; a
request that has some gets its blocks and waits for them in `receiving` (WAITING_FOR_KV) while the
others run; once its load reports back it rejoins the head of the queue with those tokens computed.
A request the connector cannot answer for yet is passed over, not waited on.

The scheduler holds no tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.engine.block_manager import BlockManager
from disagg.engine.connector.base import KVConnector
from disagg.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 connector: KVConnector | None = None) -> None:
        self.bm = block_manager
        self.connector = connector or KVConnector()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.receiving: dict[str, Sequence] = {}  # blocks allocated, KV on its way
        self.held: dict[str, Sequence] = {}  # finished, blocks kept until released
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.receiving)

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
        # Passed over, kept in order: requests the connector cannot answer for yet, and, once one
        # request found no room for its blocks, every later new one (first come, first served).
        # Requests back from receiving their KV still go ahead: their blocks are in place, and
        # waiting behind a request that needs the very blocks they hold would never end.
        passed: list[Sequence] = []
        full = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            returning = bool(seq.block_table)  # back from receiving its KV: its blocks are in place
            if returning:
                cached, start, loadable = [], seq.num_computed_tokens, 0
            elif full:
                passed.append(seq)
                continue
            else:
                cached = self.bm.cached_prefix(seq)
                start = len(cached) * self.bm.block_size
                loadable = self.connector.num_loadable_tokens(seq, start)
                if loadable is None:
                    passed.append(seq)
                    continue
            if loadable:
                # blocks for every token known (token 1 from prefill too), so that once its KV is in
                # the request runs without asking for more
                if not self.bm.can_allocate(seq, seq.num_tokens, cached):
                    full = True
                    passed.append(seq)
                    continue
                self._receive(seq, cached, start, loadable)
                continue
            n = min(seq.num_tokens - start, budget)
            if not self.bm.can_allocate(seq, start + n, cached):
                full = True
                passed.append(seq)
                continue
            self.bm.allocate(seq, start + n, cached)
            if not returning:
                self.connector.on_allocated(seq, start, 0)  # nothing to load: a remote source may go
            seq.num_computed_tokens = start
            seq.num_cached_tokens = seq.num_cached_tokens if returning else start
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(passed))
        return budget

    def _receive(self, seq: Sequence, cached: list[int], start: int, loadable: int) -> None:
        """Allocate blocks for the request's tokens and wait for the connector to load `loadable`
        of them from `start` on."""
        self.bm.allocate(seq, seq.num_tokens, cached)
        seq.num_computed_tokens = start
        seq.num_cached_tokens = start
        seq.status = Status.WAITING_FOR_KV
        self.receiving[seq.request_id] = seq
        self.connector.on_allocated(seq, start, loadable)

    def loaded(self, seq: Sequence, tokens: int) -> None:
        """`seq`'s load reported `tokens` tokens in place: back to the head of the queue, with them
        computed (but for one token at least, whose logits are needed). A request aborted while its
        KV was arriving is freed now that nothing writes into its blocks."""
        del self.receiving[seq.request_id]
        if seq.finished:
            self.bm.free(seq)
            return
        seq.num_computed_tokens = min(seq.num_computed_tokens + tokens, seq.num_tokens - 1)
        self.bm.register_computed_blocks(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free `seq`'s blocks and queue it for recompute; returns the budget it had taken."""
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0  # loaded KV is gone with the blocks too: recomputed
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

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None, hold: bool = False) -> None:
        """End a request (any state). Its blocks are freed, unless `hold` keeps them for a KV export
        (until `release`), or its KV is still arriving (freed when the load reports back)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        receiving = seq.status is Status.WAITING_FOR_KV
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if hold:
            self.held[seq.request_id] = seq
        elif not receiving:
            self.bm.free(seq)

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished request was holding; False if it held none."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.bm.free(seq)
        return True
