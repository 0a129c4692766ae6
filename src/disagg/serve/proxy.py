"""The proxy: one OpenAI-compatible endpoint in front of workers, in three modes.

- single / replicated: forward each request to a worker (streams event by event: serve/relay.py).
- disaggregated: the two-phase protocol. The request goes to a prefill worker with max_tokens=1
  and kv_transfer_params.do_remote_decode; its answer (token 1 and where the KV is held) goes with
  the original request to a decode worker, which pulls the KV and streams the rest. With
  --stream-first-token (our extension, on by default) the proxy sends token 1 to the client as
  soon as prefill answers and passes it to decode, so TTFT excludes the KV transfer; without it
  the decode worker recomputes the last prompt position, as vLLM's does, and the proxy can front
  vLLM workers.

With --kv-push the decode worker is chosen first and the prefill worker pushes the KV to it layer
by layer as it computes (kv/push.py); a push that cannot start or fails falls back to the pull.

Routing (serve/routing.py) is prefix-aware by default, from the block hashes workers report
(serve/kv_index.py), weighed against load. Conditional disaggregation: a request whose uncached
part is under --local-prefill-threshold tokens, or that comes when every prefill worker has
--prefill-queue-limit requests in flight, goes straight to a decode worker, which prefills it.

Failures (serve/breaker.py, serve/relay.py): every phase has a deadline (connect, prefill's
answer, a stream's first token, the gap between chunks, a whole answer); each worker has a circuit
breaker fed by /health probes and by requests, so a worker that hangs or dies is out of rotation
within seconds and what was in flight on it fails at once. A request whose worker fails moves:
a prefill to another prefill worker (or to a decode worker, which prefills itself), a stream to
another worker with the tokens already streamed, up to --migration-limit times; then the client
gets an error (502, or 504 for a deadline), never a hang.

Every worker picked for a client request is charged to its `Charges` (serve/routing.py), settled
where a phase ends and all swept when the client request ends, on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from disagg.serve.breaker import Prober, WorkerFailed
from disagg.serve.disconnect import unless_disconnected
from disagg.serve.guard import Guard, warn_if_open
from disagg.serve.kv_index import KVIndex, KVWatcher
from disagg.serve.kv_ports import KVPorts, Push
from disagg.serve.openapi import truthful_openapi
from disagg.serve.options import ProxyOptions
from disagg.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    max_tokens_of,
    new_id,
    refusal,
    sse,
)
from disagg.serve.relay import Mover, Opened
from disagg.serve.routing import Charges, Placement, RoutingPolicy, estimated_prompt_tokens, make_policy
from disagg.serve.upstream import ChargedStream, Upstream, UpstreamError, first_chunk, prepend_first, whole_answer

log = logging.getLogger("disagg.proxy")
disable_created_metrics()  # the *_created series only add noise to a scrape


class Proxy:
    def __init__(self, opts: ProxyOptions, policy: RoutingPolicy | None = None) -> None:
        self.opts = opts
        self.index = KVIndex()
        self.policy = policy or make_policy(opts.routing, self.index)
        self.registry = CollectorRegistry()
        self.routed = Counter("disagg_proxy_requests", "Requests by the path they took: forward (single, "
                              "replicated), remote_prefill, local_prefill (conditional disaggregation), push",
                              ["path"], registry=self.registry)
        self.migrations = Counter("disagg_proxy_migrations", "Times a request moved to another worker because its "
                                  "worker died, hung or failed it", registry=self.registry)
        Gauge("disagg_proxy_prefills_in_flight", "Prefill requests waiting on a prefill worker's answer",
              registry=self.registry).set_function(lambda: sum(self.up.prefilling.values()))
        # each phase is bounded by its own deadline (Upstream, Mover); the client's read timeout only
        # backs them up
        read = max(opts.timeout, opts.prefill_timeout, opts.first_token_timeout, opts.stream_idle_timeout)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read, connect=opts.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            headers={"Authorization": f"Bearer {opts.worker_api_key}"} if opts.worker_api_key else None)
        self.up = Upstream(self.client, self.pools(), opts)
        self.kv = KVPorts(self.client)
        self.watcher: KVWatcher | None = None
        self.prober = Prober(self.up.breaker, self.client, self.workers(), opts.health_interval, opts.health_timeout)

    def workers(self) -> list[str]:  # each once, in pool order
        return list(dict.fromkeys(w for pool in self.pools().values() for w in pool))

    async def start(self) -> None:
        self.prober.start()
        if self.opts.routing == "prefix" or self.opts.local_prefill_threshold:
            self.watcher = KVWatcher(self.index, self.client, self.workers())
            self.watcher.start()

    async def close(self) -> None:
        await self.prober.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.client.aclose()
        self.kv.close()

    def pools(self) -> dict[str, tuple[str, ...]]:
        o = self.opts
        return {"prefill": o.prefill, "decode": o.decode} if o.mode == "disaggregated" else {"workers": o.worker}

    async def handle(self, request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse(error_body("request body is not valid JSON"), status_code=400)
        except RecursionError:
            return JSONResponse(error_body("request body is nested too deeply"), status_code=400)
        if not isinstance(body, dict):
            return JSONResponse(error_body("request body must be a JSON object"), status_code=400)
        if refused := refusal(body, path.endswith("chat/completions")):
            return JSONResponse(error_body(refused), status_code=400)
        charges = Charges(self.policy, on_move=self.migrations.inc)
        try:
            # a client that leaves before it is answered cancels the work (the workers see the proxy's
            # connections close and abort theirs); a stream it leaves later ends as streams do
            answered, response = await unless_disconnected(request, self._route(charges, request, path, body))
        except (UpstreamError, WorkerFailed) as e:
            answered, response = True, JSONResponse(e.body, status_code=e.status, headers=e.headers)
        except BaseException:
            charges.sweep()
            raise
        if not answered:
            response = Response(status_code=499)
        if not isinstance(response, ChargedStream):  # a stream sweeps once it has been sent
            charges.sweep()
        return response

    async def _route(self, charges: Charges, request: Request, path: str, body: dict[str, Any]) -> Response:
        chat = path.endswith("chat/completions")
        if self.opts.mode == "disaggregated" and max_tokens_of(body, chat) != 1:
            if local := self._local_decode(charges, body):
                self.routed.labels("local_prefill").inc()
                return await self._forward(charges, "decode", path, body, only=local)
            if self.opts.kv_push:
                self.routed.labels("push").inc()
                return await self._two_phase_push(charges, request, path, body)
            self.routed.labels("remote_prefill").inc()
            return await self._two_phase(charges, request, path, body)
        self.routed.labels("forward").inc()
        pool = "prefill" if self.opts.mode == "disaggregated" else "workers"
        return await self._forward(charges, pool, path, body)

    def _local_decode(self, charges: Charges, body: dict[str, Any]) -> Placement | None:
        """Conditional disaggregation: the decode worker that should prefill this request itself, or
        None when remote prefill pays. The uncached part is judged on the decode worker that holds
        most of the prompt, and that is the worker the request then goes to."""
        o = self.opts
        decodes = self.up.healthy(o.decode)
        prefills = self.up.healthy(o.prefill)
        if o.prefill_queue_limit and all(self.up.prefilling.get(w, 0) >= o.prefill_queue_limit for w in prefills):
            return charges.select("decode", decodes, body)
        if not o.local_prefill_threshold:
            return None
        prompt = self.index.prompt(body, decodes)
        if prompt is None:  # workers that do not report: the proxy's estimate of the prompt, all of it uncached
            if estimated_prompt_tokens(body) >= o.local_prefill_threshold:
                return None
            return charges.select("decode", decodes, body)
        ids, hashes, block_size = prompt
        best = max(decodes, key=lambda w: self.index.matched(w, hashes))
        if len(ids) - self.index.matched(best, hashes) * block_size >= o.local_prefill_threshold:
            return None
        return charges.select("decode", [best], body)  # the policy still counts it

    def _mover(self, charges: Charges, path: str, body: dict[str, Any], first: str,
               generated: list[int] | None = None, kvp: dict[str, Any] | None = None) -> Mover:
        """How this request moves when its worker fails: within its pool, then (disaggregated) to
        the other kind of worker; a prefill worker's KV held for it is released on the move."""
        if self.opts.mode != "disaggregated":
            pools: tuple[str, ...] = ("workers",)
        else:
            pools = ("decode", "prefill") if first == "decode" else ("prefill", "decode")
        return Mover(self.up, charges, path, body, pools, generated,
                     on_leave=(lambda: self.kv.release(kvp)) if kvp is not None else None)

    async def _forward(self, charges: Charges, pool: str, path: str, body: dict[str, Any],
                       only: Placement | None = None) -> Response:
        stream = bool(body.get("stream"))
        mover = self._mover(charges, path, body, pool)
        send = body | {"return_token_ids": True} if stream else body  # ids let a stream move (serve/relay.py)
        opened = functools.partial(self.up.open, charges, pool, path, send, stream, only=only)
        if stream:
            return ChargedStream(mover.stream(opened), charges)
        return Response((await mover.whole(opened)).content, media_type="application/json")

    async def _prefill(self, charges: Charges, path: str, body: dict[str, Any],
                       kvp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Phase one: token 1 and the prefill's kv_transfer_params (None when token 1 ended it). A
        prefill worker that fails is replaced by another while moves are left (WorkerFailed, or a
        503 when every prefill worker is at its limits, for the caller to prefill on decode)."""
        pre_body = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
        # the decode's token limit goes along, so that a prompt that cannot fit it fails here, not
        # after its prefill (a vLLM prefill worker ignores the field)
        limit = max_tokens_of(body, path.endswith("chat/completions"))
        kvp = {"do_remote_decode": True} | ({"decode_max_tokens": limit} if limit is not None else {}) | kvp
        pre_body |= {"max_tokens": 1, "stream": False, "kv_transfer_params": kvp}
        failed: set[str] = set()
        while True:
            try:
                placed, resp = await self.up.open(charges, "prefill", path, pre_body, stream=False, exclude=failed)
                break
            except WorkerFailed as e:
                failed.add(e.worker)
                if charges.migrations >= self.opts.migration_limit or not set(self.opts.prefill) - failed:
                    raise
                charges.move()
                log.warning("%s; prefill moves to another prefill worker", e)
        placed.settle()  # prefill has answered: its part is over
        pre = resp.json()
        return pre, pre.pop("kv_transfer_params", None)

    async def _two_phase(self, charges: Charges, request: Request, path: str, body: dict[str, Any]) -> Response:
        try:
            pre, kvp = await self._prefill(charges, path, body, {})
        except (WorkerFailed, UpstreamError) as e:
            if isinstance(e, UpstreamError) and e.status not in (502, 503):  # the request's own fault
                raise
            if isinstance(e, WorkerFailed):  # a prefill worker had it and failed: that is a move
                if charges.migrations >= self.opts.migration_limit:
                    raise
                charges.move()
            log.warning("no prefill worker could take it (%s); the decode worker prefills it", e)
            self.routed.labels("local_prefill").inc()
            return await self._forward(charges, "decode", path, body)
        return await self._decode_phase(charges, request, path, body, pre, kvp)

    async def _decode_phase(self, charges: Charges, request: Request, path: str, body: dict[str, Any],
                            pre: dict[str, Any], kvp: dict[str, Any] | None) -> Response:
        """Phase two, pulling: the decode worker fetches the KV the prefill answer points to."""
        chat = path.endswith("chat/completions")
        if kvp is None:  # token 1 already ended the request (a stop token): that is the answer
            return whole_answer(pre, chat, body)
        if await request.is_disconnected():
            await self.kv.release(kvp)
            return Response(status_code=499)
        first = self.opts.stream_first_token
        if not first:
            kvp = {k: v for k, v in kvp.items() if k != "first_token_ids"}
        stream = bool(body.get("stream"))
        dec_body = body | {"kv_transfer_params": kvp} | ({"return_token_ids": True} if stream else {})
        mover = self._mover(charges, path, body, "decode", kvp.get("first_token_ids") if first else None, kvp)
        opened = functools.partial(self.up.open, charges, "decode", path, dec_body, stream)
        if stream:
            # with token 1 from prefill, it goes out now; decode (KV pull included) runs while the client reads it
            return ChargedStream(self._then(mover, opened, first_chunk(pre, chat) if first else None), charges)
        try:
            answer = (await mover.whole(opened)).json()
        except UpstreamError:
            await self.kv.release(kvp)
            raise
        if first:
            prepend_first(answer, pre, chat)
        return JSONResponse(answer)

    async def _two_phase_push(self, charges: Charges, request: Request, path: str, body: dict[str, Any]) -> Response:
        """Decode worker first, waiting for a push; then prefill, pushing to it as it computes."""
        decodes = self.opts.decode
        placed = charges.select("decode", self.up.healthy(decodes), body)
        try:
            address = await self.kv.address(placed.worker)
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            log.warning("no KV port known for %s (%r); pulling instead", placed.worker, e)
            placed.settle()  # not used: the pull places the request afresh
            return await self._two_phase(charges, request, path, body)
        push_id = new_id("push")
        stream = bool(body.get("stream"))
        dec_body = body | {"kv_transfer_params": {"do_remote_prefill": True, "push_id": push_id}} | (
            {"return_token_ids": True} if stream else {})
        push = Push(placed, address, push_id, asyncio.create_task(
            self.up.open(charges, "decode", path, dec_body, stream, only=placed)))
        try:
            pre, kvp = await self._prefill(charges, path, body, {"push_id": push_id, "push_host": address[0],
                                                                 "push_port": address[1]})
        except (WorkerFailed, UpstreamError) as e:
            await self.kv.cancel(push)
            placed.settle()
            if isinstance(e, UpstreamError) and e.status not in (502, 503):
                raise
            log.warning("the pushing prefill failed (%s); pulling instead", e)
            return await self._two_phase(charges, request, path, body)
        except BaseException:
            await self.kv.cancel(push)
            raise
        if kvp is None or kvp.get("push_id") != push_id:  # no push started: decode must not wait for one
            await self.kv.reread(push)
            await self.kv.cancel(push)
            placed.settle()
            return await self._decode_phase(charges, request, path, body, pre, kvp)
        return await self._pushed(charges, request, path, body, pre, kvp, push)

    async def _pushed(self, charges: Charges, request: Request, path: str, body: dict[str, Any],
                      pre: dict[str, Any], kvp: dict[str, Any], push: Push) -> Response:
        """Phase two of a push that started: decode's answer, or a pull where the push failed."""
        chat, stream = path.endswith("chat/completions"), bool(body.get("stream"))
        pull_body = body | {"kv_transfer_params": kvp} | ({"return_token_ids": True} if stream else {})

        async def decoded() -> Opened:
            try:
                return await push.waiting
            except (UpstreamError, WorkerFailed) as e:
                log.warning("KV push to %s failed (%s); pulling instead", push.placed.worker, e)
                await self.kv.reread(push)
                failed = {push.placed.worker} if isinstance(e, WorkerFailed) else set()
                return await self.up.open(charges, "decode", path, pull_body, stream, exclude=failed)

        if await request.is_disconnected():
            await self.kv.cancel(push)
            await self.kv.release(kvp)
            return Response(status_code=499)
        mover = self._mover(charges, path, body, "decode", kvp.get("first_token_ids"), kvp)
        if stream:
            return ChargedStream(self._then(mover, decoded, first_chunk(pre, chat)), charges)
        try:
            answer = (await mover.whole(decoded)).json()
        except UpstreamError:
            await self.kv.release(kvp)
            raise
        prepend_first(answer, pre, chat)
        return JSONResponse(answer)

    async def _then(self, mover: Mover, open_decode: Callable[[], Awaitable[Opened]],
                    first: dict[str, Any] | None) -> AsyncIterator[bytes]:
        """Token 1 from prefill (when given), then the decode stream, wherever it moves."""
        if first is not None:
            mover.first_id, mover.role_sent = (first["id"], first["created"]), True
            yield sse(first)
        async for chunk in mover.stream(open_decode):
            yield chunk


def create_app(proxy: Proxy) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.close()

    app = FastAPI(title="disagg proxy", lifespan=lifespan)
    app.add_middleware(Guard, api_key=proxy.opts.api_key)
    truthful_openapi(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "mode": proxy.opts.mode, "pools": proxy.pools(), "routing": proxy.opts.routing,
                "kv_index": proxy.index.summary(), "load": proxy.policy.outstanding(),
                "workers": proxy.up.breaker.summary()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        for pool in proxy.pools().values():
            for url in pool:
                with contextlib.suppress(httpx.HTTPError):
                    r = await proxy.client.get(url + "/v1/models", timeout=proxy.opts.health_timeout)
                    return Response(r.content, status_code=r.status_code, media_type="application/json")
        return JSONResponse(error_body("no worker is reachable", "bad_gateway", 502), status_code=502)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy.handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await proxy.handle(request, "/v1/chat/completions")

    return app


def run_proxy(opts: ProxyOptions) -> None:
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warn_if_open(opts.host, opts.api_key, "the proxy")
    uvicorn.run(create_app(Proxy(opts)), host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5)
