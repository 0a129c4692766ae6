"""Shared fixtures: engines on the bundled model and the tiny preset, and a direct forward helper."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time

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


def start_redis(workdir) -> tuple[subprocess.Popen, str]:
    """A real redis-server on a free loopback port: (process, URL). `make test` installs it; elsewhere
    its tests skip (in CI they fail, so the pool's Redis tier is always tested there)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make test installs it)")
        pytest.skip("redis-server is not installed (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """One redis-server for the session, stopped after."""
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(10)
