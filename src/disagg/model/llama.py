"""The Llama-family forward pass: RMSNorm, RoPE, grouped-query attention over a paged KV cache,
SwiGLU MLP, tied or untied embeddings, optional q/k/v bias (Qwen2).

Tokens arrive flattened ([T] ids, [T] positions), so one matmul serves every sequence in the
step; only attention looks at sequence boundaries (see attention.py). Q/K/V and gate/up are each
one fused matmul. Logits are computed only for the rows the caller asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from disagg.model.attention import AttentionMetadata, paged_attention, write_kv
from disagg.model.config import ModelConfig, RopeScaling
from disagg.model.cpu_linear import pack_linears


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).float()
    if scaling.rope_type == "llama3":
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the band between
        # interpolated smoothly.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        stretched = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * stretched / scaling.factor + smooth * stretched
        in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(in_band, blended, stretched)
    return inv_freq.float()


class Rotary(nn.Module):
    """Precomputed cos/sin per position, applied in Hugging Face's rotate-half convention."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos = self.cos[positions].unsqueeze(1).to(xs[0].dtype)  # [T, 1, hd]
        sin = self.sin[positions].unsqueeze(1).to(xs[0].dtype)
        out = []
        for x in xs:
            half = x.shape[-1] // 2
            rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
            out.append(x * cos + rotated * sin)
        return tuple(out)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        write_kv(cache, k, v, meta.slot_mapping)
        o = paged_attention(q, cache, meta, self.scale)
        return self.o(o.view(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, rotary: Rotary, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.input_norm(h), positions, rotary, cache, meta)
        return h + self.mlp(self.post_norm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                          bias=False)
        self.rotary = Rotary(config, max_positions or config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, logits_rows: torch.Tensor,
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; returns float32 logits [len(logits_rows), vocab].
        `after_layer(i)` runs once layer i has written its KV (layer-wise KV streaming)."""
        h = self.embed(input_ids)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            h = layer(h, positions, self.rotary, cache, meta)
            if after_layer is not None:
                after_layer(i)
        h = self.norm(h[logits_rows])
        if self.lm_head is None:
            return F.linear(h, self.embed.weight).float()
        return self.lm_head(h).float()

    def pack_for_cpu(self) -> None:
        """Prepack matmul weights for oneDNN (see cpu_linear.py); tied embeddings get a packed
        copy for the output projection and keep the plain table for lookups."""
        if self.lm_head is None:
            self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            self.lm_head.weight = self.embed.weight
        pack_linears(self)

    def init_random(self, seed: int) -> None:
        """Seeded random weights (std 0.02, norms at 1), for presets without real weights."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
