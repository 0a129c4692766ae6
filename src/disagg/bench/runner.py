"""Drives a workload against a server: closed loop at a concurrency, or open loop at a request
rate with gamma-distributed gaps (Poisson at burstiness 1, burstier below 1, steadier above).

Warm-up requests go first and are not recorded. Multi-turn sessions run turn after turn on one
client; a turn's prompt is the session's history (earlier prompts and the answers' token ids, which
the client asks for with vLLM's return_token_ids; stand-ins of the answers' lengths from a server
that does not return them) plus new tokens, so a server's prefix cache sees what a chat would send.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from disagg.bench.client import BenchClient
from disagg.bench.workloads import Session
from disagg.metrics import RequestRecord


@dataclass(frozen=True)
class Load:
    concurrency: int | None = None  # closed loop
    request_rate: float | None = None  # open loop, sessions per second
    burstiness: float = 1.0
    max_concurrency: int | None = None  # cap on in-flight sessions in open loop
    seed: int = 0


async def _run_session(client: BenchClient, session: Session, rng: random.Random, records: list[RequestRecord],
                       on_done: Callable[[], None]) -> None:
    history: list[int] = []
    for turn in session.turns:
        prompt = history + list(turn.new_tokens)
        rec, answer = await client.send(prompt, turn.max_tokens)
        records.append(rec)
        on_done()
        if not rec.ok:
            return
        if not isinstance(answer, list) or len(answer) != rec.output_tokens:
            answer = [rng.randrange(1000, 20000) for _ in range(rec.output_tokens)]
        history = prompt + answer


async def run_load(client: BenchClient, sessions: list[Session], load: Load, warmup: list[Session] = (),
                   on_done: Callable[[], None] = lambda: None) -> tuple[list[RequestRecord], float]:
    """Returns the records of `sessions` and the run's duration in seconds (warm-up excluded)."""
    rng = random.Random(load.seed)
    if warmup:
        scratch: list[RequestRecord] = []
        await asyncio.gather(*(_run_session(client, s, rng, scratch, lambda: None) for s in warmup))
    records: list[RequestRecord] = []
    start = client.now()
    if load.request_rate is None:
        queue = list(reversed(sessions))

        async def worker() -> None:
            while queue:
                await _run_session(client, queue.pop(), rng, records, on_done)

        await asyncio.gather(*(worker() for _ in range(max(1, load.concurrency or 1))))
    else:
        gate = asyncio.Semaphore(load.max_concurrency or len(sessions))

        async def gated(s: Session) -> None:
            async with gate:
                await _run_session(client, s, rng, records, on_done)

        tasks = []
        for s in sessions:
            tasks.append(asyncio.create_task(gated(s)))
            if load.request_rate > 0 and not math.isinf(load.request_rate):
                shape = load.burstiness
                await asyncio.sleep(rng.gammavariate(shape, 1.0 / (load.request_rate * shape)))
        await asyncio.gather(*tasks)
    return records, client.now() - start
