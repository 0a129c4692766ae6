"""Routing policies: which worker of a pool gets the next request.

One small interface: a policy sees the pool's healthy workers and the request body, and is told
when each request it placed has ended (answered, failed or abandoned: exactly once per select).

- round-robin: a counter per pool.
- least-load: the worker with the fewest outstanding tokens (prompt + max_tokens of the requests
  it was given that have not ended), as the proxy itself counts them.
- prefix: the worker that holds most of the request's leading KV blocks, weighed against load (as
  Dynamo's KV router does): cost = prompt tokens it would have to prefill + its outstanding
  tokens, lowest wins (the request's own size is the same everywhere, so this is outstanding
  tokens minus the prompt tokens cached there). What each worker holds comes from its own block-hash reports
  (serve/kv_index.py); for workers that do not report (vLLM), the proxy tracks what it sent each
  one as chained hashes of 64-character chunks (or 16-token chunks of token-id prompts), an
  approximate radix tree like SGLang's cache-aware router.
- session: a request's session (OpenAI's `user` field, or `session_id`) stays on the worker that
  served it while that worker is healthy, so follow-up turns find their KV; new sessions, and
  sessions whose worker died, go to the least-loaded worker.

The proxy never calls on_complete itself: it places requests through a `Charges`, one per client
request, whose placements settle exactly once (see there), so no path can leave a worker looking
busy for ever.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from disagg.serve.protocol import max_tokens_of

if TYPE_CHECKING:
    from disagg.serve.kv_index import KVIndex


class RoutingPolicy(Protocol):
    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        """Pick one of `workers` (never empty) of `pool` ("workers", "prefill" or "decode")."""
        ...

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        """A request routed to `worker` has ended (optional bookkeeping)."""
        ...

    def outstanding(self) -> dict[str, int]:
        """Tokens each worker was given that have not ended, as this policy counts them (empty when
        it does not count)."""
        ...


class RoundRobin:
    """Stateless apart from one counter per pool."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        i = self._next.get(pool, 0)
        self._next[pool] = i + 1
        return workers[i % len(workers)]

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        pass

    def outstanding(self) -> dict[str, int]:
        return {}


ROUTING = ("round-robin", "least-load", "prefix", "session")
DEFAULT_MAX_TOKENS = 256  # what a request without max_tokens is counted as


def estimated_prompt_tokens(request: dict[str, Any]) -> int:
    """Prompt tokens: exact for token ids, ~4 characters a token for text."""
    prompt = request.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    messages = request.get("messages") if isinstance(request.get("messages"), list) else []
    return sum(len(str(m.get("content", ""))) // 4 + 4 for m in messages if isinstance(m, dict))


def estimated_tokens(request: dict[str, Any]) -> int:
    """Prompt tokens plus max_tokens: what a request will cost the worker that gets it."""
    return estimated_prompt_tokens(request) + requested_output(request)


def requested_output(request: dict[str, Any]) -> int:
    out = max_tokens_of(request, chat="messages" in request)
    return out if isinstance(out, int) and out > 0 else DEFAULT_MAX_TOKENS


class LeastLoad:
    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        self._rr = RoundRobin()  # breaks ties, so an idle pool is still spread

    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any],
               cached: Callable[[str], int] = lambda w: 0) -> str:
        """The worker with the lowest outstanding tokens minus `cached(worker)`, the prompt tokens
        it would not have to prefill (prefix-aware routing's discount); ties rotate."""
        start = self._rr.select(pool, range(len(workers)), request)
        order = [workers[(start + i) % len(workers)] for i in range(len(workers))]
        worker = min(order, key=lambda w: self.load.get(w, 0) - cached(w))
        self.charge(worker, request)
        return worker

    def charge(self, worker: str, request: dict[str, Any]) -> None:
        self.load[worker] = self.load.get(worker, 0) + estimated_tokens(request)

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        self.load[worker] = max(0, self.load.get(worker, 0) - estimated_tokens(request))

    def outstanding(self) -> dict[str, int]:
        return dict(self.load)


class SessionAffinity:
    def __init__(self, max_sessions: int = 100_000) -> None:
        self.fallback = LeastLoad()
        self.sessions: dict[tuple[str, str], str] = {}  # (pool, session) -> worker, oldest first
        self.max_sessions = max_sessions

    @staticmethod
    def session(request: dict[str, Any]) -> str | None:
        key = request.get("session_id") or request.get("user")
        return str(key)[:256] if key else None

    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        key = self.session(request)
        worker = self.sessions.get((pool, key)) if key else None
        if worker in workers:
            self.fallback.charge(worker, request)
        else:  # a new session, or its worker is down: place it by load and remember
            worker = self.fallback.select(pool, workers, request)
        if key:
            self.sessions.pop((pool, key), None)
            self.sessions[(pool, key)] = worker
            while len(self.sessions) > self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
        return worker

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        self.fallback.on_complete(worker, request)

    def outstanding(self) -> dict[str, int]:
        return self.fallback.outstanding()


