"""The cost model: how long one engine step takes on a worker, and a KV transfer on a link.

A step runs a batch of prompt chunks and decode tokens together (continuous batching), so one
function prices both and their interference: time = max(compute, memory) (a roofline, where
compute and memory traffic overlap, as on GPUs) or compute + memory (where they do not, as
calibrated on this project's CPU), plus a fixed per-step overhead, where

- compute = prompt-chunk matmul FLOPs / (peak x mfu) + their attention FLOPs / (peak x attn_mfu)
            + decode matmul FLOPs / (peak x decode_mfu)
- memory  = (weights + the KV every sequence reads) / (bandwidth x bw_util)

Efficiency factors default to the device's typical values and are replaced by a calibrated
profile (`disagg calibrate`). A worker spans `tp` devices (tensor parallel, when the weights do
not fit one): compute and bandwidth scale by tp x tp_efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagg.errors import ConfigError
from disagg.sim.hardware import Device
from disagg.sim.model import ModelSpec


@dataclass(frozen=True)
class Efficiency:
    mfu: float  # prefill: share of peak FLOP/s achieved
    decode_mfu: float  # decode matmuls (small M): share of peak achieved
    bw_util: float  # share of memory bandwidth achieved
    step_overhead: float  # seconds per step
    attn_mfu: float = 0.0  # prefill attention (0: as mfu)
    overlap: bool = True

    @classmethod
    def of(cls, device: Device) -> Efficiency:
        return cls(device.mfu, device.decode_mfu or device.mfu, device.bw_util, device.step_overhead,
                   device.attn_mfu or device.mfu, device.overlap)


@dataclass(frozen=True)
class WorkerCost:
    model: ModelSpec
    device: Device
    dtype: str = "bf16"
    eff: Efficiency | None = None
    tp: int = 1
    tp_efficiency: float = 0.9

    @classmethod
    def fit(cls, model: ModelSpec, device: Device, dtype: str, eff: Efficiency | None = None,
            mem_fraction: float = 0.9) -> WorkerCost:
        """A worker on as few devices as hold the weights with room for KV (powers of two)."""
        need = model.weight_bytes(dtype) / (device.mem_bytes * mem_fraction * 0.8)
        tp = 1 << max(0, math.ceil(math.log2(max(need, 1.0))))
        if tp > 64:
            raise ConfigError(f"{model.name} in {dtype} needs more than 64 {device.name} devices for its weights")
        return cls(model, device, dtype, eff, tp)

    @property
    def e(self) -> Efficiency:
        return self.eff or Efficiency.of(self.device)

    @property
    def scale(self) -> float:
        return self.tp * (self.tp_efficiency if self.tp > 1 else 1.0)

    def kv_capacity_tokens(self, mem_fraction: float = 0.9) -> int:
        free = self.device.mem_bytes * self.tp * mem_fraction - self.model.weight_bytes(self.dtype)
        return max(0, int(free // self.model.kv_bytes_per_token(self.dtype)))

    def step_time(self, chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """One step: prompt chunks as (new tokens, tokens already cached), and one token for each
        decoding sequence (its context length)."""
        if not chunks and not decode_contexts:
            return 0.0
        m, e = self.model, self.e
        peak = self.device.peak(self.dtype) * self.scale
        matmul = sum(n for n, _ in chunks) * m.matmul_flops_per_token
        attention = sum(m.attention_flops(n, c) for n, c in chunks)
        decode_flops = sum(m.matmul_flops_per_token + m.attention_flops(1, c) for c in decode_contexts)
        compute = (matmul / e.mfu + attention / (e.attn_mfu or e.mfu) + decode_flops / e.decode_mfu) / peak
        kv_read = m.kv_bytes_per_token(self.dtype) * (sum(c for _, c in chunks) + sum(decode_contexts))
        memory = (m.weight_bytes(self.dtype) + kv_read) / (self.device.mem_bw * self.scale * e.bw_util)
        return (max(compute, memory) if e.overlap else compute + memory) + e.step_overhead

    def prefill_time(self, tokens: int, token_budget: int | None = None) -> float:
        """A prompt alone, in chunks of `token_budget` tokens (one step without a budget)."""
        budget = token_budget or tokens
        return sum(self.step_time([(min(budget, tokens - done), done)], []) for done in range(0, tokens, budget))

    def decode_step_time(self, batch: int, context: int) -> float:
        return self.step_time([], [context] * batch)
