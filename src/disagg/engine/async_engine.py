"""The engine on its own thread, streaming to asyncio callers.

One thread owns the LLMEngine and loops: take commands (add, abort, calls), step, hand each
request's outputs to that request's asyncio queue. Model compute releases the GIL, so an event
loop serving HTTP stays responsive. A request is validated and tokenized on the caller's side and
costs the engine thread one command: it is queued at the next step boundary. A caller that stops
iterating (a client disconnect) aborts its request. A step that fails for some requests fails
those (llm_engine.py); if a step still raises, every open request gets the error, the engine is
marked dead and `on_dead` is told (the worker then exits, for its supervisor to restart it).

The loop beats once per step: `stalled_for()` says how long it has had work and finished no step,
which /health reports (a wedged engine answers HTTP as if all were well otherwise).

This is the engine's whole public face for a server: requests in (`EngineRequest`), outputs out,
and what a server reports about it (tokenizer, limits, stats, prefix-cache events, KV port).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from disagg.engine.llm_engine import INTERNAL_ERROR, KV_TRANSFER_FAILED, LLMEngine, RequestOutput
from disagg.engine.sampling import SamplingParams
from disagg.errors import DisaggError
from disagg.kv.params import KVTransferParams
from disagg.model.tokenizer import Tokenizer

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an internal error; the worker needs a restart."""


class KVLoadError(DisaggError):
    """The KV a request was to receive from elsewhere never arrived (a push that did not come)."""

    http_status = 503
    error_type = KV_TRANSFER_FAILED


class RequestComputeError(DisaggError):
    """The engine could not compute this request (the model failed on it); the others go on."""

    http_status = 500
    error_type = INTERNAL_ERROR


@dataclass(frozen=True)
class EngineRequest:
    """One request as the engine takes it: the prompt (text, or token ids), how to sample, and where
    its KV comes from or goes to."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    kv: KVTransferParams | None = None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self._on_dead = on_dead
        self._beat = time.monotonic()  # when the loop last finished a step or found nothing to do
        self._idle = True
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = engine.wakeup  # also set by the KV connector when a load or release finishes
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="disagg-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stalled_for(self) -> float:
        """Seconds the engine has had work and finished no step (0 when idle or progressing)."""
        return 0.0 if self._idle else max(0.0, time.monotonic() - self._beat)

    def _submit(self, *command: Any) -> None:
        self._commands.put(command)
        self._wake.set()

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Bad input raises here, before anything is queued; a request
        whose KV never came raises KVLoadError, one the model failed on RequestComputeError."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error}")
        seq = self.engine.make_sequence(request.request_id, request.prompt, request.params, request.kv)
        if self.engine.connector.prepares:  # e.g. a pool's existence check: I/O, off the engine thread
            await asyncio.to_thread(self.engine.connector.prepare, seq)
            seq.prepared = True
        q: asyncio.Queue[Any] = asyncio.Queue()
        rid, prompt_ids = request.request_id, seq.prompt_token_ids
        self._streams[rid] = (asyncio.get_running_loop(), q)
        finished = False
        self._submit("add", rid, seq)
        try:
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise (KVLoadError if item.error_type == KV_TRANSFER_FAILED else RequestComputeError)(item.error)
                if prompt_ids is not None:
                    item.prompt_token_ids, prompt_ids = prompt_ids, None
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._submit("abort", rid)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread, between steps."""
        if not self.alive:
            raise EngineDeadError(f"engine stopped: {self.error}")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._submit("call", fn, fut)
        return await asyncio.wrap_future(fut)

    # ---- what a server reports ----

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def info(self) -> dict[str, Any]:
        """The model and how its KV is laid out: what clients and routers need to know."""
        e = self.engine
        return {"model_id": e.model_id, "block_size": e.config.block_size, "max_model_len": e.max_model_len,
                "vocab_size": e.model_config.vocab_size, "kv_dtype": e.dtype_name, "engine_id": e.engine_id}

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    def kv_events(self, since: int) -> list[tuple[int, bool, bytes]] | None:
        """Prefix-cache changes after event `since`, or None when some are no longer kept."""
        return self.engine.block_manager.events.since(since)

    async def kv_snapshot(self) -> tuple[int, list[bytes]]:
        """(event number, every block hash in the prefix cache), taken between steps."""
        return await self.call(lambda e: (e.block_manager.events.number, e.block_manager.cached_hashes()))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.engine.connector.close()

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
            _, request_id, seq = command
            if request_id not in self._streams:  # the caller gave up before we started
                return
            try:
                self.engine.add(seq)
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
                self._idle = True
                self._wake.wait()
                self._wake.clear()
                self._beat, self._idle = time.monotonic(), False
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                self.error = e
                dead = EngineDeadError(f"engine step failed: {e!r}")
                for request_id in list(self._streams):
                    self._deliver(request_id, dead)
                self._fail_pending(dead)
                if self._on_dead is not None:
                    self._on_dead(e)
                return
            self._beat = time.monotonic()
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