class PrefixAware:
    CHARS, TOKENS = 64, 16  # chunk sizes; ~4 characters a token

    def __init__(self, index: KVIndex | None = None, max_chunks: int = 200_000) -> None:
        self.load = LeastLoad()
        self.index = index
        self.seen: dict[tuple[str, str], OrderedDict[int, None]] = {}  # (pool, worker) -> chunk hashes
        self.max_chunks = max_chunks

    @classmethod
    def chunks(cls, request: dict[str, Any]) -> tuple[list[int], int]:
        """Chained hashes of the prompt's leading chunks, and the tokens one chunk stands for."""
        prompt = request.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            parts = [tuple(prompt[i : i + cls.TOKENS]) for i in range(0, len(prompt) - cls.TOKENS + 1, cls.TOKENS)]
            per = cls.TOKENS
        else:
            if isinstance(prompt, str):
                text = prompt
            else:
                messages = request.get("messages") if isinstance(request.get("messages"), list) else []
                text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in messages if isinstance(m, dict))
            parts = [text[i : i + cls.CHARS] for i in range(0, len(text) - cls.CHARS + 1, cls.CHARS)]
            per = cls.CHARS // 4
        out, h = [], 0
        for part in parts:
            h = hash((h, part))
            out.append(h)
        return out, per

    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        prompt = self.index.prompt(request, workers) if self.index is not None else None
        if prompt is None:
            return self._select_approximate(pool, workers, request)
        _, hashes, block_size = prompt
        index = self.index
        worker = self.load.select(pool, workers, request, cached=lambda w: index.matched(w, hashes) * block_size)
        index.predict(worker, hashes)
        return worker

    def _select_approximate(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        keys, per = self.chunks(request)

        def cached(w: str) -> int:
            seen = self.seen.get((pool, w), {})
            return per * next((i for i, k in enumerate(keys) if k not in seen), len(keys))

        worker = self.load.select(pool, workers, request, cached=cached)
        seen = self.seen.setdefault((pool, worker), OrderedDict())
        for k in keys:
            seen[k] = None
            seen.move_to_end(k)
        while len(seen) > self.max_chunks:
            seen.popitem(last=False)
        return worker

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        self.load.on_complete(worker, request)

    def outstanding(self) -> dict[str, int]:
        return self.load.outstanding()


def make_policy(name: str, index: KVIndex | None = None) -> RoutingPolicy:
    if name == "prefix":
        return PrefixAware(index)
    return {"round-robin": RoundRobin, "least-load": LeastLoad, "session": SessionAffinity}[name]()


class Placement:
    """One request placed on one worker. `settle()` ends it: the first call runs `release` (the
    policy's on_complete, or a counter's decrement), later calls do nothing."""

    def __init__(self, worker: str, release: Callable[[], None]) -> None:
        self.worker = worker
        self._release: Callable[[], None] | None = release

    def settle(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Charges:
    """The placements made for one client request. The proxy settles each one where it knows that
    phase ended (prefill answered, a decode stream closed) and sweeps them all when the client
    request ends, whichever path it took; so every select() meets exactly one on_complete()."""

    def __init__(self, policy: RoutingPolicy, on_move: Callable[[], None] | None = None) -> None:
        self.policy = policy
        self._open: list[Placement] = []
        self._swept = False
        self.migrations = 0  # times this request moved to another worker after its worker failed
        self._on_move = on_move

    def move(self) -> None:
        """This request leaves a failed worker for another (counted against --migration-limit)."""
        self.migrations += 1
        if self._on_move is not None:
            self._on_move()

    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> Placement:
        worker = self.policy.select(pool, workers, request)
        return self.hold(worker, lambda: self.policy.on_complete(worker, request))

    def hold(self, worker: str, release: Callable[[], None]) -> Placement:
        placement = Placement(worker, release)
        if self._swept:  # the client request has ended already: nothing may outlive it
            placement.settle()
        else:
            self._open.append(placement)
        return placement

    def sweep(self) -> None:
        self._swept = True
        for placement in self._open:
            placement.settle()
        self._open.clear()
