"""What every HTTP request passes before a route sees it: the API key and the body size.

One ASGI middleware shared by the worker and the proxy. With an API key set, every route but
/health and /metrics needs `Authorization: Bearer <key>` (vLLM's and OpenAI's convention), compared
in constant time; without one the server is open, as vLLM's is, and binds loopback by default. A
body longer than the limit is refused with 413 before it is read into memory (by Content-Length,
or as it streams in when the length is not given).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from disagg.kv.address import is_loopback

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers need no key (vLLM's semantics)
MAX_BODY_BYTES = 32 * 1024 * 1024  # far beyond any prompt a context holds, far below what hurts a worker


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_body = app, max_body
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.key):
            await _reply(send, 401, "invalid or missing API key: send Authorization: Bearer <key>",
                         "invalid_request_error", "invalid_api_key", {"www-authenticate": "Bearer"})
            return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _too_large(send, self.max_body)
            return
        body = bytearray()
        more = True
        while more:  # read here, bounded, then handed on whole (FastAPI reads it whole anyway)
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _too_large(send, self.max_body)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: a disconnect, watched by the routes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    await _reply(send, 413, f"request body is larger than {limit // (1024 * 1024)} MiB", "invalid_request_error",
                 413, {})


async def _reply(send: Send, status: int, message: str, err_type: str, code: Any, extra: dict[str, str]) -> None:
    body = json.dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def warn_if_open(host: str, api_key: str | None, what: str) -> None:
    """Say so when a server anyone on the network may reach has no key (it still starts: a private
    network may be what the user wants)."""
    if not api_key and not is_loopback(host):
        logging.getLogger("disagg").warning("%s listens on %s with no --api-key: anyone who reaches it may use it "
                                            "(and, for a worker, pin its KV); set --api-key", what, host)
