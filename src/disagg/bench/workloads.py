"""Benchmark workloads: seeded, generated request streams, as random token ids (so lengths are
exact in tokens, whatever the server's tokenizer).

A workload is a list of sessions; a session is one or more turns. Single-turn workloads are
sessions of one turn; a multi-turn session's turn k sends the whole history (earlier prompts and
the answers the server gave) plus its new tokens, so it is run in order by one client.

- random:        fixed lengths, or ranges lo:hi drawn uniformly
- sharegpt:      long-tailed input and output lengths (log-normal, like ShareGPT's conversations)
- shared-prefix: one system prompt of --prefix-len tokens, then varied suffixes
- multi-turn:    sessions of --turns turns
- prefill-heavy: long in, short out (--input-len 1024, --output-len 16 unless given)
- decode-heavy:  short in, long out (--input-len 64, --output-len 256 unless given)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from disagg.errors import ConfigError
from disagg.parsing import parse_len

WORKLOADS = ("random", "sharegpt", "shared-prefix", "multi-turn", "prefill-heavy", "decode-heavy")
HEAVY_DEFAULTS = {"prefill-heavy": ("1024", "16"), "decode-heavy": ("64", "256")}


@dataclass(frozen=True)
class Turn:
    new_tokens: tuple[int, ...]  # appended to the session's history
    max_tokens: int


@dataclass(frozen=True)
class Session:
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "random"
    num_prompts: int = 32  # sessions (single-turn: requests)
    input_len: str = "256"  # "256" or "128:512"
    output_len: str = "64"
    prefix_len: int = 512  # shared-prefix
    turns: int = 3  # multi-turn
    vocab: tuple[int, int] = (1000, 20000)  # token ids drawn from [lo, hi)
    seed: int = 0


def generate(spec: WorkloadSpec) -> list[Session]:
    if spec.name not in WORKLOADS:
        raise ConfigError(f"unknown workload {spec.name!r}; known: {', '.join(WORKLOADS)}")
    if spec.num_prompts < 1:
        raise ConfigError("--num-prompts must be >= 1")
    lo_v, hi_v = spec.vocab
    if not 0 <= lo_v < hi_v:
        raise ConfigError(f"token id range {spec.vocab} is empty")
    rng = random.Random(spec.seed)
    input_len, output_len = spec.input_len, spec.output_len
    if spec.name in HEAVY_DEFAULTS and (input_len, output_len) == (WorkloadSpec.input_len, WorkloadSpec.output_len):
        input_len, output_len = HEAVY_DEFAULTS[spec.name]
    in_lo, in_hi = parse_len(input_len, "input-len")
    out_lo, out_hi = parse_len(output_len, "output-len")

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(lo_v, hi_v) for _ in range(n))

    def lengths() -> tuple[int, int]:
        if spec.name == "sharegpt":  # long tails, clipped to the given ranges' upper ends
            n_in = int(min(in_hi, max(4, rng.lognormvariate(5.0, 1.0))))
            n_out = int(min(out_hi, max(4, rng.lognormvariate(4.8, 0.9))))
            return n_in, n_out
        return rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)

    prefix = tokens(spec.prefix_len) if spec.name == "shared-prefix" else ()
    sessions = []
    for _ in range(spec.num_prompts):
        turns = []
        for t in range(spec.turns if spec.name == "multi-turn" else 1):
            n_in, n_out = lengths()
            turns.append(Turn((prefix if t == 0 else ()) + tokens(n_in), n_out))
        sessions.append(Session(tuple(turns)))
    return sessions
