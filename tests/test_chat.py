"""The bundled instruct model answers a factual question through the chat template (greedy)."""

from __future__ import annotations

from disagg.engine.sampling import SamplingParams


def test_capital_of_france(smol):
    prompt = smol.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    [answer] = smol.generate([prompt], SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in answer.text
    assert answer.finish_reason == "stop"
