"""Which workers the proxy may send to: a circuit breaker per worker, fed by probes and requests.

Each worker's circuit is closed (in use), open (skipped) or half-open (one trial request). The
proxy probes every worker's /health each `health_interval` seconds; a probe that fails or takes
longer than `health_timeout`, a refused connection and a worker's 503 each count as a failure,
and `threshold` failures in a row open the circuit. An open circuit is tried again after
`cooldown` seconds: the next probe or request to succeed closes it, a failure opens it again (as
SGLang's router does). A worker whose /health reports its engine stalled or dead is open too.

Opening a circuit also fails every operation in flight on that worker at once (their `watch`
deadlines are moved to now), so a hung worker (SIGSTOP, a wedged engine) costs its clients the
time to notice it, not their own timeouts; the proxy then migrates or reports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx

from disagg.serve.protocol import error_body

log = logging.getLogger("disagg.proxy")


class WorkerFailed(Exception):
    """A worker hung, died or stopped answering during an operation: another worker may finish it.
    As the client's error: 504 when it ran out of time, 502 otherwise."""

    def __init__(self, worker: str, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.worker = worker
        self.status, self.error_type = (504, "gateway_timeout") if timed_out else (502, "bad_gateway")
        self.body, self.headers = error_body(message, self.error_type, self.status), {}  # as UpstreamError's


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class _Circuit:
    state: State = State.CLOSED
    failures: int = 0  # in a row
    opened_at: float = 0.0
    trial: bool = False  # half-open: a trial request is in flight
    reason: str = ""
    watches: set[asyncio.Timeout] = field(default_factory=set)


class Breaker:
    def __init__(self, threshold: int = 3, cooldown: float = 5.0) -> None:
        self.threshold, self.cooldown = threshold, cooldown
        self._circuits: dict[str, _Circuit] = {}

    def _get(self, worker: str) -> _Circuit:
        return self._circuits.setdefault(worker, _Circuit())

    def healthy(self, workers: Sequence[str]) -> list[str]:
        """The workers a request may go to now (closed, or half-open with no trial under way)."""
        t = time.monotonic()
        out = []
        for w in workers:
            c = self._get(w)
            if c.state is State.OPEN and t - c.opened_at >= self.cooldown:
                c.state, c.trial = State.HALF_OPEN, False
            if c.state is State.CLOSED or (c.state is State.HALF_OPEN and not c.trial):
                out.append(w)
        return out

    def sending(self, worker: str) -> None:
        """A request goes to `worker`: in half-open, that is the trial."""
        c = self._get(worker)
        if c.state is State.HALF_OPEN:
            c.trial = True

    def success(self, worker: str) -> None:
        c = self._get(worker)
        if c.state is not State.CLOSED:
            log.warning("worker %s is back (circuit closed)", worker)
        c.state, c.failures, c.trial = State.CLOSED, 0, False

    def failure(self, worker: str, reason: str, at_once: bool = False) -> None:
        """One failure; the circuit opens after `threshold` in a row (at once: a refused connection,
        a dead engine, a failed trial)."""
        c = self._get(worker)
        c.failures += 1
        c.reason = reason
        if c.state is State.HALF_OPEN or at_once or c.failures >= self.threshold:
            self._open(worker, c)

    def _open(self, worker: str, c: _Circuit) -> None:
        if c.state is not State.OPEN:
            log.warning("worker %s taken out of rotation (circuit open): %s", worker, c.reason)
        c.state, c.opened_at, c.trial = State.OPEN, time.monotonic(), False
        for watch in c.watches:  # everything waiting on it fails now
            if not watch.expired():  # (one expiring already is failing anyway)
                watch.reschedule(asyncio.get_running_loop().time())

    def state(self, worker: str) -> State:
        return self._get(worker).state

    def summary(self) -> dict[str, dict[str, object]]:
        return {w: {"circuit": c.state.value, "failures": c.failures, "reason": c.reason or None}
                for w, c in self._circuits.items()}

    @contextlib.asynccontextmanager
    async def watch(self, worker: str, seconds: float | None, what: str) -> AsyncIterator[None]:
        """Bound an operation on `worker`: WorkerFailed after `seconds` (None: no limit), or as soon
        as its circuit opens."""
        c = self._get(worker)  # an open circuit may be tried (nothing else may be left; it may be back)
        try:
            async with asyncio.timeout(seconds) as timeout:
                c.watches.add(timeout)
                try:
                    yield
                finally:
                    c.watches.discard(timeout)
        except TimeoutError:
            if c.state is State.OPEN:
                raise WorkerFailed(worker, f"worker {worker} stopped responding during {what}: {c.reason}") from None
            raise WorkerFailed(worker, f"worker {worker} sent nothing for {seconds:g} s during {what}",
                               timed_out=True) from None


class Prober:
    """Probes each worker's /health every `interval` seconds and tells the breaker."""

    def __init__(self, breaker: Breaker, client: httpx.AsyncClient, workers: Sequence[str], interval: float,
                 timeout: float) -> None:
        self.breaker, self.client, self.workers = breaker, client, tuple(workers)
        self.interval, self.timeout = interval, timeout
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(w)) for w in self.workers]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, worker: str) -> None:
        while True:
            started = time.monotonic()
            reason = await self.probe(worker)
            if reason is None:
                self.breaker.success(worker)
            else:
                self.breaker.failure(worker, reason)
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def probe(self, worker: str) -> str | None:
        """Why `worker` is not healthy now, or None."""
        try:
            r = await self.client.get(worker + "/health", timeout=self.timeout)
        except httpx.TimeoutException:
            return f"/health did not answer within {self.timeout:g} s"
        except httpx.HTTPError as e:
            return f"/health failed: {e!r}"
        if r.status_code == 200:
            return None
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        return f"/health answered {r.status_code}: {message}"
