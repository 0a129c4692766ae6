"""Schemathesis against the worker's and the proxy's own OpenAPI documents: a bounded number of
generated requests with a fixed seed, every one answered without a 5xx, in time, and the engine
alive after. A model with a short context keeps each generated request cheap.

Schemathesis is an optional test dependency (`make test` installs it); without it these skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from disagg.engine.config import EngineConfig
from test_serve import start

TOOL = Path(sys.executable).parent / "schemathesis"  # the CLI of this environment's schemathesis
FUZZ_ENGINE = EngineConfig(model="tiny", kv_cache_memory="16MiB", device="cpu", max_model_len=96)
EXAMPLES = 25  # per operation, for the default suite


@pytest.fixture(scope="module")
def cluster():
    c = start("disaggregated", engine=FUZZ_ENGINE, kv_pool_dir="")
    yield c
    c.stop()


@pytest.mark.skipif(not TOOL.exists(), reason="schemathesis is not installed (pip install schemathesis)")
@pytest.mark.parametrize("target", ["proxy", "prefill"])
def test_generated_requests_never_get_a_server_error(cluster, target, tmp_path):
    url = cluster.url if target == "proxy" else next(u for n, u in cluster.worker_urls().items()
                                                     if n.startswith(target))
    headers = [] if target == "proxy" else ["-H", f"Authorization: {cluster.worker_headers['Authorization']}"]
    cmd = [str(TOOL), "run", url + "/openapi.json", "--checks", "not_a_server_error", "--max-examples", str(EXAMPLES),
           "--seed", "20261208", "--request-timeout", "60", "--workers", "1", "--no-color", *headers]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    for u in (cluster.url, *cluster.worker_urls().values()):  # nothing down after it
        assert httpx.get(u + "/health", timeout=5).status_code == 200
    body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    assert httpx.post(cluster.url + "/v1/completions", json=body, timeout=60).json()["usage"][
        "completion_tokens"] == 4
