"""The shape of a Llama-family model, read from and written to Hugging Face's config.json.

One frozen dataclass describes every model we run or only do size math on (Llama 2/3, SmolLM,
Qwen2). Fields follow Hugging Face's names where they exist so a reader can map them at a glance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from disagg.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` is Llama 3.1's smooth low-frequency stretch."""

    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported (default, linear, llama3)")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config {self.name!r}: {name} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model config {self.name!r}: num_heads ({self.num_heads}) must be a multiple "
                              f"of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config {self.name!r}: head_dim must be even for RoPE")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count, embeddings included (tied embeddings counted once)."""
        h, layers = self.hidden_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + embed + h

    # ---- Hugging Face config.json ----

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str | None = None) -> ModelConfig:
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"architecture {arch} is not supported; disagg runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = hf["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older ones `rope_scaling`
        rope_params = hf.get("rope_parameters") or {}
        rs = hf.get("rope_scaling") or rope_params
        rope_type = rs.get("rope_type", rs.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rs.get("factor", 1.0)),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            name=name or hf.get("_name_or_path") or arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture=arch,
        )

    @classmethod
    def from_json_file(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read model config {path}: {e}") from e
        try:
            return cls.from_hf(data, name=name)
        except KeyError as e:
            raise ConfigError(f"model config {path} lacks the field {e.args[0]!r}") from e

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers loads as the same model."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if self.architecture != "Qwen2ForCausalLM":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.rope_scaling.rope_type != "default":
            rs = asdict(self.rope_scaling)
            hf["rope_scaling"] = rs
        return hf
