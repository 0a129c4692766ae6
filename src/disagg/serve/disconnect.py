"""Work done for a client that may go away before it is answered.

Starlette notices a vanished client only while it streams a response body; a handler still
computing (a non-streaming completion, a prefill before token 1, the proxy waiting on a worker)
would run to the end for nobody. `unless_disconnected` runs such work beside a watch on the
connection and cancels it when the client leaves: the engine stream it awaits closes, which aborts
the request and frees its KV; a proxy's upstream call closes its connection, and so the worker's
own watch aborts there too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")

POLL = 0.25  # seconds between looks at the connection: a client that left stops its work this fast


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
    """(True, what `work` returned), or (False, None) if the client went away first and the work
    was cancelled. Whatever `work` raises is raised here."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL)
            if done:
                return True, task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return False, None
    except asyncio.CancelledError:  # this handler itself was cancelled (the server is stopping)
        task.cancel()
        raise
