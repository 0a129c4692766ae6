"""The proxy's side facing workers: sending a request to a pool with fallback and deadlines, and
reshaping a prefill worker's answer (token 1) for the client. Streams go through serve/relay.py.

Every worker tried is charged to the client request's `Charges` (serve/routing.py); a worker that
failed is settled at once, the one that answered is settled by its caller or by the sweep at the
end of the client request. For a streamed answer that end is when `ChargedStream` has been sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from disagg.serve.breaker import Breaker, WorkerFailed
from disagg.serve.options import Resilience
from disagg.serve.protocol import SSE_DONE, error_body, new_id, now, sse, stream_chunk, usage_chunk
from disagg.serve.routing import Charges, Placement

log = logging.getLogger("disagg.proxy")


class UpstreamError(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        error = body.get("error")
        super().__init__(error.get("message", "upstream error") if isinstance(error, dict) else
                         body.get("message", "upstream error"))
        self.status, self.body, self.headers = status, body, headers or {}


class ChargedStream(StreamingResponse):
    """An SSE answer that sweeps its client request's charges once sending has ended, however it
    ended (finished, failed, or the client left, even before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], charges: Charges) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.charges = charges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.charges.sweep()


class Upstream:
    """Sends to the workers of named pools over one HTTP client, each send bounded by its phase's
    deadline (a prefill's answer, a stream's first token, a whole answer) and by the worker's
    circuit (serve/breaker.py). Before anything was computed (a refused connection, a worker
    that is overloaded or whose engine is down) the next worker is tried at once; a worker that
    fails after it took the request raises WorkerFailed, for the caller to migrate or report."""

    def __init__(self, client: httpx.AsyncClient, pools: dict[str, tuple[str, ...]], opts: Resilience) -> None:
        self.client, self.pools, self.opts = client, pools, opts
        self.breaker = Breaker(opts.breaker_threshold, opts.breaker_cooldown)
        self.prefilling: dict[str, int] = {}  # prefill worker -> requests waiting on its answer

    def healthy(self, workers: tuple[str, ...]) -> list[str]:
        """The workers a request may go to (all of them when none is known healthy: one may be back)."""
        return self.breaker.healthy(workers) or list(workers)

    async def open(self, charges: Charges, pool: str, path: str, body: dict[str, Any], stream: bool,
                   only: Placement | None = None, exclude: set[str] | None = None) -> tuple[Placement, httpx.Response]:
        """Send to a worker of `pool` (or to `only`, placed already) other than `exclude`; a 4xx
        answer raises UpstreamError with the worker's own error."""
        workers = (only.worker,) if only else self.pools[pool]
        tried = set(exclude or ())
        refused: UpstreamError | None = None
        while True:
            candidates = [w for w in self.breaker.healthy(workers) if w not in tried] or [
                w for w in workers if w not in tried]
            if not candidates:
                if refused is not None:
                    raise refused
                kind = "" if pool == "workers" else f"{pool} "
                raise UpstreamError(502, error_body(f"no {kind}worker is reachable ({', '.join(workers)})",
                                                    "bad_gateway", 502))
            placed = only or charges.select(pool, candidates, body)
            url = placed.worker
            tried.add(url)
            try:
                resp = await self._send(charges, pool, url, path, body, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                log.warning("worker %s unreachable: %s", url, e)
                self.breaker.failure(url, f"connection refused: {e}", at_once=True)
                placed.settle()
                continue
            except BaseException as e:
                placed.settle()
                if isinstance(e, httpx.HTTPError):
                    self.breaker.failure(url, f"failed mid-request: {e!r}")
                    raise WorkerFailed(url, f"worker {url} failed: {e!r}") from e
                raise
            if resp.status_code == 200:
                self.breaker.success(url)
                return placed, resp
            placed.settle()
            error = await _upstream_error(url, resp, stream)
            if resp.status_code != 503:
                raise error
            # overloaded, loading or down: nothing was computed, so another worker may take it now
            if "engine" in str(error):  # its engine is down or stalled (not a full queue)
                self.breaker.failure(url, str(error), at_once=True)
            refused = error

    def _deadline(self, pool: str, stream: bool) -> float:
        o = self.opts
        return o.prefill_timeout if pool == "prefill" else o.first_token_timeout if stream else o.timeout

    async def _send(self, charges: Charges, pool: str, url: str, path: str, body: dict[str, Any],
                    stream: bool) -> httpx.Response:
        """One POST, until its answer starts (a stream) or ends. A prefill counts as in flight
        (--prefill-queue-limit) until its worker answers."""
        busy = None
        if pool == "prefill":
            self.prefilling[url] = self.prefilling.get(url, 0) + 1
            busy = charges.hold(url, lambda: self.prefilling.__setitem__(url, self.prefilling[url] - 1))
        self.breaker.sending(url)
        what = "prefill" if pool == "prefill" else "the first token" if stream else "the answer"
        try:
            async with self.breaker.watch(url, self._deadline(pool, stream), what):
                return await self.client.send(self.client.build_request("POST", url + path, json=body), stream=stream)
        except WorkerFailed as e:
            if e.status == 504:  # its own deadline passed (an open circuit has counted already)
                self.breaker.failure(url, str(e))
            raise
        finally:
            if busy is not None:
                busy.settle()


async def _upstream_error(url: str, resp: httpx.Response, stream: bool) -> UpstreamError:
    """A worker's non-200 answer as the error the client gets (its own OpenAI error when readable)."""
    data = (await resp.aread()) if stream else resp.content
    await resp.aclose()
    try:
        err = json.loads(data)
    except ValueError:
        err = None
    if not isinstance(err, dict):
        err = error_body(f"worker {url} answered {resp.status_code}", "bad_gateway", 502)
    retry = resp.headers.get("retry-after")
    return UpstreamError(resp.status_code, err, {"Retry-After": retry} if retry else None)


# ---- a prefill worker's answer, reshaped for the client ----


def choice_text(resp: dict[str, Any], chat: bool) -> str:
    choice = resp["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def first_chunk(pre: dict[str, Any], chat: bool) -> dict[str, Any]:
    """Token 1 as the stream's first chunk."""
    choice = pre["choices"][0]
    return stream_chunk(pre.get("id", new_id("cmpl")), pre.get("created", now()), pre.get("model"), chat,
                        choice_text(pre, chat), role=True, token_ids=choice.get("token_ids"),
                        prompt_token_ids=pre.get("prompt_token_ids", choice.get("prompt_token_ids")))


def prepend_first(answer: dict[str, Any], pre: dict[str, Any], chat: bool) -> None:
    """Token 1 (from prefill) goes before what decode generated: its text, and its id if asked for."""
    choice, text = answer["choices"][0], choice_text(pre, chat)
    if chat:
        choice["message"]["content"] = text + (choice["message"].get("content") or "")
    else:
        choice["text"] = text + choice["text"]
    first_ids = pre["choices"][0].get("token_ids")
    if first_ids is not None and "token_ids" in choice:
        choice["token_ids"] = first_ids + choice["token_ids"]


def whole_answer(pre: dict[str, Any], chat: bool, body: dict[str, Any]) -> Response:
    """Prefill's answer as the whole answer (token 1 ended the request), streamed if asked."""
    if not body.get("stream"):
        return JSONResponse(pre)
    chunk = first_chunk(pre, chat)
    chunk["choices"][0]["finish_reason"] = pre["choices"][0].get("finish_reason")
    parts = [sse(chunk)]
    if (body.get("stream_options") or {}).get("include_usage"):
        parts.append(sse(usage_chunk(chunk["id"], chunk["created"], chunk["model"], chat, pre.get("usage"))))
    parts.append(SSE_DONE)
    return Response(b"".join(parts), media_type="text/event-stream")
