"""The engine's configuration: one frozen, validated dataclass.

Each field's `help` metadata feeds the CLI (see cli_args.py), which also gives every field a
DISAGG_* environment twin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disagg.cli_args import described as _help
from disagg.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily so `disagg --help` stays instant
    import torch

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str | int) -> int:
    """'2GiB' -> 2147483648; '512MB' -> 512000000; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineConfig:
    """the engine (each flag also reads DISAGG_<FLAG> from the environment)"""

    model: str = field(default="smollm2-135m", metadata=_help("preset name, Hugging Face directory or .gguf file"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    dtype: str = field(default="auto", metadata=_help("auto (float32 on CPU, bfloat16 on CUDA), float32, "
                                                      "float16 or bfloat16"))
    kv_cache_memory: str = field(default="2GiB", metadata=_help("memory for the paged KV cache, e.g. 2GiB"))
    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    max_num_seqs: int = field(default=64, metadata=_help("most requests running at once"))
    max_num_batched_tokens: int = field(default=512, metadata=_help("token budget of one engine step "
                                                                    "(longer prompts are chunked)"))
    max_model_len: int | None = field(default=None, metadata=_help("context length (default: the model's, "
                                                                   "capped by the KV cache)"))
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse KV blocks of shared prompt prefixes"))
    threads: int | None = field(default=None, metadata=_help("torch threads for this engine (default: torch's)"))
    seed: int = field(default=0, metadata=_help("seed for random weights and for sampling"))
    max_num_queued_reqs: int = field(default=0, metadata=_help("requests allowed to wait for a slot; more are "
                                                               "refused with 503 and Retry-After (0: no limit)"))
    max_num_queued_tokens: int = field(default=0, metadata=_help("prompt tokens allowed to wait for a slot; more "
                                                                 "are refused with 503 and Retry-After (0: no limit)"))
    kv_max_held_fraction: float = field(default=0.5, metadata=_help(
        "most of the KV cache a prefill worker holds for decode workers; a prefill-for-remote request beyond it "
        "is refused with 503 (1: no cap)"))

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                              f"max_num_seqs ({self.max_num_seqs}) so every running request can decode each step")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ConfigError(f"max_model_len must be > 1, got {self.max_model_len}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"threads must be > 0, got {self.threads}")
        if self.max_num_queued_reqs < 0 or self.max_num_queued_tokens < 0:
            raise ConfigError("max_num_queued_reqs and max_num_queued_tokens must be >= 0 (0: no limit)")
        if not 0 < self.kv_max_held_fraction <= 1:
            raise ConfigError(f"kv_max_held_fraction must be in (0, 1], got {self.kv_max_held_fraction}")
        if parse_bytes(self.kv_cache_memory) <= 0:
            raise ConfigError("kv_cache_memory must be > 0")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        return dev

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPUs without bf16 units run bf16 matmuls many times slower
