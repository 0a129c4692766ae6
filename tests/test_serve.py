"""The three architectures as real processes on loopback, through the official openai client."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import shutil
import signal
import tempfile
import time

import httpx
import openai
import pytest

from conftest import make_engine
from disagg.engine.config import EngineConfig
from disagg.engine.sampling import SamplingParams
from disagg.kv import nixl
from disagg.kv.layout import kv_bytes_per_token
from disagg.model.loader import resolve
from disagg.model.presets import PRESETS
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions

MODEL = "smollm2-135m"
ENGINE = EngineConfig(model=MODEL, kv_cache_memory="256MiB", device="cpu")
PROMPTS = [
    "The capital of France is",
    "List three colours of the rainbow:",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
MAX_TOKENS = 8


POOLS = tempfile.mkdtemp(prefix="disagg-test-pools-")
atexit.register(shutil.rmtree, POOLS, True)


def start(arch: str, **kw) -> Cluster:
    """A cluster with the launcher's defaults, but a disk pool of its own (not the user's cache)."""
    budget = kw.pop("budget", 1 if arch == "single" else 2)
    kw.setdefault("kv_pool_dir", tempfile.mkdtemp(dir=POOLS))
    engine = kw.pop("engine", ENGINE)
    opts = UpOptions(arch=arch, budget=budget, port=free_port(), startup_timeout=120, **kw)
    return Cluster(opts, engine).start()


@pytest.fixture(scope="module", params=["single", "replicated", "disaggregated"])
def cluster(request):
    c = start(request.param)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of an in-process engine with a worker's settings (one thread)."""
    engine = make_engine(model=MODEL, kv_cache_memory="256MiB", threads=1)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [c.text for c in engine.generate(PROMPTS, params)]


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(disagg_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def wait_until(predicate, timeout: float = 15.0) -> bool:
    """Poll for an effect that happens asynchronously (an abort, a lease expiry), with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def all_blocks_free(c: Cluster) -> bool:
    return all(metrics(u)["disagg_kv_blocks_used"] == 0 and metrics(u)["disagg_kv_held_requests"] == 0
               and metrics(u)["disagg_requests_running"] == 0 for u in c.worker_urls().values())


def test_greedy_completions_match_the_reference(cluster, reference):
    cl = client(cluster)
    kw = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    texts = [cl.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    assert texts == reference
    streamed = ["".join(ch.choices[0].text for ch in cl.completions.create(prompt=p, stream=True, **kw))
                for p in PROMPTS]
    assert streamed == reference
    assert wait_until(lambda: all_blocks_free(cluster))


def test_chat_streaming_with_usage(cluster):
    cl = client(cluster)
    stream = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of "
                                                                "France?"}], max_tokens=30, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"  # OpenAI streams open with the role
    assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1  # once
    assert len({c.id for c in chunks}) == 1  # one id, whichever worker sent the chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= 30
    whole = cl.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of "
                                                              "France?"}], max_tokens=30, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_return_token_ids_gives_the_prompt_and_every_generated_id(cluster):
    tok = resolve(MODEL).tokenizer
    prompt = PROMPTS[3]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(cluster.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert whole["prompt_token_ids"] == tok.encode(prompt)
    assert len(whole["token_ids"]) == MAX_TOKENS  # token 1 from prefill included, in disaggregated too
    assert tok.decode(whole["token_ids"]) == whole["text"]
    ids, prompt_ids = [], []
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                ids += choice["token_ids"]
                prompt_ids += [choice["prompt_token_ids"]] if "prompt_token_ids" in choice else []
    assert ids == whole["token_ids"]
    assert prompt_ids == [whole["prompt_token_ids"]]  # once, in the first chunk
    chat = httpx.post(cluster.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "return_token_ids": True,
        "ignore_eos": True}).json()
    assert len(chat["choices"][0]["token_ids"]) == 3
    assert chat["prompt_token_ids"] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]))
    plain = httpx.post(cluster.url + "/v1/completions", json=body | {"return_token_ids": False}, timeout=60).json()
    assert "token_ids" not in plain["choices"][0]


def test_eight_concurrent_requests_of_mixed_lengths(cluster):
    async def main():
        cl = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompts = [" ".join(["word"] * (5 + 40 * i)) for i in range(8)]
        outs = await asyncio.gather(*(cl.completions.create(model=MODEL, prompt=p, max_tokens=4 + i, temperature=0,
                                                            extra_body={"ignore_eos": True})
                                      for i, p in enumerate(prompts)))
        await cl.close()
        return outs

    outs = asyncio.run(main())
    assert [o.usage.completion_tokens for o in outs] == [4 + i for i in range(8)]
    assert all(o.choices[0].finish_reason == "length" for o in outs)
    assert wait_until(lambda: all_blocks_free(cluster))


def test_errors_are_openai_errors(cluster):
    cl = client(cluster)
    limit = httpx.get(cluster.url + "/v1/models").json()["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError) as e:
        cl.completions.create(model=MODEL, prompt="word " * (limit + 10), max_tokens=4)
    assert f"maximum context length is {limit} tokens" in str(e.value)
    assert f"the prompt has {limit + 11}" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        cl.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        cl.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=-1)
    r = httpx.post(cluster.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"]
    # and the cluster still serves
    assert cl.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_aborts_on_every_worker(cluster):
    with httpx.stream("POST", cluster.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(line.startswith("data:") for line in got)
    assert wait_until(lambda: all_blocks_free(cluster))


@pytest.mark.parametrize("transport", ["tcp", "shm", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl.available(), reason="NIXL is not installed (pip install --no-deps nixl-cu12)"))])
def test_disaggregated_kv_bytes_match_the_size_formula(transport, reference):
    with start("disaggregated", kv_transport=transport, **NO_KV_POOL) as c:  # every block over the transport
        decode = next(u for n, u in c.worker_urls().items() if n.startswith("decode"))
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        per_token = kv_bytes_per_token(PRESETS[MODEL].config, "fp32")
        for prompt, expected in zip(PROMPTS, reference, strict=True):
            before = metrics(decode)["disagg_kv_bytes_received_total"]
            r = client(c).completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"ignore_eos": True})
            assert r.choices[0].text == expected
            n = r.usage.prompt_tokens
            blocks = -(-n // 16)  # whole blocks move, as in vLLM
            assert metrics(decode)["disagg_kv_bytes_received_total"] - before == blocks * 16 * per_token
        assert metrics(prefill)["disagg_kv_bytes_sent_total"] == metrics(decode)["disagg_kv_bytes_received_total"]
        assert metrics(decode)["disagg_kv_pull_failures_total"] == 0
        assert metrics(decode)[f'disagg_kv_pulls_total{{via="{transport}"}}'] == len(PROMPTS)
        assert wait_until(lambda: all_blocks_free(c))


def test_lease_expiry_frees_blocks_decode_never_pulled():
    with start("disaggregated", kv_lease=1.0) as c:
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        r = httpx.post(prefill + "/v1/completions", timeout=60, headers=c.worker_headers, json={
            "model": MODEL, "prompt": "A prompt whose KV nobody pulls", "max_tokens": 8,
            "kv_transfer_params": {"do_remote_decode": True}})
        assert r.json()["kv_transfer_params"]["remote_block_ids"]
        assert metrics(prefill)["disagg_kv_held_requests"] == 1
        assert wait_until(lambda: metrics(prefill)["disagg_kv_held_requests"] == 0, timeout=10)
        assert metrics(prefill)["disagg_kv_blocks_used"] == 0
        assert metrics(prefill)["disagg_kv_leases_expired_total"] == 1


@pytest.mark.parametrize("stream_first_token", [True, False])
def test_ttft_both_ways_give_the_same_tokens(reference, stream_first_token):
    with start("disaggregated", stream_first_token=stream_first_token) as c:
        kw = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
        texts = ["".join(ch.choices[0].text for ch in client(c).completions.create(prompt=p, stream=True, **kw))
                 for p in PROMPTS]
        assert texts == reference


def test_a_killed_worker_gives_a_prompt_error_and_the_rest_still_serve():
    with start("replicated") as c:
        cl = client(c)
        victim = c.procs["both-0"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        t0 = time.monotonic()
        for _ in range(4):  # round-robin would pick the dead worker for half of these
            assert cl.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        assert time.monotonic() - t0 < 30
    with start("single") as c:
        os.kill(c.procs["both-0"].pid, signal.SIGKILL)
        c.procs["both-0"].wait()
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client(c).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 502
        assert time.monotonic() - t0 < 10


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_disagg_up_serves_and_sigterm_leaves_no_process(tmp_path):
    import subprocess
    import sys
    import uuid

    marker = f"DISAGG_TEST_MARKER_{uuid.uuid4().hex}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")} | {
        "TEST_MARKER": marker, "DISAGG_KV_POOL_DIR": str(tmp_path / "pool")}
    proc = subprocess.Popen([sys.executable, "-m", "disagg.cli", "up", "--arch", "disaggregated", "--budget", "2",
                             "--model", "tiny", "--kv-cache-memory", "16MiB", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "ready at" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in lines[-1], lines
        assert "prefill-0 on cpu" in lines[0]
        assert "decode-1 on cpu" in lines[0]
        assert len(_processes_with(marker)) == 4  # launcher, prefill, decode, proxy
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                                        "ignore_eos": True}, timeout=30)
        assert r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert wait_until(lambda: not _processes_with(marker), timeout=10)
    finally:
        proc.kill()


def test_decode_recomputes_when_the_kv_belongs_to_another_prompt(reference):
    with start("disaggregated") as c:
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        decode = next(u for n, u in c.worker_urls().items() if n.startswith("decode"))
        held = httpx.post(prefill + "/v1/completions", timeout=60, headers=c.worker_headers, json={
            "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
        kvp = held.json()["kv_transfer_params"]
        kvp.pop("first_token_ids")
        r = httpx.post(decode + "/v1/completions", timeout=60, headers=c.worker_headers, json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "kv_transfer_params": kvp})
        assert r.json()["choices"][0]["text"] == reference[0]  # right answer for its own prompt
        assert metrics(decode)["disagg_kv_pull_failures_total"] == 1
        assert wait_until(lambda: all_blocks_free(c))


def test_decode_with_a_wire_codec_gets_the_same_tokens_from_fewer_bytes(reference):
    with start("disaggregated", kv_codec="fp16", **NO_KV_POOL) as c:
        decode = next(u for n, u in c.worker_urls().items() if n.startswith("decode"))
        prefill = next(u for n, u in c.worker_urls().items() if n.startswith("prefill"))
        kw = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
        texts = [client(c).completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
        assert texts == reference  # fp16 of an fp32 cache keeps these greedy tokens
        per_token = kv_bytes_per_token(PRESETS[MODEL].config, "fp16")
        tokenizer = resolve(MODEL).tokenizer
        blocks = sum(-(-len(tokenizer.encode(p)) // 16) for p in PROMPTS)
        assert metrics(decode)["disagg_kv_bytes_received_total"] == blocks * 16 * per_token
        assert metrics(prefill)["disagg_kv_bytes_sent_total"] == metrics(decode)["disagg_kv_bytes_received_total"]
        assert metrics(decode)["disagg_kv_pull_failures_total"] == 0


def test_layer_wise_push_gives_the_same_tokens_and_frees_everything(reference):
    with start("disaggregated", kv_push=True) as c:
        decode = next(u for n, u in c.worker_urls().items() if n.startswith("decode"))
        kw = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
        whole = [client(c).completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
        streamed = ["".join(ch.choices[0].text for ch in client(c).completions.create(prompt=p, stream=True, **kw))
                    for p in PROMPTS]
        assert whole == reference
        assert streamed == reference
        assert metrics(decode)['disagg_kv_pulls_total{via="push"}'] == 2 * len(PROMPTS)
        assert metrics(decode)["disagg_kv_pull_failures_total"] == 0
        assert wait_until(lambda: all_blocks_free(c))
        # a request prefill refuses must not leave decode waiting for a push, holding blocks
        with pytest.raises(openai.BadRequestError):
            client(c).completions.create(model=MODEL, prompt="hi " * 9000, max_tokens=4)
        assert wait_until(lambda: all_blocks_free(c), timeout=5)


def test_a_push_that_never_comes_does_not_keep_decode_blocks(reference):
    with start("disaggregated", kv_push=True, restart=False) as c:
        decode = next(u for n, u in c.worker_urls().items() if n.startswith("decode"))
        victim = c.procs["prefill-0"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        r = client(c).completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert r.choices[0].text == reference[3]  # no prefill worker left: the decode worker prefilled it
        # the decode request had reserved blocks for the push; the proxy's cancel frees them long
        # before the 30 s wait would
        assert wait_until(lambda: metrics(decode)["disagg_kv_blocks_used"] == 0, timeout=5)
        assert metrics(decode)["disagg_kv_pull_failures_total"] == 1


def _greedy(url: str, prompt: str, headers: dict | None = None) -> dict:
    return httpx.post(url + "/v1/completions", timeout=60, headers=headers, json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}).json()


@pytest.mark.parametrize("tier", ["disk", "redis"])
def test_a_replica_serves_a_prefix_the_other_computed_from_the_shared_pool(tier, tmp_path, request):
    prompt = PROMPTS[3] * 3  # several full blocks
    with start("single", **NO_KV_POOL) as c:  # without a pool: the reference continuation
        expected = _greedy(c.url, prompt)["choices"][0]["text"]
    shared = ({"kv_pool_dir": str(tmp_path / "pool")} if tier == "disk" else
              {"kv_pool_dir": "", "kv_pool_redis": request.getfixturevalue("redis_url")})
    with start("replicated", **shared) as c:
        urls = list(c.worker_urls().values())
        assert _greedy(urls[0], prompt, c.worker_headers)["choices"][0]["text"] == expected
        assert wait_until(lambda: metrics(urls[0]).get(f'disagg_kv_pool_written_bytes_total{{tier="{tier}"}}', 0) > 0)
        second = _greedy(urls[1], prompt, c.worker_headers)
        assert second["choices"][0]["text"] == expected  # the same greedy tokens from pooled KV
        blocks = second["usage"]["prompt_tokens"] // 16  # every full block of the prompt was hit
        m = metrics(urls[1])
        assert m[f'disagg_kv_pool_hit_blocks_total{{tier="{tier}"}}'] == blocks
        assert m["disagg_kv_pool_saved_tokens_total"] == blocks * 16
        assert wait_until(lambda: all_blocks_free(c))


def test_a_restarted_worker_loads_from_its_disk_tier(tmp_path):
    prompt = PROMPTS[3] * 3
    pool = {"kv_pool_dir": str(tmp_path / "pool")}
    with start("single", **pool) as c:
        url = next(iter(c.worker_urls().values()))
        expected = _greedy(url, prompt, c.worker_headers)["choices"][0]["text"]
        assert wait_until(lambda: metrics(url).get('disagg_kv_pool_written_bytes_total{tier="disk"}', 0) > 0)
    with start("single", **pool) as c:  # a new process: empty cache and memory tier
        url = next(iter(c.worker_urls().values()))
        again = _greedy(url, prompt, c.worker_headers)
        assert again["choices"][0]["text"] == expected
        assert metrics(url)['disagg_kv_pool_hit_blocks_total{tier="disk"}'] == again["usage"]["prompt_tokens"] // 16
