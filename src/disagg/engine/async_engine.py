"""The engine on its own thread, streaming to asyncio callers.

One thread owns the LLMEngine and loops: take commands (add, abort, calls), step, hand each
request's outputs to that request's asyncio queue. Model compute releases the GIL, so an event
loop serving HTTP stays responsive. A caller that stops iterating (a client disconnect) aborts
its request. If a step fails, every open request gets the error and the engine is marked dead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from typing import Any, TypeVar

from disagg.engine.llm_engine import LLMEngine, RequestOutput
from disagg.engine.sampling import SamplingParams
from disagg.engine.sequence import Sequence

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an internal error; the worker needs a restart."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="disagg-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def _submit(self, *command: Any) -> None:
        self._commands.put(command)
        self._wake.set()

    async def generate(self, prompt: str | Seq[int] | Sequence, params: SamplingParams, request_id: str | None = None,
                       **add_kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Bad input raises here, before anything is queued."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        if isinstance(prompt, Sequence):
            seq, request_id = prompt, prompt.request_id
        else:
            request_id = request_id or uuid.uuid4().hex
            seq = self.engine.make_sequence(request_id, prompt, params)
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        finished = False
        self._submit("add", request_id, seq, add_kwargs)
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread, between steps (export_kv, release, stats...)."""
        if not self.alive:
            raise EngineDeadError(f"engine stopped: {self.error}")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._submit("call", fn, fut)
        return await asyncio.wrap_future(fut)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine thread ----

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, q = entry
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is listening
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _run_command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, seq, kwargs = command
            if request_id not in self._streams:  # the caller gave up before we started
                return
            try:
                self.engine.add_request(request_id, seq, **kwargs)
            except Exception as e:
                self._deliver(request_id, e)
        elif kind == "abort":
            self.engine.abort(command[1])
        elif kind == "call":
            _, fn, fut = command
            try:
                fut.set_result(fn(self.engine))
            except Exception as e:
                fut.set_exception(e)

    def _loop(self) -> None:
        while not self._stopping:
            while True:
                try:
                    self._run_command(self._commands.get_nowait())
                except queue.Empty:
                    break
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                self.error = e
                dead = EngineDeadError(f"engine step failed: {e!r}")
                for request_id in list(self._streams):
                    self._deliver(request_id, dead)
                self._fail_pending(dead)
                return
            for out in outputs:
                self._deliver(out.request_id, out)
        self._fail_pending(EngineDeadError("engine shut down"))

    def _fail_pending(self, error: Exception) -> None:
        """Answer commands nobody will run: calls get the error, queued requests too."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "call":
                command[2].set_exception(error)
            elif command[0] == "add":
                self._deliver(command[1], error)
