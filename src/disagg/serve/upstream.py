"""The proxy's side facing workers: sending a request to a pool with fallback, passing a stream
through, and reshaping a prefill worker's answer (token 1) for the client.

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

from disagg.serve.protocol import SSE_DONE, error_body, new_id, now, sse, stream_chunk, usage_chunk
from disagg.serve.routing import Charges, Placement, WorkerHealth

log = logging.getLogger("disagg.proxy")


class UpstreamError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", {}).get("message", "upstream error"))
        self.status, self.body = status, body


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
    """Sends to the workers of named pools over one HTTP client. A worker that refuses connections
    is skipped for a few seconds (`health`); prefills in flight are counted per worker."""

    def __init__(self, client: httpx.AsyncClient, pools: dict[str, tuple[str, ...]]) -> None:
        self.client, self.pools = client, pools
        self.health = WorkerHealth()
        self.prefilling: dict[str, int] = {}  # prefill worker -> requests waiting on its answer

    async def open(self, charges: Charges, pool: str, path: str, body: dict[str, Any], stream: bool,
                   only: Placement | None = None) -> tuple[Placement, httpx.Response]:
        """Send to a worker of `pool` (or to `only`, placed already), moving on to the next one while
        connections are refused; a non-200 answer raises UpstreamError with the worker's error."""
        workers = (only.worker,) if only else self.pools[pool]
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.health.healthy(workers) if w not in tried] or [
                w for w in workers if w not in tried]
            if not candidates:
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
                self.health.mark_down(url)
                placed.settle()
                continue
            except BaseException as e:
                placed.settle()
                if isinstance(e, httpx.HTTPError):
                    raise UpstreamError(502, error_body(f"worker {url} failed: {e!r}", "bad_gateway", 502)) from e
                raise
            self.health.mark_up(url)
            if resp.status_code != 200:
                placed.settle()
                raise await _upstream_error(url, resp, stream)
            return placed, resp

    async def _send(self, charges: Charges, pool: str, url: str, path: str, body: dict[str, Any],
                    stream: bool) -> httpx.Response:
        """One POST. A prefill counts as in flight (--prefill-queue-limit) until its worker answers."""
        busy = None
        if pool == "prefill":
            self.prefilling[url] = self.prefilling.get(url, 0) + 1
            busy = charges.hold(url, lambda: self.prefilling.__setitem__(url, self.prefilling[url] - 1))
        try:
            return await self.client.send(self.client.build_request("POST", url + path, json=body), stream=stream)
        finally:
            if busy is not None:
                busy.settle()


async def passthrough(placed: Placement, resp: httpx.Response) -> AsyncIterator[bytes]:
    """A worker's stream, byte for byte; a worker that dies mid-stream ends it with an error event."""
    try:
        async for chunk in resp.aiter_raw():
            yield chunk
    except httpx.HTTPError as e:
        log.warning("worker %s failed mid-stream: %r", placed.worker, e)
        yield sse(error_body(f"worker {placed.worker} failed mid-stream: {e!r}", "bad_gateway", 502))
        yield SSE_DONE
    finally:
        placed.settle()
        await resp.aclose()


async def _upstream_error(url: str, resp: httpx.Response, stream: bool) -> UpstreamError:
    """A worker's non-200 answer as the error the client gets (its own OpenAI error when readable)."""
    data = (await resp.aread()) if stream else resp.content
    await resp.aclose()
    try:
        err = json.loads(data)
    except ValueError:
        err = error_body(f"worker {url} answered {resp.status_code}", "bad_gateway", 502)
    return UpstreamError(resp.status_code, err)


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
