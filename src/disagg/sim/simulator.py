"""Discrete-event simulation of the three architectures (and any xPyD split) on a cost model.

Workers run engine steps back to back while they have work, as the real engine does: each step
takes every decoding sequence's next token first, then prompt chunks up to a token budget
(chunked prefill), so a colocated worker's prefills slow its decodes. Disaggregated: a prefill
worker emits token 1, sends the KV over its link (concurrent transfers share it), and
the decode worker admits the request when the KV has arrived and it has room. Arrivals: closed
loop at a concurrency, or Poisson/gamma at a rate. The output is the same RequestRecords and
summary as `disagg bench`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from disagg.metrics import RequestRecord, summarize
from disagg.sim.cost import WorkerCost
from disagg.sim.hardware import Link


@dataclass
class SimRequest:
    rid: int
    prompt: int
    output: int
    sent: float = 0.0
    computed: int = 0  # prompt tokens computed
    generated: int = 0
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0

    @property
    def context(self) -> int:
        return self.prompt + self.generated


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn))

    def run(self) -> None:
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()


class Worker:
    """One engine: role both (prefill and decode), prefill or decode."""

    def __init__(self, loop: EventLoop, cost: WorkerCost, role: str, token_budget: int, max_seqs: int,
                 on_prefilled: Callable[[SimRequest], None] = lambda r: None,
                 on_finished: Callable[[SimRequest], None] = lambda r: None) -> None:
        self.loop, self.cost, self.role = loop, cost, role
        self.token_budget, self.max_seqs = token_budget, max_seqs
        self.on_prefilled, self.on_finished = on_prefilled, on_finished
        self.capacity = cost.kv_capacity_tokens()
        self.waiting: deque[SimRequest] = deque()
        self.prefilling: list[SimRequest] = []
        self.decoding: list[SimRequest] = []
        self.busy = False
        self.reserved = 0  # KV tokens promised to admitted requests

    def submit(self, r: SimRequest) -> None:
        self.waiting.append(r)
        self._kick_later()  # after whatever else arrives at this instant: one step takes them all

    def _kick(self) -> None:
        if not self.busy and (self.waiting or self.prefilling or self.decoding):
            self._step()

    def _footprint(self, r: SimRequest) -> int:
        return r.prompt + (r.output if self.role != "prefill" else 1)

    def _step(self) -> None:
        decodes = list(self.decoding)
        budget = self.token_budget - len(decodes)
        chunks: list[tuple[SimRequest, int]] = []
        for r in self.prefilling:
            if budget <= 0:
                break
            n = min(r.prompt - r.computed, budget)
            chunks.append((r, n))
            budget -= n
        while self.waiting and len(self.prefilling) + len(self.decoding) < self.max_seqs:
            r = self.waiting[0]
            if self.reserved + self._footprint(r) > self.capacity and (self.prefilling or self.decoding):
                break  # wait for memory (a request bigger than the cache still runs alone)
            if self.role != "decode" and budget <= 0:
                break
            self.waiting.popleft()
            self.reserved += self._footprint(r)
            if self.role == "decode":  # its KV arrived: it decodes from the next step on
                self.decoding.append(r)
                continue
            n = min(r.prompt, budget)
            self.prefilling.append(r)
            chunks.append((r, n))
            budget -= n
        if not chunks and not decodes:
            if self.decoding:  # admitted decode-only requests: run them now
                self._kick_later()
            return
        dt = self.cost.step_time([(n, r.computed) for r, n in chunks], [r.context for r in decodes])
        self.busy = True
        self.loop.at(self.loop.now + dt, lambda: self._finish(chunks, decodes))

    def _kick_later(self) -> None:
        self.loop.at(self.loop.now, self._kick)

    def _finish(self, chunks: list[tuple[SimRequest, int]], decodes: list[SimRequest]) -> None:
        now = self.loop.now
        for r in decodes:
            r.generated += 1
            r.token_times.append(now)
            if r.generated >= r.output:
                self.decoding.remove(r)
                self._done(r)
        for r, n in chunks:
            r.computed += n
            if r.computed < r.prompt:
                continue
            self.prefilling.remove(r)
            r.generated = 1  # the last prompt position's logits give token 1
            r.token_times.append(now)
            if self.role == "prefill" or r.output <= 1:
                self.reserved -= self._footprint(r)
                if self.role == "prefill" and r.output > 1:
                    self.on_prefilled(r)
                else:
                    r.end = now
                    self.on_finished(r)
            else:
                self.decoding.append(r)
        self.busy = False
        self._kick()

    def _done(self, r: SimRequest) -> None:
        self.reserved -= self._footprint(r)
        r.end = self.loop.now
        self.on_finished(r)


class KVLink:
    """A prefill worker's link to the decode workers. Concurrent transfers share its bandwidth
    equally (processor sharing, as parallel TCP streams or RDMA queue pairs do), each after the
    link's one-way latency."""

    def __init__(self, loop: EventLoop, link: Link) -> None:
        self.loop, self.link = loop, link
        self.active: dict[int, list] = {}  # id -> [bytes left, on_arrival]
        self.last = 0.0
        self._ids = itertools.count()
        self._version = 0

    def send(self, nbytes: float, on_arrival: Callable[[], None]) -> None:
        self.loop.at(self.loop.now + self.link.latency, lambda: self._enter(nbytes, on_arrival))

    def _rate(self) -> float:
        return self.link.bandwidth * self.link.efficiency / max(1, len(self.active))

    def _advance(self) -> None:
        moved = (self.loop.now - self.last) * self._rate()
        for entry in self.active.values():
            entry[0] -= moved
        self.last = self.loop.now

    def _enter(self, nbytes: float, on_arrival: Callable[[], None]) -> None:
        self._advance()
        self.active[next(self._ids)] = [nbytes, on_arrival]
        self._reschedule()

    def _reschedule(self) -> None:
        self._version += 1
        if self.active:
            left = min(e[0] for e in self.active.values())
            version = self._version
            self.loop.at(self.loop.now + max(0.0, left) / self._rate(), lambda: self._complete(version))

    def _complete(self, version: int) -> None:
        if version != self._version:  # superseded by a later arrival
            return
        self._advance()
        done = [k for k, e in self.active.items() if e[0] <= 1.0]  # within a byte: rounding
        for k in done:
            self.active.pop(k)[1]()
        self._reschedule()


