"""KV codecs: round trips within their precision, and sizes that match the size math."""

from __future__ import annotations

import pytest
import torch

from disagg.kv.codecs import CODECS, bytes_per_token, decode, encode, wire_bytes

SHAPE = (3, 2, 2, 4, 16, 64)  # layers, K/V, kv_heads, blocks, block_size, head_dim


@pytest.fixture(scope="module")
def kv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    x[:, 0, :, :, :, 5] *= 20  # a key outlier channel, as real keys have
    return x


TOLERANCE = {"none": 0.0, "fp16": 1e-3, "fp8": 0.07, "int8": 0.02, "int4": 0.2}


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_error_is_within_the_codec_precision(kv, codec):
    back = decode(codec, encode(codec, kv), SHAPE, torch.float32)
    assert back.shape == kv.shape
    rel = ((back - kv).norm() / kv.norm()).item()
    assert rel <= TOLERANCE[codec]


@pytest.mark.parametrize("codec", CODECS)
def test_wire_bytes_follow_the_size_math(kv, codec):
    tokens = SHAPE[3] * SHAPE[4]
    expected = bytes_per_token(codec, SHAPE[0], SHAPE[2], SHAPE[5], 4) * tokens
    got = wire_bytes(encode(codec, kv))
    per_channel_keys = SHAPE[0] * SHAPE[2] * SHAPE[5] * 4  # a float32 per key channel
    # per transfer, not per token: fp8's per-head scales, int8's and int4's per-channel key scales
    constant = {"fp8": SHAPE[0] * 2 * SHAPE[2] * 4, "int8": per_channel_keys, "int4": 2 * per_channel_keys}
    assert got == expected + constant.get(codec, 0)


def test_int8_halves_and_int4_quarters_fp16_bytes():
    per = {c: bytes_per_token(c, 32, 8, 128, 2) for c in CODECS}
    assert per["fp16"] == 128 * 1024
    assert per["int8"] / per["fp16"] < 0.52
    assert per["int4"] / per["fp16"] < 0.27


def test_int4_keeps_per_channel_key_outliers(kv):
    back = decode("int4", encode("int4", kv), SHAPE, torch.float32)
    outlier = (back[:, 0, ..., 5] - kv[:, 0, ..., 5]).abs().max().item()
    assert outlier < 0.15 * kv[:, 0, ..., 5].abs().max().item()
