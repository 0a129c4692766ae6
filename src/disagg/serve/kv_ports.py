"""The proxy's dealings with the workers' KV ports: where each decode worker's port is (read from
its /health and kept, read again after a push there did not start or failed: a restarted worker
listens on a new port), cancelling a push a decode worker waits for, and releasing KV a prefill
worker holds for a request that will not pull it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Any

import httpx

from disagg.kv.address import Address
from disagg.kv.framing import KVTransferError
from disagg.kv.tcp import Sessions, TcpTransport
from disagg.serve.routing import Placement


@dataclass
class Push:
    """A push under way: the decode worker waiting for it (`waiting` sends its request), the KV
    address it listens at, and the push's id."""

    placed: Placement
    address: tuple[str, int]
    push_id: str
    waiting: asyncio.Task[tuple[Placement, httpx.Response]]


class KVPorts:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.transport = TcpTransport(Sessions(os.environ.get("DISAGG_KV_SECRET") or None))
        self._addresses: dict[str, tuple[str, int]] = {}  # decode URL -> its KV address

    async def address(self, url: str) -> tuple[str, int]:
        """The KV address of the worker at `url` (kept, so a push need not wait for /health)."""
        return self._addresses.get(url) or await self._read(url)

    async def _read(self, url: str) -> tuple[str, int]:
        health = (await self.client.get(url + "/health", timeout=5)).json()
        self._addresses[url] = address = (str(health["kv_host"]), int(health["kv_port"]))
        return address

    async def reread(self, push: Push) -> None:
        """After a push that did not start or failed: the decode worker's KV address, read again, so
        that a cancel reaches it and the next push goes right."""
        self._addresses.pop(push.placed.worker, None)
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError, ValueError):
            push.address = await self._read(push.placed.worker)

    async def cancel(self, push: Push) -> None:
        """Tell the decode worker to stop waiting, and drop its request (and answer, if it came)."""
        with contextlib.suppress(KVTransferError):
            await asyncio.to_thread(self.transport.cancel_push, Address(*push.address), push.push_id)
        push.waiting.cancel()
        (result,) = await asyncio.gather(push.waiting, return_exceptions=True)
        if isinstance(result, tuple):
            await result[1].aclose()

    async def release(self, kvp: dict[str, Any]) -> None:
        """Let a prefill worker free the KV it holds under `kvp` (its answer's kv_transfer_params)."""
        with contextlib.suppress(KVTransferError, KeyError, TypeError):
            address = Address(kvp["remote_host"], kvp["remote_port"])
            await asyncio.to_thread(self.transport.release, address, kvp["remote_request_id"])

    def close(self) -> None:
        self.transport.close()
