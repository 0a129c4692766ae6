"""The engine end to end on the bundled model: batching, caching, preemption, KV handoff, stops."""

from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from disagg.engine.kv_cache import BLOCK_DIM
from disagg.engine.llm_engine import ImportedKV
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


@pytest.mark.parametrize("send_first_token", [True, False])
def test_kv_export_import_continues_exactly(smol, send_first_token):
    prompt = prompts()[3]
    expected = smol.generate([prompt], GREEDY)[0].token_ids

    # "prefill worker": compute the prompt and token 1, keep the blocks for export
    smol.add_request("pre", prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    first = [t for o in _drain(smol) for t in o.new_token_ids]
    assert first == expected[:1]
    assert smol.block_manager.num_used_blocks > 0
    kv = smol.export_kv("pre")
    assert kv.num_tokens == len(smol.tokenize(prompt))
    assert smol.release("pre")

    # "decode worker": a separate engine imports the blocks and continues
    decode = make_engine(model="smollm2-135m", kv_cache_memory="64MiB")
    decode.add_request("dec", prompt, GREEDY, kv=ImportedKV(kv.data.clone(), kv.num_tokens),
                       first_token_ids=first if send_first_token else ())
    outs = _drain(decode)
    got = [t for o in outs for t in o.new_token_ids]
    assert (first + got if send_first_token else got) == expected
    assert decode.block_manager.num_used_blocks == 0


def test_import_rejects_kv_of_the_wrong_shape(smol):
    import torch

    decode = make_engine(model="tiny", kv_cache_memory="4MiB")
    bad = ImportedKV(torch.zeros(2, 2, 1, 2, 16, 8), 5)
    from disagg.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="shape"):
        decode.add_request("x", [1, 2, 3, 4, 5], GREEDY, kv=bad)
    assert not decode.has_unfinished()


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


def test_import_refuses_kv_computed_from_other_tokens(smol):
    from disagg.errors import InvalidRequestError

    smol.add_request("other", prompts()[2], SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    _drain(smol)
    kv = smol.export_kv("other")
    assert smol.release("other")
    same_length_prompt = list(range(200, 200 + kv.num_tokens))
    with pytest.raises(InvalidRequestError, match="other tokens"):
        smol.add_request("victim", same_length_prompt, GREEDY, kv=kv)
    assert not smol.has_unfinished()


def test_kv_received_in_place_into_reserved_blocks_continues_exactly(smol):
    from disagg.kv.block_hash import tokens_digest

    prompt = prompts()[4]
    expected = smol.generate([prompt], GREEDY)[0].token_ids
    smol.add_request("pre", prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    first = [t for o in _drain(smol) for t in o.new_token_ids]
    views, _shape, dtype, n, digest = smol.kv_views("pre")
    assert digest == tokens_digest(smol.tokenize(prompt))

    decode = make_engine(model="smollm2-135m", kv_cache_memory="64MiB")
    seq = decode.make_sequence("dec", prompt, GREEDY)
    targets = decode.reserve_kv(seq, n, dtype)
    assert [v.nbytes for v in targets]
    assert sum(v.nbytes for v in targets) == sum(v.nbytes for v in views)
    src = b"".join(bytes(v) for v in views)  # what a transport carries, in export order
    off = 0
    for t in targets:
        t[:] = src[off : off + t.nbytes]
        off += t.nbytes
    assert smol.release("pre")
    decode.add_request("dec", seq, kv=ImportedKV(None, n, digest), first_token_ids=first)
    got = [t for o in _drain(decode) for t in o.new_token_ids]
    assert first + got == expected
    assert decode.block_manager.num_used_blocks == 0


def test_reserved_blocks_are_freed_when_the_transfer_is_abandoned(smol):
    decode = make_engine(model="smollm2-135m", kv_cache_memory="64MiB")
    seq = decode.make_sequence("dec", prompts()[4], GREEDY)
    assert decode.reserve_kv(seq, seq.num_prompt_tokens, "float32")
    assert decode.block_manager.num_used_blocks > 0
    assert decode.reserve_kv(decode.make_sequence("x", prompts()[4], GREEDY), 5, "bfloat16") is None  # dtype
    decode.unreserve("dec")
    assert decode.block_manager.num_used_blocks == 0


def test_block_views_are_the_export_bytes_in_order(smol):
    from disagg.kv.tcp import tensor_bytes

    smol.add_request("v", prompts()[5], SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    _drain(smol)
    views, shape, _, _, _ = smol.kv_views("v")
    exported = smol.export_kv("v")
    assert tuple(exported.data.shape) == shape
    # a sender from views and a receiver into a tensor (or the reverse) must agree byte for byte
    assert b"".join(bytes(v) for v in views) == bytes(tensor_bytes(exported.data))
    assert smol.release("v")


def test_layer_hook_sees_each_layer_once_as_the_last_chunk_passes_it_with_the_exported_bytes():
    engine = make_engine(model="tiny", kv_cache_memory="16MiB", max_num_batched_tokens=32, max_num_seqs=4)
    seen: list[tuple[int, bytes, int]] = []

    def hook(i, views):
        seen.append((i, b"".join(bytes(v) for v in views), engine.scheduler.running[0].num_computed_tokens))

    prompt = list(range(1, 71))  # three chunks of a 32-token budget
    engine.add_request("r", prompt, SamplingParams(max_tokens=1), hold_blocks=True, layer_hook=hook)
    while engine.has_unfinished():
        engine.step()
    exported = engine.export_kv("r").data
    layers = engine.model_config.num_layers
    assert [i for i, _, _ in seen] == list(range(layers))
    assert all(computed == 64 for _, _, computed in seen), "hooks ran before the last chunk"
    # the views, taken as each layer finished, hold exactly what an export reads afterwards
    assert b"".join(b for _, b, _ in seen) == exported.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_on_prefilled_hands_over_the_full_blocks_a_pool_lacks(tiny):
    got = []
    prompt = list(range(1, 75))  # 4 full blocks of 16 and a partial one
    tiny.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0), on_prefilled=got.append,
                     prefilled_from=1)
    while tiny.has_unfinished():
        tiny.step()
    tiny.add_request("q", prompt, SamplingParams(max_tokens=1, temperature=0), hold_blocks=True)
    while tiny.has_unfinished():
        tiny.step()
    whole = tiny.export_kv("q").data
    assert tiny.release("q")
    assert len(got) == 1
    assert got[0].shape[BLOCK_DIM] == 3  # blocks 1-3: block 0 is pooled already, block 4 is not full
    assert torch.equal(got[0], whole.narrow(BLOCK_DIM, 1, 3))
