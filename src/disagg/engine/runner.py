"""One engine step on the device: scheduled requests -> input tensors -> forward -> sampled tokens.

The only engine module that touches tensors besides the KV cache. Every scheduled request's new
tokens are laid out flat, one span each (see model/attention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from disagg.engine.kv_cache import PagedKVCache
from disagg.engine.sampler import TokenLogprob, sample
from disagg.engine.scheduler import SchedulerOutput
from disagg.engine.sequence import Sequence
from disagg.model.attention import AttentionMetadata, SeqSpan, causal_chunk_mask
from disagg.model.llama import LlamaModel


def position_seed(seed: int, position: int) -> int:
    """The generator seed for output token `position` of a request seeded with `seed` (any int64)."""
    return ((seed & _MASK64) ^ ((position + 1) * 0x9E3779B97F4A7C15)) & _MASK64


_MASK64 = (1 << 64) - 1


@dataclass
class StepResult:
    tokens: dict[str, int]  # request id -> sampled token, for requests that finished their compute
    logprobs: dict[str, TokenLogprob]


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, device: torch.device, seed: int) -> None:
        self.model = model
        self.kv = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        self.group = model.config.num_heads // model.config.num_kv_heads
        self._generators: dict[str, torch.Generator] = {}
        self._default_gen = torch.Generator(device=device).manual_seed(seed)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        if seq.params.seed is None:
            return self._default_gen
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = self._generators[seq.request_id] = torch.Generator(device=self.device)
        # seeded per output position, so a request continued elsewhere (token 1 from a prefill worker,
        # a stream migrated to another worker) draws what it would have drawn here
        return gen.manual_seed(position_seed(seq.params.seed, seq.num_output_tokens))

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                      list[Sequence], list[int]]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[SeqSpan] = []
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        bs, dev = self.block_size, self.device
        for seq, n in out.scheduled:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            table = seq.block_table[: -(-end // bs)]
            contiguous = table[-1] - table[0] == len(table) - 1 and table == list(range(table[0], table[-1] + 1))
            spans.append(SeqSpan(
                row, row + n, end,
                first_block=table[0] if contiguous else None,
                block_table=None if contiguous else torch.tensor(table, dtype=torch.long, device=dev),
                mask=causal_chunk_mask(n, end, self.group, dev) if n > 1 else None,
            ))
            if end == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(row + n - 1)
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=dev), spans)
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, dtype=torch.long, device=dev),
                meta, sample_seqs, sample_rows)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, after_layer: Callable[[int], None] | None = None) -> StepResult:
        """Run the step; `after_layer(i)` once layer i has written the step's KV (a connector's save)."""
        if not out.scheduled:
            return StepResult({}, {})
        input_ids, positions, meta, seqs, rows = self._prepare(out)
        logits = self.model(input_ids, positions, self.kv.layers, meta,
                            torch.tensor(rows, dtype=torch.long, device=self.device), after_layer=after_layer)
        if not seqs:
            return StepResult({}, {})
        tokens, logprobs = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs])
        return StepResult(
            {s.request_id: t for s, t in zip(seqs, tokens, strict=True)},
            {s.request_id: lp for s, lp in zip(seqs, logprobs, strict=True) if lp is not None},
        )
