"""Logits -> next tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Greedy rows are one batched argmax. Sampled rows are handled one by one (each may have its own
top-k/top-p and generator); with at most a few dozen rows per step that costs little next to the
forward pass. Logprobs are of the model's distribution (before temperature and truncation), as
in vLLM and the OpenAI API.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disagg.engine.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the top-N alternatives, best first


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside top-k / top-p to -inf (one row)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # and the best token always: rounding must not leave nothing for a tiny top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


class NonFiniteLogitsError(FloatingPointError):
    """The model gave NaN or infinite logits for a request: nothing can be sampled from them."""


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [n, vocab] float32, one row per request."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError("the model produced non-finite logits")
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    token_list = tokens.tolist()

    logprobs: list[TokenLogprob | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if rows:
        lp = torch.log_softmax(logits[rows], dim=-1)
        for j, i in enumerate(rows):
            n = params[i].logprobs or 0
            top = torch.topk(lp[j], n) if n else None
            logprobs[i] = TokenLogprob(
                token_list[i],
                lp[j, token_list[i]].item(),
                tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else (),
            )
    return token_list, logprobs
