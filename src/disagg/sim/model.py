"""Model specs for the cost model, from presets or any Hugging Face config.json: parameters, FLOPs
per token (matmuls, and attention as a function of context), weight bytes, KV bytes per token."""

from __future__ import annotations

from dataclasses import dataclass

from disagg.kv.layout import dtype_bytes, kv_bytes_per_token
from disagg.model.config import ModelConfig
from disagg.model.presets import config_named


@dataclass(frozen=True)
class ModelSpec:
    config: ModelConfig

    @classmethod
    def named(cls, name: str) -> ModelSpec:
        return cls(config_named(name))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def params(self) -> int:
        return self.config.num_params()

    def weight_bytes(self, dtype: str) -> float:
        return self.params * dtype_bytes(dtype)

    @property
    def matmul_flops_per_token(self) -> float:
        """2 FLOPs per weight a token passes through: every layer and the output projection (the
        embedding lookup is not a matmul; a tied output projection still is)."""
        c = self.config
        return 2.0 * (self.params - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
                      + c.vocab_size * c.hidden_size)

    def attention_flops(self, new_tokens: int, context_before: int) -> float:
        """QK^T and AV for `new_tokens` tokens attending causally after `context_before` cached ones."""
        c = self.config
        per_pair = 4.0 * c.num_layers * c.num_heads * c.head_dim
        # token i (0-based among the new ones) sees context_before + i + 1 keys
        pairs = new_tokens * context_before + new_tokens * (new_tokens + 1) / 2
        return per_pair * pairs

    def kv_bytes_per_token(self, dtype: str) -> int:
        return kv_bytes_per_token(self.config, dtype)
