"""Shared fixtures: engines on the bundled model and the tiny preset, and a direct forward helper."""

from __future__ import annotations

import functools

import pytest
import torch

from disagg.engine.config import EngineConfig
from disagg.engine.llm_engine import LLMEngine
from disagg.model.attention import AttentionMetadata, SeqSpan, causal_chunk_mask
from disagg.model.llama import LlamaModel

THREADS = 2


@functools.cache
def _engine(**kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(**({"threads": THREADS, "device": "cpu"} | kwargs)))


def make_engine(**kwargs) -> LLMEngine:
    """A fresh engine (own KV cache and scheduler state)."""
    return LLMEngine(EngineConfig(**({"threads": THREADS, "device": "cpu"} | kwargs)))


@pytest.fixture(scope="session")
def smol() -> LLMEngine:
    """The bundled model with default settings, shared: tests must leave it idle and empty."""
    return _engine(model="smollm2-135m", kv_cache_memory="512MiB")


@pytest.fixture(scope="session")
def tiny() -> LLMEngine:
    return _engine(model="tiny", kv_cache_memory="16MiB")


@pytest.fixture(autouse=True)
def _engines_left_clean(request):
    yield
    for name in ("smol", "tiny"):
        if name in request.fixturenames:
            engine = request.getfixturevalue(name)
            assert not engine.has_unfinished(), f"test left requests in the shared {name} engine"
            assert engine.block_manager.num_used_blocks == 0, f"test leaked KV blocks in the shared {name} engine"


def full_logits(model: LlamaModel, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of `ids`, from one prefill through a scratch paged cache."""
    cfg = model.config
    n = len(ids)
    blocks = -(-n // block_size)
    param = next(model.parameters())
    caches = [torch.zeros(2, cfg.num_kv_heads, blocks, block_size, cfg.head_dim, dtype=param.dtype,
                          device=param.device) for _ in range(cfg.num_layers)]
    group = cfg.num_heads // cfg.num_kv_heads
    dev = param.device
    span = SeqSpan(0, n, n, first_block=0, block_table=None, mask=causal_chunk_mask(n, n, group, dev))
    meta = AttentionMetadata(torch.arange(n, device=dev), [span])
    with torch.inference_mode():
        positions = torch.arange(n, device=dev)
        return model(torch.tensor(ids, device=dev), positions, caches, meta, positions)
