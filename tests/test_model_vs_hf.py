"""Our forward pass against Hugging Face transformers' reference on the same weights (fp32).

The bundled model is checked twice: transformers on our GGUF conversion (the forward pass), and
transformers' own GGUF loader on the original file (the conversion itself).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from conftest import full_logits, make_engine
from disagg.engine.sampling import SamplingParams
from disagg.model.loader import bundled_gguf_path, load_model, resolve
from disagg.model.tokenizer import Tokenizer

try:
    import transformers
except ImportError:  # _require below turns this into a skip, or a failure in CI
    transformers = None

TOL = 1e-3


def _require(*modules: str) -> None:
    """Skip when a reference package is missing; fail in CI instead, like the Redis tests, so the
    comparison with transformers cannot silently drop out of the suite there."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        one = len(missing) == 1
        msg = f"{' and '.join(missing)} {'is' if one else 'are'} not installed (make test installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module", autouse=True)
def _transformers_installed():
    # Module scope: it must run before smol_hf, which is module-scoped too.
    _require("transformers")


VARIANTS = {
    "llama": {},
    "llama3-rope-scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "linear-rope-tied": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "tie_word_embeddings": True},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
}


def _hf_dir(tmp_path, overrides: dict) -> str:
    """A random tiny model saved by transformers itself, as a Hugging Face directory."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
           "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "bos_token_id": None,
           "eos_token_id": 300} | overrides  # an id never sampled, so min_new_tokens suppresses nothing
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    config.architectures = cfg["architectures"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initialises some weights to exact zeros or ones; vary them all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    Tokenizer.byte_level().save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == cfg["architectures"]
    return str(tmp_path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_tiny_logits_match_transformers(tmp_path, variant):
    path = _hf_dir(tmp_path, VARIANTS[variant])
    source = resolve(path)
    ours = load_model(source, dtype=torch.float32, device=torch.device("cpu"), max_positions=512)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = full_logits(ours, ids)
    assert (got - expected).abs().max().item() <= TOL


def test_random_tiny_greedy_decode_matches_transformers(tmp_path):
    """Decode steps read K/V back through block tables; their tokens must match HF's generate."""
    path = _hf_dir(tmp_path, VARIANTS["llama3-rope-scaling"])
    engine = make_engine(model=path, kv_cache_memory="8MiB", block_size=16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for prompt, got in zip(prompts, engine.generate(prompts, params), strict=True):
        with torch.inference_mode():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                               pad_token_id=0)
        assert got.token_ids == out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def smol_hf(smol):
    return transformers.AutoModelForCausalLM.from_pretrained(str(resolve("smollm2-135m").weights_dir),
                                                             dtype=torch.float32).eval()


def _chat_ids(engine) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}]))


def test_smollm2_logits_match_transformers(smol, smol_hf):
    ids = _chat_ids(smol)
    with torch.inference_mode():
        expected = smol_hf(torch.tensor([ids])).logits[0]
    got = full_logits(smol.runner.model, ids)
    assert (got - expected).abs().max().item() <= TOL


def test_smollm2_gguf_logits_match_transformers_gguf_loader(smol):
    """smol_hf reads our own conversion of the GGUF, so it cannot catch a bug in that conversion
    (Q/K un-permutation, tensor names, dequantization, norms); transformers' GGUF loader reads the
    original file independently. Both dequantize to the same float32 weights: observed max
    difference about 1.3e-4, while a wrong Q/K permutation or a dropped norm gives over 30."""
    _require("gguf", "accelerate")  # transformers' GGUF loader refuses to run without accelerate
    gguf_path = bundled_gguf_path()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                            dtype=torch.float32).eval()
    ids = _chat_ids(smol)
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0]
    got = full_logits(smol.runner.model, ids)
    assert (got - expected).abs().max().item() <= TOL


PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "Water boils at a temperature of",
]


def test_smollm2_greedy_continuations_match_transformers(smol, smol_hf):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for prompt, got in zip(PROMPTS, smol.generate(PROMPTS, params), strict=True):
        ids = smol.tokenizer.encode(prompt)
        with torch.inference_mode():
            out = smol_hf.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                   pad_token_id=2)
        assert got.token_ids == out[0, len(ids):].tolist(), prompt
