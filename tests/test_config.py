"""Typed configuration: validation and the DISAGG_* environment twins."""

from __future__ import annotations

import argparse

import pytest

from disagg.cli_args import add_config_args, config_from_args
from disagg.engine.config import EngineConfig, parse_bytes
from disagg.errors import ConfigError


def parse(argv, monkeypatch, env=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    p = argparse.ArgumentParser()
    add_config_args(p, EngineConfig)
    return config_from_args(EngineConfig, p.parse_args(argv))


def test_flags_env_and_precedence(monkeypatch):
    assert parse([], monkeypatch) == EngineConfig()
    assert parse([], monkeypatch, {"DISAGG_BLOCK_SIZE": "32"}).block_size == 32
    assert parse(["--block-size", "8"], monkeypatch, {"DISAGG_BLOCK_SIZE": "32"}).block_size == 8
    assert parse([], monkeypatch, {"DISAGG_ENABLE_PREFIX_CACHING": "0"}).enable_prefix_caching is False
    assert parse(["--max-model-len", "100"], monkeypatch).max_model_len == 100


def test_bad_environment_value_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="DISAGG_MAX_NUM_SEQS"):
        parse([], monkeypatch, {"DISAGG_MAX_NUM_SEQS": "many"})


@pytest.mark.parametrize("bad", [{"block_size": 12}, {"max_num_seqs": 0}, {"max_num_batched_tokens": 4},
                                 {"dtype": "int3"}, {"device": "tpu"}, {"kv_cache_memory": "0"}])
def test_invalid_engine_configs(bad):
    with pytest.raises(ConfigError):
        EngineConfig(**bad)


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5KiB") == 1536
    with pytest.raises(ConfigError):
        parse_bytes("two gigs")
