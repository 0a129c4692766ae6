"""KV wire codecs: how exported KV blocks are squeezed for the trip between workers.

Exports are [layers, 2 (K, V), kv_heads, blocks, block_size, head_dim]. Each codec turns one into a
dict of named tensors (what goes on the wire) and back:

- none:  the model's dtype as is
- fp16:  half precision
- fp8:   float8 e4m3, one scale per (layer, K/V, head)
- int8:  symmetric; keys per channel, values per token
- int4:  asymmetric, two values a byte; keys per channel, values per token (KIVI's split: key
         outliers live in channels, value outliers in tokens)

Scales are float32 and counted in the sizes. Bytes per token, in one place: `bytes_per_token`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from disagg.kv.framing import KVTransferError

CODECS = ("none", "fp16", "fp8", "int8", "int4")
Parts = dict[str, torch.Tensor]


def bytes_per_token(codec: str, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> float:
    """Wire bytes per token, scales included (per-transfer constants, like fp8's scales, excluded)."""
    elements = 2 * layers * kv_heads * head_dim
    per_head_token = layers * kv_heads  # one (K or V) head vector per layer for each token
    if codec == "none":
        return elements * dtype_bytes
    if codec == "fp16":
        return elements * 2
    if codec == "fp8":
        return elements
    if codec == "int8":
        return elements + per_head_token * 4  # V: a float32 scale per head vector (K's are per channel)
    if codec == "int4":
        return elements / 2 + per_head_token * 8  # V: float32 scale and zero per head vector
    raise ValueError(f"unknown KV codec {codec!r}; known: {', '.join(CODECS)}")


def _none(kv: torch.Tensor) -> Parts:
    return {"data": kv}


def _fp16(kv: torch.Tensor) -> Parts:
    return {"data": kv.to(torch.float16)}


def _fp8(kv: torch.Tensor) -> Parts:
    x = kv.float()
    scale = x.abs().amax(dim=(3, 4, 5), keepdim=True).clamp(min=1e-8) / 448.0  # e4m3's largest normal
    return {"data": (x / scale).to(torch.float8_e4m3fn), "scale": scale}


def _int8(kv: torch.Tensor) -> Parts:
    x = kv.float()
    k_scale = x[:, 0:1].abs().amax(dim=(3, 4), keepdim=True).clamp(min=1e-8) / 127.0  # keys: per channel
    v_scale = x[:, 1:2].abs().amax(dim=5, keepdim=True).clamp(min=1e-8) / 127.0  # values: per token
    q = torch.cat([torch.round(x[:, 0:1] / k_scale), torch.round(x[:, 1:2] / v_scale)], dim=1)
    return {"data": q.to(torch.int8), "k_scale": k_scale, "v_scale": v_scale}


def _quant4(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lo = x.amin(dim=dims, keepdim=True)
    scale = (x.amax(dim=dims, keepdim=True) - lo).clamp(min=1e-8) / 15.0
    q = torch.round((x - lo) / scale).clamp(0, 15).to(torch.uint8)
    return q, scale, lo


def _int4(kv: torch.Tensor) -> Parts:
    x = kv.float()
    kq, ks, kz = _quant4(x[:, 0], dims=(2, 3))  # keys: per channel, over every token
    vq, vs, vz = _quant4(x[:, 1], dims=(4,))  # values: per token, over channels
    q = torch.stack([kq, vq], dim=1).flatten()
    packed = (q[0::2] | (q[1::2] << 4)) if q.numel() % 2 == 0 else None
    if packed is None:
        raise ValueError("int4 needs an even number of elements")
    return {"data": packed, "k_scale": ks, "k_zero": kz, "v_scale": vs, "v_zero": vz}


_ENCODERS: dict[str, Callable[[torch.Tensor], Parts]] = {
    "none": _none, "fp16": _fp16, "fp8": _fp8, "int8": _int8, "int4": _int4,
}


def encode(codec: str, kv: torch.Tensor) -> Parts:
    try:
        return _ENCODERS[codec](kv)
    except KeyError:
        raise ValueError(f"unknown KV codec {codec!r}; known: {', '.join(CODECS)}") from None


def decode(codec: str, parts: Parts, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rebuild an export of `shape` in `dtype` from `encode(codec, ...)`'s parts."""
    if codec in ("none", "fp16"):
        return parts["data"].to(dtype).reshape(shape)
    if codec == "fp8":
        return (parts["data"].float() * parts["scale"]).to(dtype).reshape(shape)
    if codec == "int8":
        q = parts["data"].float()
        return torch.cat([q[:, 0:1] * parts["k_scale"], q[:, 1:2] * parts["v_scale"]], dim=1).to(dtype)
    if codec == "int4":
        packed = parts["data"]
        q = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().float().reshape(
            shape[0], 2, *shape[2:])
        k = q[:, 0] * parts["k_scale"] + parts["k_zero"]
        v = q[:, 1] * parts["v_scale"] + parts["v_zero"]
        return torch.stack([k, v], dim=1).to(dtype)
    raise ValueError(f"unknown KV codec {codec!r}; known: {', '.join(CODECS)}")


def wire_bytes(parts: Parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ---- coded KV on the wire: the parts go back to back, described by [name, dtype, shape] ----

PART_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
               "uint8": torch.uint8, "float8_e4m3fn": torch.float8_e4m3fn}
WirePart = tuple[str, torch.dtype, tuple[int, ...]]


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def assemble(views: tuple[memoryview, ...], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """One tensor from byte views in export order (a copy)."""
    buf = receive_buffer(sum(v.nbytes for v in views))
    off = 0
    for v in views:
        buf[off : off + v.nbytes] = torch.frombuffer(v, dtype=torch.uint8)
        off += v.nbytes
    return buf.view(dtype).reshape(shape)


def receive_buffer(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8)


def copy_into(t: torch.Tensor, views: list[memoryview]) -> None:
    """Copy a tensor's bytes into views that together are exactly as long, in order."""
    src = t.contiguous().view(-1).view(torch.uint8)
    if src.numel() != sum(v.nbytes for v in views):
        raise ValueError("decoded KV does not fit the memory given for it")
    off = 0
    for v in views:
        torch.frombuffer(v, dtype=torch.uint8).copy_(src[off : off + v.nbytes])
        off += v.nbytes


def check_parts(head: dict, codec: str) -> list[WirePart]:
    """The parts a header announces, each checked."""
    if head.get("codec") != codec or not isinstance(head.get("parts"), list) or len(head["parts"]) > 8:
        raise KVTransferError(f"the KV port did not encode with {codec}")
    parts = []
    for meta in head["parts"]:
        if not (isinstance(meta, list) and len(meta) == 3 and isinstance(meta[0], str) and meta[1] in PART_DTYPES
                and isinstance(meta[2], list) and len(meta[2]) <= 8
                and all(isinstance(d, int) and d >= 0 for d in meta[2])):
            raise KVTransferError("malformed KV part")
        parts.append((meta[0], PART_DTYPES[meta[1]], tuple(meta[2])))
    return parts


def parts_bytes(parts: list[WirePart]) -> int:
    return sum(nbytes(s, d) for _, d, s in parts)


def decode_parts(codec: str, buf: torch.Tensor, parts: list[WirePart], shape: tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
    named, off = {}, 0
    for name, d, s in parts:
        n = nbytes(s, d)
        named[name] = buf[off : off + n].view(d).reshape(s)
        off += n
    try:
        return decode(codec, named, shape, dtype)
    except (RuntimeError, KeyError, ValueError) as e:
        raise KVTransferError(f"KV parts do not decode with {codec}: {e}") from e
