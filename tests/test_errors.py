"""Bad input gets a clear error, never a stack trace from deep inside; the engine keeps working."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from disagg.engine.sampling import SamplingParams
from disagg.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
from disagg.model.loader import resolve


def test_unknown_model_lists_the_presets():
    with pytest.raises(ModelNotFoundError) as e:
        resolve("no-such-model")
    assert "smollm2-135m" in str(e.value)
    assert "tiny" in str(e.value)


def test_prompt_longer_than_the_context(tiny):
    limit = tiny.max_model_len
    with pytest.raises(ContextLengthError) as e:
        tiny.add_request("x", [5] * limit, SamplingParams())
    assert str(limit) in str(e.value)
    assert f"has {limit}" in str(e.value)
    with pytest.raises(ContextLengthError, match="max_tokens"):
        tiny.add_request("y", [5] * (limit - 10), SamplingParams(max_tokens=20))
    assert not tiny.has_unfinished()


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(tiny, prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny.add_request("x", prompt, SamplingParams())


def test_token_ids_out_of_range(tiny):
    with pytest.raises(InvalidRequestError, match=r"\[0, 512\)"):
        tiny.add_request("x", [1, 2, 99999], SamplingParams())
    with pytest.raises(InvalidRequestError):
        tiny.add_request("x", [1, -1], SamplingParams())


def test_duplicate_request_id_is_rejected_and_nothing_leaks(tiny):
    tiny.add_request("dup", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        tiny.add_request("dup", "hello", SamplingParams(max_tokens=2))
    while tiny.has_unfinished():
        tiny.step()


def test_engine_still_serves_after_bad_requests(tiny):
    for bad in ("", [10**9]):
        with pytest.raises(InvalidRequestError):
            tiny.add_request("bad", bad, SamplingParams())
    [out] = tiny.generate(["still fine"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "disagg.cli", *args], capture_output=True, text=True, timeout=120,
                          env=full_env, check=False)


@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "smollm2-135m"),
    (["generate", "--model", "tiny", "--prompt", "x" * 100, "--max-model-len", "64"], "maximum context length is 64"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "tiny", "--prompt", ""], "prompt"),
    (["generate", "--model", "tiny", "--prompt", "hi", "--kv-cache-memory", "lots"], "2GiB"),
    (["serve", "--model", "tiny", "--kv-host", "0.0.0.0"], "DISAGG_KV_SECRET"),  # no KV port open to all
    (["up", "--model", "tiny", "--host", "0.0.0.0"], "DISAGG_KV_SECRET"),
])
def test_cli_errors_are_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("disagg: error:")
    assert needle in lines[0]
