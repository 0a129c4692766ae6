"""The proxy's view of which KV blocks each worker holds, from the workers' own reports.

A worker serves its tokenizer and hashing scheme (`GET /kv/tokenizer`) and a numbered log of the
block hashes entering and leaving its prefix cache (`GET /kv/events`, engine/block_manager.py).
The proxy tokenizes each request exactly as the workers do, hashes its full blocks with the same
chained hash (kv/block_hash.py), and asks the index how many leading blocks each worker holds:
Dynamo's KV-aware routing, with HTTP polling standing in for its event bus.

Between polls the index also records where it just sent a prompt (its blocks will be there once
prefilled), for a few seconds unless a report confirms them, so a burst of requests sharing a
prefix does not scatter before the first report arrives.

Workers that do not serve these endpoints (vLLM, say) are simply not indexed; routing then falls
back to the proxy's own approximate view (serve/routing.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from disagg.errors import InvalidRequestError
from disagg.kv.block_hash import chain_hashes
from disagg.model.tokenizer import Tokenizer
from disagg.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("disagg.kv_index")

CONFIRMED = float("inf")


@dataclass
class PromptHasher:
    """Request body -> (prompt tokens, block hashes), as the workers compute them."""

    tokenizer: Tokenizer
    model_id: str
    block_size: int

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> PromptHasher:
        return cls(Tokenizer.from_dict(report["tokenizer"]), str(report["model_id"]), int(report["block_size"]))

    def token_ids(self, body: dict[str, Any]) -> list[int] | None:
        """The prompt as the worker will see it, read by the worker's own request models; None where
        the request is not one we can read (the worker will answer it with an error anyway)."""
        try:
            if "prompt" in body:
                prompt = CompletionRequest.model_validate(body).prompt
                return prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
            messages = ChatCompletionRequest.model_validate(body).chat_messages()
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        except (ValidationError, InvalidRequestError):
            return None

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        return chain_hashes(token_ids, self.block_size, self.model_id)


@dataclass
class WorkerView:
    held: dict[bytes, float] = field(default_factory=dict)  # hash -> expiry (CONFIRMED once reported)
    epoch: str = ""
    number: int = -1
    hasher: PromptHasher | None = None


class KVIndex:
    """Which blocks each worker holds. `matched` is all the router needs."""

    def __init__(self, predicted_ttl: float = 5.0) -> None:
        self.workers: dict[str, WorkerView] = {}
        self.predicted_ttl = predicted_ttl
        self._memo: OrderedDict[tuple[int, str, int], tuple[Any, Any]] = OrderedDict()  # recent requests

    def view(self, worker: str) -> WorkerView:
        return self.workers.setdefault(worker, WorkerView())

    def hasher(self, workers: Sequence[str]) -> PromptHasher | None:
        """The hashing scheme of these workers, when every one of them reported the same one."""
        views = [self.workers.get(w) for w in workers]
        if not views or any(v is None or v.hasher is None for v in views):
            return None
        first = views[0].hasher
        same = all(v.hasher.model_id == first.model_id and v.hasher.block_size == first.block_size for v in views)
        return first if same else None

    def prompt(self, request: dict[str, Any], workers: Sequence[str]) -> tuple[list[int], list[bytes], int] | None:
        """(token ids, block hashes, block size) of a request, or None when the workers did not say
        how they hash or the request cannot be read. Recent answers are kept: a request is routed
        up to three times (local-prefill check, prefill pool, decode pool), its prompt object shared."""
        hasher = self.hasher(workers)
        if hasher is None:
            return None
        source = request.get("prompt") if "prompt" in request else request.get("messages")
        key = (id(source), hasher.model_id, hasher.block_size)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is source:  # the same object, not one that reused its id
            return hit[1]
        ids = hasher.token_ids(request)
        out = None if ids is None else (ids, hasher.hashes(ids), hasher.block_size)
        self._memo[key] = (source, out)  # holds `source`, so its id cannot be reused meanwhile
        while len(self._memo) > 256:
            self._memo.popitem(last=False)
        return out

    def matched(self, worker: str, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` the worker holds (reported, or recently sent to it)."""
        view = self.workers.get(worker)
        if view is None:
            return 0
        t = time.monotonic()
        n = 0
        for h in hashes:
            expiry = view.held.get(h)
            if expiry is None or expiry < t:
                break
            n += 1
        return n

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per worker: whether it reports, and how many blocks it reported holding."""
        return {w: {"reporting": v.hasher is not None, "blocks": sum(1 for e in v.held.values() if e == CONFIRMED)}
                for w, v in self.workers.items()}

    def predict(self, worker: str, hashes: Sequence[bytes]) -> None:
        """The worker was just sent this prompt: assume it holds its blocks until told otherwise."""
        held = self.view(worker).held
        expiry = time.monotonic() + self.predicted_ttl
        for h in hashes:
            if held.get(h, 0.0) < expiry:
                held[h] = expiry

    def apply(self, worker: str, report: dict[str, Any]) -> None:
        """Fold one /kv/events answer into the worker's view."""
        view = self.view(worker)
        if "snapshot" in report:
            predicted = {h: e for h, e in view.held.items() if e != CONFIRMED}
            view.held = predicted | {bytes.fromhex(h): CONFIRMED for h in report["snapshot"]}
        else:
            for stored, h in report["events"]:
                key = bytes.fromhex(h)
                if stored:
                    view.held[key] = CONFIRMED
                else:
                    view.held.pop(key, None)
        view.epoch, view.number = str(report["epoch"]), int(report["number"])
        if len(view.held) > 4 * 65_536:  # stale predictions pile up only if reports stop: drop them
            t = time.monotonic()
            view.held = {h: e for h, e in view.held.items() if e >= t}


class KVWatcher:
    """Polls every worker's /kv/tokenizer once and /kv/events every `period` seconds."""

    def __init__(self, index: KVIndex, client: httpx.AsyncClient, workers: Sequence[str], period: float = 0.25) -> None:
        self.index, self.client, self.workers, self.period = index, client, tuple(workers), period
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(w)) for w in self.workers]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, worker: str) -> None:
        """One loop per worker, so a slow one delays only its own view."""
        failures = 0
        while True:
            try:
                if await self._poll(worker) is False:
                    return
            except Exception as e:  # a bad report must not end the loop; say so once in a while
                failures += 1
                if failures % 100 == 1:
                    log.warning("KV report from %s unusable (%d times): %r", worker, failures, e)
            await asyncio.sleep(self.period)

    async def _poll(self, worker: str) -> bool:
        """One report folded in; False when the worker will never report (not one of ours)."""
        view = self.index.view(worker)
        try:
            if view.hasher is None:
                r = await self.client.get(worker + "/kv/tokenizer", timeout=30)
                if r.status_code == 404:  # not one of ours: routing falls back to its own view
                    log.warning("worker %s reports no KV blocks; prefix routing approximates for it", worker)
                    return False
                if r.status_code != 200:
                    return True  # still loading
                view.hasher = PromptHasher.from_report(r.json())
            r = await self.client.get(worker + "/kv/events", params={"since": view.number, "epoch": view.epoch},
                                      timeout=10)
            if r.status_code == 200:
                self.index.apply(worker, r.json())
        except httpx.HTTPError as e:  # down or restarting: the proxy's health check deals with that
            log.debug("KV report from %s failed: %r", worker, e)
        return True
