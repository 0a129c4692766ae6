"""Routing policies: which worker of a pool gets the next request.

One small interface, so that later policies (least-load, prefix-aware, session affinity) plug in
beside round-robin. A policy sees the pool's healthy workers and the request body; the proxy
tells it when a request ends and when a worker fails.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol


class RoutingPolicy(Protocol):
    def select(self, pool: str, workers: Sequence[str], request: dict[str, Any]) -> str:
        """Pick one of `workers` (never empty) of `pool` ("workers", "prefill" or "decode")."""
        ...

    def on_complete(self, worker: str, request: dict[str, Any]) -> None:
        """A request routed to `worker` has ended (optional bookkeeping)."""
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


class WorkerHealth:
    """Workers that just failed a connection are skipped for `cooldown` seconds."""

    def __init__(self, cooldown: float = 5.0) -> None:
        self.cooldown = cooldown
        self._down_until: dict[str, float] = {}

    def healthy(self, workers: Sequence[str]) -> list[str]:
        t = time.monotonic()
        return [w for w in workers if self._down_until.get(w, 0.0) <= t]

    def mark_down(self, worker: str) -> None:
        self._down_until[worker] = time.monotonic() + self.cooldown

    def mark_up(self, worker: str) -> None:
        self._down_until.pop(worker, None)
