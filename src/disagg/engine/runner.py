"""One engine step on the device: scheduled requests -> input tensors -> forward -> sampled tokens.

The only engine module that touches tensors besides the KV cache. Inputs are laid out flat,
single-token requests (decodes) first, then multi-token chunks (see model/attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.engine.kv_cache import PagedKVCache
from disagg.engine.sampler import TokenLogprob, sample
from disagg.engine.scheduler import SchedulerOutput
from disagg.engine.sequence import Sequence
from disagg.model.attention import AttentionMetadata, PrefillSpan, causal_chunk_mask
from disagg.model.llama import LlamaModel


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
            gen = self._generators[seq.request_id] = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return gen

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[Sequence],
                                                      list[int]]:
        decodes = [(s, n) for s, n in out.scheduled if n == 1]
        chunks = [(s, n) for s, n in out.scheduled if n > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_seqs: list[Sequence] = []
        sample_rows: list[int] = []
        bs = self.block_size

        for seq, _ in decodes:
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            positions.append(p)
            slots.extend(self._slots(seq, p, p + 1))
            if p + 1 == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(len(ids) - 1)
        decode_tables = decode_mask = None
        if decodes:
            width = max(len(s.block_table) for s, _ in decodes)
            decode_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s, _ in decodes],
                                         dtype=torch.long)
            ctx = torch.tensor([s.num_computed_tokens + 1 for s, _ in decodes])
            decode_mask = (torch.arange(width * bs)[None, :] < ctx[:, None])[:, None, None, :]

        spans: list[PrefillSpan] = []
        for seq, n in chunks:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(seq, start, end))
            table = torch.tensor(seq.block_table[: -(-end // bs)], dtype=torch.long, device=self.device)
            spans.append(PrefillSpan(row, row + n, table, end, causal_chunk_mask(n, end, self.group, self.device)))
            if end == seq.num_tokens:
                sample_seqs.append(seq)
                sample_rows.append(row + n - 1)

        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(decodes),
            decode_block_tables=None if decode_tables is None else decode_tables.to(dev),
            decode_mask=None if decode_mask is None else decode_mask.to(dev),
            prefills=spans,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, dtype=torch.long, device=dev),
                meta, sample_seqs, sample_rows)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        if not out.scheduled:
            return StepResult({}, {})
        input_ids, positions, meta, seqs, rows = self._prepare(out)
        logits = self.model(input_ids, positions, self.kv.layers, meta,
                            torch.tensor(rows, dtype=torch.long, device=self.device))
        if not seqs:
            return StepResult({}, {})
        tokens, logprobs = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs])
        return StepResult(
            {s.request_id: t for s, t in zip(seqs, tokens, strict=True)},
            {s.request_id: lp for s, lp in zip(seqs, logprobs, strict=True) if lp is not None},
        )
