"""The proxy's circuit breaker on its own: states, the half-open trial, and what opening a circuit
does to operations in flight on that worker."""

from __future__ import annotations

import asyncio
import time

import pytest

from disagg.serve.breaker import Breaker, State, WorkerFailed


def test_failures_in_a_row_open_a_circuit_and_a_trial_after_the_cooldown_closes_it():
    b = Breaker(threshold=2, cooldown=0.2)
    b.failure("a", "probe timed out")
    assert b.healthy(["a", "b"]) == ["a", "b"]  # one failure is not enough
    b.success("a")
    b.failure("a", "probe timed out")
    assert b.healthy(["a", "b"]) == ["a", "b"]  # the count starts again after a success
    b.failure("a", "probe timed out")
    assert b.healthy(["a", "b"]) == ["b"]
    assert b.summary()["a"] == {"circuit": "open", "failures": 2, "reason": "probe timed out"}
    time.sleep(0.25)
    assert b.healthy(["a"]) == ["a"]  # half-open: one trial may go
    b.sending("a")
    assert b.healthy(["a"]) == []  # and only one
    b.failure("a", "the trial failed")  # a failed trial opens it again at once
    assert b.state("a") is State.OPEN
    time.sleep(0.25)
    assert b.healthy(["a"]) == ["a"]
    b.success("a")
    assert b.state("a") is State.CLOSED


def test_a_refused_connection_opens_at_once():
    b = Breaker(threshold=5)
    b.failure("a", "connection refused", at_once=True)
    assert b.healthy(["a"]) == []


def test_opening_a_circuit_fails_what_is_in_flight_on_that_worker_only():
    async def scenario() -> tuple[float, list[object]]:
        b = Breaker(threshold=1)

        async def op(worker: str) -> str:
            async with b.watch(worker, 30, "the stream"):
                await asyncio.sleep(5)
            return "done"

        tasks = [asyncio.create_task(op("a")), asyncio.create_task(op("a")), asyncio.create_task(op("b"))]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        b.failure("a", "/health did not answer")
        done = await asyncio.gather(*tasks[:2], return_exceptions=True)
        took = time.monotonic() - t0
        tasks[2].cancel()
        return took, done

    took, done = asyncio.run(scenario())
    assert took < 1.0  # at once, not after their 30 s
    assert all(isinstance(d, WorkerFailed) and "stopped responding during the stream" in str(d) for d in done)


def test_an_opening_circuit_meets_a_watch_whose_deadline_is_firing():
    raised: list[BaseException] = []

    def fail_worker(b: Breaker) -> None:  # as a request's own failure does it, in its coroutine
        try:
            b.failure("a", "probe failed")
        except BaseException as e:
            raised.append(e)

    async def scenario() -> WorkerFailed:
        b = Breaker(threshold=1)
        loop = asyncio.get_running_loop()
        async def prefill() -> None:
            async with b.watch("a", 0.05, "prefill"):
                (watch,) = b._circuits["a"].watches
                loop.call_at(watch.when() + 1e-6, fail_worker, b)  # the same loop turn as the deadline
                await asyncio.sleep(5)

        with pytest.raises(WorkerFailed) as e:
            await prefill()
        return e.value

    error = asyncio.run(scenario())
    assert not raised, raised
    assert error.status in (502, 504)
