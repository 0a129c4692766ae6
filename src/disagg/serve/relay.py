"""A worker's answer on its way to the client, and where the request goes when its worker fails.

Streams pass event by event. The proxy asks its workers for token ids in every stream (vLLM's
return_token_ids) and keeps those streamed so far (ids the client did not ask for are taken out
again). If the worker dies, hangs (no chunk for --stream-idle-timeout, or its circuit opens:
serve/breaker.py) or reports a server error mid-stream, the request is sent again to another
worker with the tokens already streamed as its first_token_ids: that worker prefills the prompt
and those tokens and goes on, and the client's stream continues under the same id with no token
missing or repeated. Greedy output equals an undisturbed run; seeded sampling draws per output
position (engine/runner.py), so it continues the same random stream. A non-streamed request that
fails is sent again whole. Up to --migration-limit moves per request, then an error.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from disagg.serve.breaker import WorkerFailed
from disagg.serve.protocol import SSE_DONE, sse
from disagg.serve.routing import Charges, Placement
from disagg.serve.upstream import Upstream, UpstreamError

log = logging.getLogger("disagg.proxy")

Opened = tuple[Placement, httpx.Response]
_DONE = object()


class Mover:
    """One client request's way through workers that may fail: `stream()` for an SSE answer,
    `whole()` for a JSON one. `pools` are where it may move, in order of preference; `generated`
    the token ids the client has already been sent (token 1 from a prefill worker); `on_leave` runs
    once when the first worker is left, moved from or failed (the proxy releases the KV a prefill
    worker holds for it)."""

    def __init__(self, up: Upstream, charges: Charges, path: str, body: dict[str, Any], pools: tuple[str, ...],
                 generated: list[int] | None = None, on_leave: Callable[[], Awaitable[None]] | None = None) -> None:
        self.up, self.charges, self.path, self.body, self.pools = up, charges, path, body, pools
        self.generated = list(generated or [])
        self.on_leave = on_leave
        self.want_ids = bool(body.get("return_token_ids"))
        self.ids_known = True  # every token streamed so far came with its id
        self.finished = False  # a choice has its finish_reason: nothing is left to generate
        self.moved = False
        self.first_id: tuple[Any, Any] | None = None  # (id, created) of the stream the client sees
        self.role_sent = False  # a chat stream's role goes once, on its first chunk

    # ---- moving ----

    def _can_move(self) -> bool:
        return self.ids_known and self.charges.migrations < self.up.opts.migration_limit

    def _elsewhere(self, error: UpstreamError) -> bool:
        """No worker of the first pool could take it (all down, or at their limits): the other
        kind of worker may, before anything was generated."""
        return not self.moved and error.status >= 502 and len(self.pools) > 1 and self._can_move()

    async def _move(self, error: WorkerFailed, stream: bool) -> Opened:
        """To any worker but the one that just failed (one that failed earlier and came back, a
        restarted worker, may take it: its circuit says whether it is healthy)."""
        self.charges.move()
        log.warning("%s; moving the request elsewhere (move %d of %d, %d tokens done)", error,
                    self.charges.migrations, self.up.opts.migration_limit, len(self.generated))
        await self._leave()
        self.moved = True
        body = {k: v for k, v in self.body.items() if k != "kv_transfer_params"}
        if stream:
            body["return_token_ids"] = True
        if self.generated:  # the tokens the client has, prefilled with the prompt on the new worker
            body["kv_transfer_params"] = {"do_remote_prefill": True, "first_token_ids": self.generated}
        # workers that are down or still loading (a restart) come back in seconds: try again for as
        # long as a stream may be silent, the failed worker too after the first round
        deadline = time.monotonic() + self.up.opts.stream_idle_timeout
        exclude = {error.worker}
        while True:
            for pool in self.pools:
                try:
                    return await self.up.open(self.charges, pool, self.path, body, stream, exclude=exclude)
                except UpstreamError as e:
                    if e.status < 500 or time.monotonic() > deadline:
                        raise
            exclude = set()
            await asyncio.sleep(0.5)

    async def _leave(self) -> None:
        if self.on_leave is not None:
            on_leave, self.on_leave = self.on_leave, None
            await on_leave()

    async def whole(self, open_first: Callable[[], Awaitable[Opened]]) -> httpx.Response:
        """A non-streamed answer, sent again elsewhere while its worker fails (UpstreamError when it
        cannot be had)."""
        opener = open_first
        while True:
            try:
                _, resp = await opener()
                return resp
            except UpstreamError as e:
                if not self._elsewhere(e):
                    raise
                opener = functools.partial(self._move, WorkerFailed("", str(e)), False)
            except WorkerFailed as e:
                if not self._can_move():
                    raise UpstreamError(e.status, e.body) from e
                opener = functools.partial(self._move, e, False)

    # ---- streams ----

    async def stream(self, open_first: Callable[[], Awaitable[Opened]]) -> AsyncIterator[bytes]:
        """The client's SSE stream, from whichever workers serve it."""
        opener = open_first
        while True:
            try:
                placed, resp = await opener()
                try:
                    async for event in self._events(placed, resp):
                        yield event
                    return
                finally:
                    placed.settle()
                    await resp.aclose()
            except UpstreamError as e:
                if self._elsewhere(e):
                    opener = functools.partial(self._move, WorkerFailed("", str(e)), True)
                    continue
                await self._leave()
                yield sse(e.body)
                yield SSE_DONE
                return
            except WorkerFailed as e:
                if self.finished:  # it failed after its last token: the answer is whole
                    yield SSE_DONE
                    return
                if not self._can_move():
                    await self._leave()
                    yield sse(e.body)
                    yield SSE_DONE
                    return
                opener = functools.partial(self._move, e, True)

    async def _events(self, placed: Placement, resp: httpx.Response) -> AsyncIterator[bytes]:
        """One worker's events, until [DONE]; WorkerFailed if it dies, hangs or fails first."""
        worker, idle = placed.worker, self.up.opts.stream_idle_timeout
        chunks = resp.aiter_raw()
        buffer = b""
        while True:
            try:
                async with self.up.breaker.watch(worker, idle, "the stream"):
                    chunk = await anext(chunks, None)
            except httpx.HTTPError as e:
                self.up.breaker.failure(worker, f"failed mid-stream: {e!r}")
                raise WorkerFailed(worker, f"worker {worker} failed mid-stream: {e!r}") from e
            except WorkerFailed as e:
                if e.status == 504:  # its own deadline passed (an open circuit has counted already)
                    self.up.breaker.failure(worker, str(e))
                raise
            if chunk is None:
                raise WorkerFailed(worker, f"worker {worker} ended its stream before [DONE]")
            buffer += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                out = self._event(worker, raw)
                if out is _DONE:
                    yield SSE_DONE
                    return
                yield out

    def _event(self, worker: str, raw: bytes) -> Any:
        """One SSE event as the client gets it (our bookkeeping done), or _DONE."""
        if not raw.startswith(b"data:"):
            return raw + b"\n\n"  # a comment or another field: passed as is
        data = raw[5:].strip()
        if data == b"[DONE]":
            return _DONE
        try:
            obj = json.loads(data)
        except ValueError:
            return raw + b"\n\n"
        if not isinstance(obj, dict):
            return raw + b"\n\n"
        error = obj.get("error")
        if isinstance(error, dict) and not obj.get("choices"):
            code = error.get("code")
            if isinstance(code, int) and code >= 500:  # the worker failed this request: another may not
                raise WorkerFailed(worker, f"worker {worker} failed mid-stream: {error.get('message')}")
            return sse(obj)
        if self.first_id is None:
            self.first_id = (obj.get("id"), obj.get("created"))
        else:  # one id for the whole stream, whichever worker sent the chunk
            obj["id"], obj["created"] = self.first_id
        for choice in obj.get("choices") or ():
            self._track(choice)
        return sse(obj)

    def _track(self, choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self.generated.extend(ids)
        elif choice.get("text") or (choice.get("delta") or {}).get("content"):
            self.ids_known = False  # a worker that does not send ids: its stream cannot be moved
        if choice.get("finish_reason"):
            self.finished = True
        if not self.want_ids:
            choice.pop("token_ids", None)
            choice.pop("prompt_token_ids", None)
        delta = choice.get("delta")
        if isinstance(delta, dict) and "role" in delta:
            if self.role_sent:  # the client had it (from prefill's token 1, or the worker before a move)
                del delta["role"]
            self.role_sent = True
