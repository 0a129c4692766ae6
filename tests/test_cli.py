"""The `disagg` command, run as a user runs it."""

from __future__ import annotations

import re

from test_errors import run_cli


def generated(stderr: str) -> int:
    return int(re.search(r"(\d+) generated", stderr).group(1))


def test_generate_streams_text_and_reports():
    r = run_cli("generate", "--model", "tiny", "--prompt", "hello", "--max-tokens", "5", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert generated(r.stderr) == 5
    assert "finish: length" in r.stderr


def test_environment_twins_and_the_command_line_wins():
    r = run_cli("generate", "--model", "tiny", "--prompt", "hello", "--ignore-eos", env={"DISAGG_MAX_TOKENS": "3"})
    assert generated(r.stderr) == 3
    r = run_cli("generate", "--model", "tiny", "--prompt", "hello", "--ignore-eos", "--max-tokens", "4",
                env={"DISAGG_MAX_TOKENS": "3"})
    assert generated(r.stderr) == 4
    r = run_cli("generate", "--prompt", "hello", "--max-tokens", "2", "--ignore-eos", env={"DISAGG_MODEL": "tiny"})
    assert r.returncode == 0, r.stderr


def test_chat_answer_on_the_bundled_model():
    r = run_cli("generate", "--model", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                "--max-tokens", "30", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_models_lists_presets_with_kv_bytes():
    r = run_cli("models")
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if "llama-3.1-8b" in line)
    assert "128.0 KiB" in row  # 2 x 32 layers x 8 kv heads x 128 dim x 2 bytes
    assert "8.03B" in row
    for name in ("smollm2-135m", "tiny", "llama-3-70b", "qwen2.5-7b"):
        assert name in r.stdout


def test_kv_size_reproduces_the_corrected_paper_table():
    r = run_cli("kv-size", "--model", "llama-3.1-8b", "--tokens", "512", "--dtype", "fp16")
    assert r.returncode == 0, r.stderr
    assert "512 tokens: 64.0 MiB (67,108,864 bytes)" in r.stdout
    r = run_cli("kv-size", "--model", "llama-3-70b", "--tokens", "32768")
    assert "32,768 tokens: 10.0 GiB" in r.stdout
    int4 = next(line for line in r.stdout.splitlines() if "int4" in line)
    assert "0.27x" in int4


def test_kv_size_reads_a_config_json(tmp_path):
    import json

    from disagg.model.presets import PRESETS

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen2.5-7b"].config.to_hf()))
    r = run_cli("kv-size", "--model", str(tmp_path), "--tokens", "1000")
    assert r.returncode == 0, r.stderr
    assert "56.0 KiB per token" in r.stdout  # 2 x 28 x 4 x 128 x 2 B
