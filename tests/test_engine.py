"""The engine end to end on the bundled model: batching, caching, preemption, stops, and the KV
connector hooks as the engine calls them."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from disagg.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

SENTENCES = [
    "The history of the printing press begins in the fifteenth century.",
    "Rivers carry sediment from the mountains to the sea over millions of years.",
    "A good recipe for bread needs flour, water, salt and patience.",
    "Jupiter is the largest planet in the solar system.",
]


def prompts(n: int = 8) -> list[str]:
    """Prompts of clearly different lengths (about 15 to 140 tokens)."""
    return [" ".join(SENTENCES[(i + j) % 4] for j in range(1 + i)) + " In short," for i in range(n)]


@pytest.fixture(scope="module")
def alone(smol):
    """Greedy outputs of each prompt run on its own: the reference for the batching tests."""
    return [smol.generate([p], GREEDY)[0].token_ids for p in prompts()]


def test_batched_with_chunked_prefill_equals_each_run_alone(alone):
    engine = make_engine(model="smollm2-135m", kv_cache_memory="256MiB", max_num_batched_tokens=64)
    got = engine.generate(prompts(), GREEDY)
    assert [c.token_ids for c in got] == alone
    assert engine.block_manager.num_used_blocks == 0


def test_preemption_and_recompute_leave_outputs_unchanged(alone):
    engine = make_engine(model="smollm2-135m", kv_cache_memory="12MiB",
                         enable_prefix_caching=False)
    assert engine.block_manager.num_blocks < sum(len(engine.tokenize(p)) + 16 for p in prompts()) // 16
    got = engine.generate(prompts(), GREEDY)
    assert engine.stats()["preemptions"] > 0
    assert [c.token_ids for c in got] == alone
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits_leave_outputs_unchanged(smol, alone):
    long_prompt = prompts()[6]
    first = smol.generate([long_prompt], GREEDY)[0]
    again, extended = smol.generate([long_prompt, long_prompt + " Moreover,"], GREEDY)
    n_prompt = len(smol.tokenize(long_prompt))
    block = smol.config.block_size
    assert again.num_cached_tokens == (n_prompt - 1) // block * block  # every full block but the last token's
    assert extended.num_cached_tokens >= n_prompt // block * block
    assert again.token_ids == first.token_ids == alone[6]
    reference = make_engine(model="smollm2-135m", kv_cache_memory="64MiB", enable_prefix_caching=False)
    assert extended.token_ids == reference.generate([long_prompt + " Moreover,"], GREEDY)[0].token_ids


def _drain(engine):
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def test_abort_frees_blocks_and_others_continue(smol):
    smol.add_request("keep", prompts()[1], GREEDY)
    smol.add_request("drop", prompts()[2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    smol.add_request("third", prompts()[0], GREEDY)
    for _ in range(3):
        smol.step()
    used = smol.block_manager.num_used_blocks
    assert smol.abort("drop")
    assert smol.abort("third")
    assert smol.block_manager.num_used_blocks < used
    assert not smol.abort("drop")
    outs = _drain(smol)
    assert {o.request_id for o in outs} == {"keep"}
    assert outs[-1].finished


def test_stop_string_cuts_text_and_is_never_streamed(smol):
    full = smol.generate([prompts()[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    assert stop.strip(), full.text
    smol.add_request("s", prompts()[0], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))
    outs = _drain(smol)
    streamed = "".join(o.new_text for o in outs)
    assert streamed == full.text[: full.text.index(stop)]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].stop_reason == stop
    with_stop = smol.generate([prompts()[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                             stop=(stop,), include_stop_str_in_output=True))[0]
    assert with_stop.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_max_tokens_and_eos(smol):
    full = smol.generate([prompts()[1]], GREEDY)[0]
    stop_id = full.token_ids[3]
    got = smol.generate([prompts()[1]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                       stop_token_ids=(stop_id,)))[0]
    assert got.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert got.finish_reason == "stop"
    assert full.finish_reason == "length"
    assert len(full.token_ids) == 16

    chat = smol.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    ended = smol.generate([chat], SamplingParams(max_tokens=100, temperature=0))[0]
    assert ended.finish_reason == "stop"
    assert ended.token_ids[-1] in smol.tokenizer.eos_token_ids
    assert "<|im_end|>" not in ended.text


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(smol):
    p = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    a = smol.generate([prompts()[0]], p)[0].token_ids
    b, _ = smol.generate([prompts()[0], prompts()[5]], [p, SamplingParams(max_tokens=5, temperature=1.0)])
    assert a == b.token_ids
    c = smol.generate([prompts()[0]], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=99,
                                                     ignore_eos=True))[0]
    assert c.token_ids != a


def test_logprobs_of_chosen_tokens(smol):
    got = smol.generate([prompts()[0]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(got.logprobs) == 6
    for token, lp in zip(got.token_ids, got.logprobs, strict=True):
        assert lp.token_id == token
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        assert lp.top[0] == (token, pytest.approx(lp.logprob))  # greedy picks the top-1
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_block_views_are_the_export_bytes_in_order():
    from disagg.engine.kv_cache import PagedKVCache
    from disagg.kv.transport import tensor_bytes
    from disagg.model.presets import PRESETS

    cache = PagedKVCache(PRESETS["tiny"].config, 12, 16, torch.float32, torch.device("cpu"))
    for layer in cache.layers:
        layer.copy_(torch.randn_like(layer))
    blocks = [3, 4, 5, 9, 0, 1]  # runs and gaps
    exported = cache.read_blocks(blocks)
    assert tuple(exported.shape) == cache.export_shape(len(blocks))
    # a sender from views and a receiver into a tensor (or the reverse) must agree byte for byte
    assert b"".join(bytes(v) for v in cache.block_views(blocks)) == bytes(tensor_bytes(exported))
    one = b"".join(bytes(v) for v in cache.block_views(blocks, range(1, 2)))
    assert one == bytes(tensor_bytes(exported[1]))


def test_connector_saves_each_layer_once_as_the_last_chunk_passes_it_with_the_exported_bytes():
    from disagg.engine.connector.base import KVConnector

    seen: list[tuple[int, bytes, int]] = []

    class Recorder(KVConnector):
        def wants_layers(self, seqs):
            return bool(seqs)

        def save_layer(self, layer, seqs):
            (seq,) = seqs
            table[:] = seq.block_table[:5]
            views = engine.kv_cache.block_views(table, range(layer, layer + 1))
            seen.append((layer, b"".join(bytes(v) for v in views), seq.num_computed_tokens))

    engine = make_engine(model="tiny", kv_cache_memory="16MiB", max_num_batched_tokens=32, max_num_seqs=4)
    engine.connector = Recorder()
    engine.scheduler.connector = engine.connector
    prompt = list(range(1, 71))  # three chunks of a 32-token budget
    engine.add_request("r", prompt, SamplingParams(max_tokens=1))
    table: list[int] = []
    while engine.has_unfinished():
        engine.step()
    layers = engine.model_config.num_layers
    assert [i for i, _, _ in seen] == list(range(layers))
    assert all(computed == 64 for _, _, computed in seen), "saved before the prompt's last chunk"
    # what each layer's views held as it was saved is what an export of those blocks reads afterwards
    exported = engine.kv_cache.read_blocks(table)
    assert b"".join(b for _, b, _ in seen) == exported.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
