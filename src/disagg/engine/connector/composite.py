"""Several connectors as one, in order: the pool first, then the remote ones.

Each loads its share of a request's tokens, one after the other: the pool what it holds beyond the
prefix cache, a remote connector the rest. The shares load at the same time; the request's load
ends when every share has reported, and counts up to the first share that fell short (KV after a
gap is of no use: the rest is recomputed), with the error or the first tokens of any share.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from disagg.engine.connector.base import Ending, Finished, KVConnector, LoadResult
from disagg.engine.sequence import Sequence


@dataclass
class _Load:
    start: int
    shares: list[tuple[int, int, int]]  # (child, start, count)
    results: dict[int, LoadResult] = field(default_factory=dict)
    error: str | None = None  # from a child without a share (its source failed as the load was planned)

    def combined(self) -> LoadResult:
        tokens, error, first, via = 0, self.error, (), []
        for child, start, _ in self.shares:
            r = self.results[child]
            error, first = error or r.error, first or r.first_token_ids
            if tokens == start - self.start:  # contiguous so far
                tokens += r.tokens
                via.append(r.via)
        return LoadResult(tokens, first, error, "+".join(v for v in via if v))


class CompositeConnector(KVConnector):
    def __init__(self, children: Seq[KVConnector]) -> None:
        self.children = list(children)
        self.prepares = any(c.prepares for c in self.children)
        self._loads: dict[str, _Load] = {}
        self._nothing: list[str] = []  # loads planned with no share left: done, with nothing loaded

    @property
    def notify(self) -> Callable[[], None]:  # type: ignore[override]
        return self.children[0].notify if self.children else (lambda: None)

    @notify.setter
    def notify(self, fn: Callable[[], None]) -> None:
        for child in self.children:
            child.notify = fn

    def prepare(self, seq: Sequence) -> None:
        for child in self.children:
            child.prepare(seq)

    def request_added(self, seq: Sequence) -> None:
        for child in self.children:
            child.request_added(seq)

    def num_loadable_tokens(self, seq: Sequence, computed: int) -> int | None:
        total = 0
        for child in self.children:
            n = child.num_loadable_tokens(seq, computed + total)
            if n is None:
                return None
            total += n
        return total

    def on_allocated(self, seq: Sequence, start: int, count: int) -> None:
        at, shares = start, []
        for i, child in enumerate(self.children):
            n = min(child.num_loadable_tokens(seq, at) or 0, start + count - at)
            child.on_allocated(seq, at, n)
            if n:
                shares.append((i, at, n))
            at += n
        if shares:
            self._loads[seq.request_id] = _Load(start, shares)
        elif count:  # every source went away since the scheduler asked: the request must not wait
            self._nothing.append(seq.request_id)
            self.notify()

    def request_finished(self, seq: Sequence) -> Ending:
        endings = [child.request_finished(seq) for child in self.children]
        params = [e.params for e in endings if e.params is not None]
        return Ending(hold=any(e.hold for e in endings),
                      params={k: v for p in params for k, v in p.items()} if params else None)

    def start_load(self) -> None:
        for child in self.children:
            child.start_load()

    def wants_layers(self, seqs: list[Sequence]) -> bool:
        return any(child.wants_layers(seqs) for child in self.children)

    def save_layer(self, layer: int, seqs: list[Sequence]) -> None:
        for child in self.children:
            child.save_layer(layer, seqs)

    def step_done(self, seqs: list[Sequence]) -> None:
        for child in self.children:
            child.step_done(seqs)

    def take_finished(self) -> Finished:
        out = Finished()
        out.loads.update((rid, LoadResult(0)) for rid in self._nothing)
        self._nothing.clear()
        for i, child in enumerate(self.children):
            finished = child.take_finished()
            out.released.extend(finished.released)
            for rid, result in finished.loads.items():
                load = self._loads.get(rid)
                if load is None:  # a result outside a planned load (a push that failed early)
                    out.loads[rid] = result
                    continue
                if all(c != i for c, _, _ in load.shares):  # no share of it: the others' bytes still count
                    load.error = load.error or result.error
                    continue
                load.results[i] = result
                if len(load.results) == len(load.shares):
                    out.loads[rid] = self._loads.pop(rid).combined()
        return out

    def has_finished(self) -> bool:
        return bool(self._nothing) or any(child.has_finished() for child in self.children)

    def release(self, request_id: str) -> bool:
        return any(child.release(request_id) for child in self.children)

    def tick(self, now: float) -> None:
        for child in self.children:
            child.tick(now)

    def close(self) -> None:
        for child in self.children:
            child.close()
