"""Loaders: GGUF conversion is cached on disk; size math; configs."""

from __future__ import annotations

import dataclasses

import pytest

import disagg.model.gguf_convert as gguf_convert
from disagg.errors import ConfigError
from disagg.kv.layout import kv_bytes, kv_bytes_per_token
from disagg.model.loader import bundled_gguf_path, resolve
from disagg.model.presets import PRESETS


def test_gguf_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path))
    first = resolve("smollm2-135m")
    assert first.weights_dir.is_relative_to(tmp_path)
    assert (first.weights_dir / "model.safetensors").exists()

    def refuse(*args, **kwargs):
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(gguf_convert, "convert", refuse)
    second = resolve("smollm2-135m")
    assert second.weights_dir == first.weights_dir
    assert second.config == first.config
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [first.weights_dir.name]  # no temp dirs left


def test_bundled_config_matches_its_preset():
    assert bundled_gguf_path().suffix == ".gguf"
    src = resolve("smollm2-135m")
    assert src.config.rms_norm_eps == pytest.approx(1e-5)  # stored as float32 in the GGUF
    assert dataclasses.replace(src.config, rms_norm_eps=1e-5) == PRESETS["smollm2-135m"].config


def test_kv_size_math_matches_the_corrected_paper_table():
    llama8b, llama70b = PRESETS["llama-3.1-8b"].config, PRESETS["llama-3-70b"].config
    assert kv_bytes_per_token(llama8b, "fp16") == 128 * 1024
    assert kv_bytes(llama8b, 512, "fp16") == 64 * 2**20  # the paper says 32 MB: it forgot V
    assert kv_bytes(llama70b, 32 * 1024, "fp16") == 10 * 2**30


def test_huge_random_presets_refuse_to_load_on_a_small_machine():
    import torch

    from disagg.model.loader import load_model

    with pytest.raises(ConfigError, match="more than this machine"):
        load_model(resolve("llama-3-70b"), dtype=torch.float32, device=torch.device("cpu"), max_positions=128)
