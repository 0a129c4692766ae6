"""The CUDA path (run on a GPU machine: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from disagg.engine.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Water boils at a temperature of"]


def test_cuda_fp32_matches_cpu_greedy():
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    cpu = make_engine(model="smollm2-135m", kv_cache_memory="256MiB").generate(PROMPTS, params)
    gpu_engine = make_engine(model="smollm2-135m", device="cuda", dtype="float32", kv_cache_memory="256MiB")
    gpu = gpu_engine.generate(PROMPTS, params)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]


def test_cuda_bf16_default_answers_and_hands_off_kv():
    engine = make_engine(model="smollm2-135m", device="cuda", kv_cache_memory="256MiB")
    assert engine.dtype == torch.bfloat16
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    [answer] = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0))
    assert "Paris" in answer.text
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    while engine.has_unfinished():
        engine.step()
    kv = engine.export_kv("p")
    assert kv.data.is_cuda
    assert engine.release("p")
    assert engine.block_manager.num_used_blocks == 0
