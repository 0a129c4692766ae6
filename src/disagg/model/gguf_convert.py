"""GGUF file -> Hugging Face model directory, converted once and cached on disk.

Reads the file with the `gguf` package, dequantizes every tensor to float32, undoes llama.cpp's
Q/K row permutation (its RoPE pairs adjacent dims; Hugging Face's pairs halves), rebuilds the
tokenizer from the GGUF vocabulary, and writes config.json + model.safetensors + tokenizer.json.
The result is an ordinary HF directory: our loader and transformers both read it, and a second
load skips the conversion entirely.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from disagg.errors import ConfigError
from disagg.model.config import ModelConfig
from disagg.model.tokenizer import Tokenizer
from disagg.paths import cache_root

CONVERTER_VERSION = 1  # bump when the output format changes, so stale caches are not reused

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def cached_dir_for(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{digest}"


def ensure_converted(gguf_path: str | Path, name: str | None = None) -> Path:
    """The HF directory for `gguf_path`, converting it on first use. Safe against concurrent
    converters: each writes a private temporary directory and renames it into place."""
    gguf_path = Path(gguf_path)
    target = cached_dir_for(gguf_path)
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        convert(gguf_path, tmp, name=name)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():  # lost the race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the row permutation llama.cpp's converter applies to Q and K projections."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config(reader: Any, arch: str, tensor_names: set[str], num_tokens: int, name: str) -> ModelConfig:
    """The model's shape, from the GGUF's metadata."""

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    eos = [_field(reader, "tokenizer.ggml.eos_token_id")]
    if (eot := _field(reader, "tokenizer.ggml.eot_token_id")) is not None and eot not in eos:
        eos.append(eot)
    return ModelConfig(
        name=name,
        vocab_size=meta("vocab_size", num_tokens),
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_layers=meta("block_count"),
        num_heads=heads,
        num_kv_heads=meta("attention.head_count_kv", heads),
        head_dim=meta("attention.key_length", hidden // heads),
        max_position_embeddings=meta("context_length", 4096),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(e for e in eos if e is not None),
        architecture=_ARCHITECTURES[arch],
    )


def _weights(reader: Any, arch: str, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its Hugging Face name (llama's q/k rows unpermuted)."""
    import gguf

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[t.name]
            suffix = None
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
            if not m or m.group(2) not in _LAYER_NAMES:
                raise ConfigError(f"GGUF tensor {t.name!r} is not one disagg knows how to load")
            suffix = m.group(2)
            hf_name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[suffix]}"
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch == "llama" and suffix in ("attn_q.weight", "attn_q.bias"):
            w = _unpermute(w, heads)
        elif arch == "llama" and suffix in ("attn_k.weight", "attn_k.bias"):
            w = _unpermute(w, kv_heads)
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    return state


def convert(gguf_path: Path, out_dir: Path, name: str | None = None) -> None:
    import gguf  # imported here: only conversion needs it

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise ConfigError(f"cannot read GGUF file {gguf_path}: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported ({', '.join(_ARCHITECTURES)})")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError("GGUF files with rope_freqs (Llama 3.1 rope scaling) are not supported yet; "
                          "load the model's Hugging Face directory instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = _config(reader, arch, tensor_names, len(tokens), name or gguf_path.stem)
    state = _weights(reader, arch, config.num_heads, config.num_kv_heads)
    tokenizer = Tokenizer.from_gguf_vocab(
        tokens=tokens,
        token_types=_field(reader, "tokenizer.ggml.token_type"),
        merges=_field(reader, "tokenizer.ggml.merges", []),
        pre=_field(reader, "tokenizer.ggml.pre", "default"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        eos_token_ids=config.eos_token_ids,
        bos_token_id=config.bos_token_id,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_hf() | {"_name_or_path": config.name}, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}))
    tokenizer.save(out_dir)
    (out_dir / "disagg_source.json").write_text(json.dumps(
        {"gguf": str(gguf_path.resolve()), "converter_version": CONVERTER_VERSION}))