@dataclass(frozen=True)
class Cluster:
    """What to simulate: `prefill` = 0 means colocated workers (single / replicated)."""

    cost: WorkerCost
    workers: int = 1  # colocated workers
    prefill: int = 0
    decode: int = 0
    link: Link | None = None
    token_budget: int = 512
    max_seqs: int = 64
    hop: float = 0.0  # seconds a proxy hop adds (client -> worker, proxy -> decode)
    decode_cost: WorkerCost | None = None  # decode workers on other hardware

    @property
    def units(self) -> int:
        if not self.prefill:
            return self.workers * self.cost.tp
        return self.prefill * self.cost.tp + self.decode * (self.decode_cost or self.cost).tp


def simulate(cluster: Cluster, requests: list[tuple[int, int]], concurrency: int | None = None,
             rate: float | None = None, burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """Run `requests` (prompt tokens, output tokens) through `cluster`: closed loop at
    `concurrency`, or open loop at `rate` requests/s. Returns them with their token times."""
    loop = EventLoop()
    reqs = [SimRequest(i, p, o) for i, (p, o) in enumerate(requests)]
    rr = itertools.count()
    kv_per_token = cluster.cost.model.kv_bytes_per_token(cluster.cost.dtype)
    pending = deque(reqs)

    def finished(r: SimRequest) -> None:
        if concurrency is not None and pending:
            send(pending.popleft())

    if cluster.prefill:
        decoders = [Worker(loop, cluster.decode_cost or cluster.cost, "decode", cluster.token_budget, cluster.max_seqs,
                           on_finished=finished) for _ in range(cluster.decode)]
        links: list[KVLink] = []

        def prefilled(r: SimRequest, i: int) -> None:
            dest = decoders[next(rr) % len(decoders)]
            blocks = -(-r.prompt // 16) * 16  # whole blocks move
            # the proxy hears token 1, then asks a decode worker, which pulls the KV
            loop.at(loop.now + cluster.hop, lambda: links[i].send(blocks * kv_per_token, lambda: dest.submit(r)))

        prefillers = []
        for i in range(cluster.prefill):
            links.append(KVLink(loop, cluster.link or Link("ideal", float("inf"), 0.0, "")))
            prefillers.append(Worker(loop, cluster.cost, "prefill", cluster.token_budget, cluster.max_seqs,
                                     on_prefilled=lambda r, i=i: prefilled(r, i), on_finished=finished))
        entry = prefillers
    else:
        entry = [Worker(loop, cluster.cost, "both", cluster.token_budget, cluster.max_seqs, on_finished=finished)
                 for _ in range(cluster.workers)]
    counter = itertools.count()

    def send(r: SimRequest) -> None:
        r.sent = loop.now
        worker = entry[next(counter) % len(entry)]
        loop.at(loop.now + cluster.hop, lambda: worker.submit(r))

    if concurrency is not None:
        for _ in range(min(concurrency, len(pending))):
            send(pending.popleft())
    else:
        rng = random.Random(seed)
        t = 0.0
        for r in reqs:
            loop.at(t, lambda r=r: send(r))
            if rate and rate != float("inf"):
                t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    loop.run()
    return reqs


def records(reqs: list[SimRequest]) -> list[RequestRecord]:
    return [RequestRecord(r.prompt, r.sent, list(r.token_times), r.end, r.generated, ok=r.end > 0) for r in reqs]


def run_summary(cluster: Cluster, requests: list[tuple[int, int]], concurrency: int | None = None,
                rate: float | None = None, slo_ttft_ms: float | None = None,
                slo_tpot_ms: float | None = None) -> dict[str, float]:
    reqs = simulate(cluster, requests, concurrency, rate)
    duration = max(r.end for r in reqs) - min(r.sent for r in reqs)
    return summarize(records(reqs), duration, slo_ttft_ms, slo_tpot_ms)
