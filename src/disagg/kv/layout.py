"""KV-cache size math, in one place.

bytes = 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes_per_element

Every other module that needs a KV size (the engine's cache sizing, `disagg models`, later the
transfer layer and the planner) asks here, so the arithmetic cannot drift apart.
"""

from __future__ import annotations

from typing import Protocol

# engine/llm_engine.py still imports format_bytes from here; it lives in disagg.units now. Remove this
# line once that import names disagg.units.
from disagg.units import format_bytes  # noqa: F401

DTYPE_BYTES = {
    "float32": 4, "fp32": 4,
    "float16": 2, "fp16": 2,
    "bfloat16": 2, "bf16": 2,
    "fp8": 1, "int8": 1,
}


class KVShape(Protocol):
    num_layers: int
    num_kv_heads: int
    head_dim: int


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown KV dtype {dtype!r}; known: {', '.join(sorted(DTYPE_BYTES))}") from None


def kv_bytes_per_token(model: KVShape, dtype: str = "fp16") -> int:
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * dtype_bytes(dtype)


def kv_bytes(model: KVShape, tokens: int, dtype: str = "fp16") -> int:
    return kv_bytes_per_token(model, dtype) * tokens
