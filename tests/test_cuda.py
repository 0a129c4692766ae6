"""The CUDA path: run on a GPU machine with `pytest -m gpu`. Random-weight presets only, so no
model package is needed there."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import full_logits, make_engine
from disagg.engine.sampling import SamplingParams
from disagg.model.loader import load_model, resolve

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Water boils at a temperature of " * 5]


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-0.5b"])
def test_cuda_fp32_logits_match_cpu(preset):
    source = resolve(preset)
    ids = torch.randint(3, 250, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    cpu = full_logits(load_model(source, dtype=torch.float32, device=torch.device("cpu"), max_positions=512), ids)
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu_model = load_model(source, dtype=torch.float32, device=torch.device("cuda"), max_positions=512)
    gpu = full_logits(gpu_model, ids).cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-3


def test_cuda_batching_and_kv_handoff_through_the_connector_fp32():
    from disagg.kv.fake import FakeNetwork
    from disagg.kv.params import KVTransferParams
    from test_kv_connector import PROMPT, Worker, prefill_then, run, tokens

    engine = make_engine(model="tiny", device="cuda", dtype="float32", kv_cache_memory="64MiB")
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == alone

    network = FakeNetwork()
    gpu = {"device": "cuda", "dtype": "float32", "kv_cache_memory": "64MiB"}
    expected = engine.generate([PROMPT], GREEDY)[0].token_ids
    # pull from a GPU prefill (exported as a copy) into a GPU decode (staged, then written in place),
    # the decode holding the prompt's first blocks already: only the rest moves
    prefill, decode = Worker(network, **gpu), Worker(network, **gpu)
    decode.engine.generate([PROMPT[:40]], SamplingParams(max_tokens=1))
    kvp = prefill_then(prefill)
    decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams.model_validate(kvp))
    assert kvp["first_token_ids"] + tokens(run(prefill, decode)["dec"]) == expected
    assert decode.metrics.n["received"] == 3 * decode.engine.kv_cache.block_bytes
    # a CPU prefill pushes layer by layer into a GPU decode
    cpu_prefill, gpu_decode = Worker(network), Worker(network, **gpu)
    push = {"push_id": "p1", "push_host": gpu_decode.address.host, "push_port": gpu_decode.address.port}
    gpu_decode.engine.add_request("dec", PROMPT, GREEDY, KVTransferParams(do_remote_prefill=True, push_id="p1"))
    cpu_prefill.engine.add_request("pre", PROMPT, GREEDY, KVTransferParams(do_remote_decode=True, **push))
    outs = run(cpu_prefill, gpu_decode)
    assert gpu_decode.metrics.n["via_push"] == 1
    assert tokens(outs["pre"]) + tokens(outs["dec"]) == expected
    for w in (prefill, decode, cpu_prefill, gpu_decode):
        assert w.used() == 0
        w.close()


def test_cuda_defaults_to_half_precision_and_runs_a_batch():
    engine = make_engine(model="llama-3.2-1b", device="cuda", kv_cache_memory="1GiB")
    assert engine.dtype in (torch.bfloat16, torch.float16)
    outs = engine.generate(PROMPTS * 3, SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True))
    assert all(len(c.token_ids) == 8 for c in outs)
    assert engine.block_manager.num_used_blocks == 0


# ---- the serving stack on one GPU: workers started by hand (`disagg up` gives each worker its own GPU) ----


def _spawn(args: list[str], log) -> tuple[subprocess.Popen, str]:
    from disagg.serve.launcher import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "disagg.cli", *args, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{url} never became healthy")


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_cuda_serving_disaggregated_pull_push_pool_and_prefix_routing(tmp_path):
    """Greedy token ids on CUDA (fp32, a random 0.5B model): one worker alone, 1P1D pulling, 1P1D with
    --kv-push (which falls back to pulling from a CUDA cache), and a second worker loading the first's
    KV from a shared disk pool; the proxy's prefix routing follows CUDA workers' reports."""
    engine = ["--model", "qwen2.5-0.5b", "--device", "cuda", "--dtype", "float32", "--kv-cache-memory", "2GiB"]
    pool = str(tmp_path / "pool")
    log = open(tmp_path / "servers.log", "wb")  # noqa: SIM115 - closed in finally
    procs = []
    try:
        def serve(*extra: str) -> str:
            proc, url = _spawn(["serve", *engine, *extra], log)
            procs.append(proc)
            return url

        alone, other = serve("--kv-pool-dir", pool), serve("--kv-pool-dir", pool)
        prefill, decode = serve("--role", "prefill"), serve("--role", "decode")
        proxies = {}
        for name, extra in (("pull", []), ("push", ["--kv-push"])):
            proc, url = _spawn(["proxy", "--mode", "disaggregated", "--prefill", prefill, "--decode", decode, *extra],
                               log)
            procs.append(proc)
            proxies[name] = url
        proc, replicated = _spawn(["proxy", "--mode", "replicated", "--worker", alone, "--worker", other], log)
        procs.append(proc)
        for url in (alone, other, prefill, decode, *proxies.values(), replicated):
            _ready(url)

        def ids(url: str, prompt: str) -> list[int]:
            r = httpx.post(url + "/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        for prompt in PROMPTS:
            expected = ids(alone, prompt)
            assert ids(proxies["pull"], prompt) == expected
            assert ids(proxies["push"], prompt) == expected
        assert _metric(decode, "disagg_kv_pulls_total") == 2 * len(PROMPTS)
        assert _metric(decode, "disagg_kv_pull_failures_total") == 0
        long = PROMPTS[2] * 4  # ~640 byte-level tokens: 40 full blocks, new to every worker
        first = ids(alone, long)
        deadline = time.monotonic() + 30
        while _metric(alone, 'disagg_kv_pool_written_bytes_total{tier="disk"}') == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ids(other, long) == first  # from the pool, onto another worker's GPU
        assert _metric(other, 'disagg_kv_pool_hit_blocks_total{tier="disk"}') > 0
        health = httpx.get(replicated + "/health", timeout=5).json()
        assert all(v["reporting"] for v in health["kv_index"].values()), health
        assert len(ids(replicated, long)) == 16
        deadline = time.monotonic() + 30  # released KV (a decode's pull, a lease) is freed asynchronously
        while any(_metric(u, "disagg_kv_blocks_used") for u in (alone, other, prefill, decode)):
            assert time.monotonic() < deadline, "KV blocks leaked"
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(20)
        log.close()
