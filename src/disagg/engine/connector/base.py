"""The KV connector: the engine's one door for KV that comes from elsewhere or goes elsewhere.

Modelled on vLLM v1's KVConnectorBase_V1, in one process. The scheduler side decides; the worker
side moves bytes. Methods run on the engine thread unless they say otherwise, in this order:

Scheduler side, per request:
    prepare(seq)                        on the caller's thread, before the request is queued (may
                                        block on I/O: a pool's existence check), so that queueing
                                        costs the request at most one engine step boundary
    request_added(seq)                  it is queued
    num_loadable_tokens(seq, computed)  at each admission attempt: how many tokens beyond `computed`
                                        (what the prefix cache holds) can be loaded from elsewhere;
                                        0 for none, None for "not known yet, ask again". Loads are
                                        asynchronous: the request waits for its KV in its own state
                                        (WAITING_FOR_KV) without holding up other requests
    on_allocated(seq, start, count)     blocks are allocated for tokens [start, start + count):
                                        plan the load into them
    request_finished(seq)               it ended (finished or aborted): whether to hold its blocks
                                        (freed later, when `take_finished` reports them released:
                                        the lease lives here) and kv_transfer_params for the answer
    release(request_id)                 a held request was abandoned: free its blocks once unread

Worker side, per step:
    start_load()                        before the forward: start the loads planned in this step
    save_layer(i, seqs)                 after layer i's KV is written, for the requests whose prompt
                                        completes in this step (layer-wise push)
    step_done(seqs)                     after the step, with the requests whose prompt just completed
    take_finished()                     loads that ended (a load that fails is recomputed; one with
                                        an error fails its request) and held requests released

A load always completes, successfully or not, within a bounded time, and the blocks it writes are
the request's own: an aborted request waiting for its KV keeps its blocks until its load reports
back, so no transfer ever writes into a block that has been given to someone else. Loads finish
before the request is scheduled, so no implementation needs to wait for a layer mid-step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from disagg.engine.sequence import Sequence


@dataclass(frozen=True)
class LoadResult:
    """How a load ended: `tokens` leading tokens of its range arrived intact (0 .. count: the rest is
    recomputed), with any tokens sampled elsewhere that came with the KV (a push's token 1). An
    `error` fails the request instead (the proxy then tries another way)."""

    tokens: int
    first_token_ids: tuple[int, ...] = ()
    error: str | None = None
    via: str = ""  # how the KV came: a transport's name, "push" or "pool"


@dataclass
class Finished:
    loads: dict[str, LoadResult] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)  # held requests whose blocks may be freed

    def merge(self, other: Finished) -> None:
        self.loads.update(other.loads)
        self.released.extend(other.released)


@dataclass(frozen=True)
class Ending:
    """What a connector says when a request ends."""

    hold: bool = False  # keep the request's blocks until reported released
    params: dict[str, Any] | None = None  # kv_transfer_params for the request's answer


class KVMetrics(Protocol):
    """What connectors count; the worker exports it to Prometheus. Called from any thread."""

    def sent(self, nbytes: int) -> None: ...
    def received(self, nbytes: int, via: str) -> None: ...
    def load_failed(self) -> None: ...
    def lease_renewed(self) -> None: ...
    def lease_expired(self) -> None: ...
    def pool_loaded(self, tokens: int, seconds: float) -> None: ...
    def pool_write_dropped(self) -> None: ...


class NoMetrics:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


class KVConnector:
    """The interface, with every method a documented no-op: the connector of an engine whose KV
    never leaves it (and the base of the others)."""

    notify: Callable[[], None] = staticmethod(lambda: None)  # wakes the engine when something finished
    prepares: bool = False  # whether prepare() does anything (the engine then runs it off its thread)

    # ---- scheduler side ----

    def prepare(self, seq: Sequence) -> None:
        """On the caller's thread, before the request is queued."""

    def request_added(self, seq: Sequence) -> None:
        """The request is queued."""

    def num_loadable_tokens(self, seq: Sequence, computed: int) -> int | None:
        """Tokens beyond `computed` that can be loaded from elsewhere (None: not known yet)."""
        return 0

    def on_allocated(self, seq: Sequence, start: int, count: int) -> None:
        """Blocks for tokens [start, start + count) are allocated: plan their load."""

    def request_finished(self, seq: Sequence) -> Ending:
        """The request ended (`seq.finish_reason` says how)."""
        return Ending()

    def release(self, request_id: str) -> bool:
        """A finished request this connector holds blocks for is abandoned (its answer never reached
        anyone): let them go, once nothing reads them, through `take_finished`. False if not held."""
        return False

    # ---- worker side ----

    def start_load(self) -> None:
        """Before the step's forward: start the loads planned during scheduling."""

    def save_layer(self, layer: int, seqs: list[Sequence]) -> None:
        """After layer `layer` of the step has written its KV."""

    def wants_layers(self, seqs: list[Sequence]) -> bool:
        """Whether `save_layer` should be called for a step completing these prompts."""
        return False

    def step_done(self, seqs: list[Sequence]) -> None:
        """After the step; `seqs`: requests whose prompt was completed by it."""

    def take_finished(self) -> Finished:
        """Loads that ended and held requests released since the last call."""
        return Finished()

    def has_finished(self) -> bool:
        """Whether `take_finished` has something (any thread)."""
        return False

    # ---- lifecycle ----

    def tick(self, now: float) -> None:
        """Housekeeping, from the connector's own thread (leases, deadlines, renewals)."""

    def close(self) -> None:
        """Stop threads and ports."""
