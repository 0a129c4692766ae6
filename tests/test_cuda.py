"""The CUDA path: run on a GPU machine with `pytest -m gpu`. Random-weight presets only, so no
model package is needed there."""

from __future__ import annotations

import pytest
import torch

from conftest import full_logits, make_engine
from disagg.engine.llm_engine import ImportedKV
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


def test_cuda_kv_handoff_and_batching_fp32():
    engine = make_engine(model="tiny", device="cuda", dtype="float32", kv_cache_memory="64MiB")
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == alone

    engine.add_request("pre", PROMPTS[2], SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    first = []
    while engine.has_unfinished():
        first += [t for o in engine.step() for t in o.new_token_ids]
    kv = engine.export_kv("pre")
    assert kv.data.is_cuda
    assert engine.release("pre")
    decode = make_engine(model="tiny", device="cuda", dtype="float32", kv_cache_memory="64MiB")
    decode.add_request("dec", PROMPTS[2], GREEDY, kv=ImportedKV(kv.data, kv.num_tokens), first_token_ids=first)
    rest = []
    while decode.has_unfinished():
        rest += [t for o in decode.step() for t in o.new_token_ids]
    assert first + rest == alone[2]
    assert engine.block_manager.num_used_blocks == decode.block_manager.num_used_blocks == 0


def test_cuda_defaults_to_half_precision_and_runs_a_batch():
    engine = make_engine(model="llama-3.2-1b", device="cuda", kv_cache_memory="1GiB")
    assert engine.dtype in (torch.bfloat16, torch.float16)
    outs = engine.generate(PROMPTS * 3, SamplingParams(max_tokens=8, temperature=0.7, seed=1, ignore_eos=True))
    assert all(len(c.token_ids) == 8 for c in outs)
    assert engine.block_manager.num_used_blocks == 0
