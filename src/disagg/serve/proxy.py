"""The proxy: one OpenAI-compatible endpoint in front of workers, in three modes.

- single / replicated: forward each request to a worker (round-robin), streams passed through
  byte for byte.
- disaggregated: the two-phase protocol. The request goes to a prefill worker with max_tokens=1
  and kv_transfer_params.do_remote_decode; its answer (token 1 and where the KV is held) goes with
  the original request to a decode worker, which pulls the KV and streams the rest. With
  --stream-first-token (our extension, on by default) the proxy sends token 1 to the client as
  soon as prefill answers and passes it to decode, so TTFT excludes the KV transfer; without it
  the decode worker recomputes the last prompt position, as vLLM's does, and the proxy can front
  vLLM workers.

With --kv-push the decode worker is chosen first and the prefill worker pushes the KV to it layer by
layer while it computes (kv/push.py); token 1 still comes from prefill. If the push cannot start
or fails, the decode request is cancelled or fails and the proxy falls back to the pull above.

Routing (serve/routing.py) is prefix-aware by default: the proxy follows the block hashes each
worker reports (serve/kv_index.py) and sends a request where most of its prompt is cached, weighed
against load. Conditional disaggregation: a request whose uncached prompt part is shorter than
--local-prefill-threshold tokens, or that arrives when every prefill worker has
--prefill-queue-limit requests in flight, goes straight to a decode worker, which prefills it
itself (no KV moves). /metrics counts requests by the path they took.

A worker that refuses connections is skipped for a few seconds and the request goes to the next
one; a worker that dies mid-stream ends the client's stream with an error event, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from disagg.kv.tcp import KVClient, KVTransferError
from disagg.serve.kv_index import KVIndex, KVWatcher
from disagg.serve.options import ProxyOptions
from disagg.serve.protocol import SSE_DONE, error_body, new_id, now, sse, stream_chunk, usage_chunk
from disagg.serve.routing import RoutingPolicy, WorkerHealth, estimated_prompt_tokens, make_policy

log = logging.getLogger("disagg.proxy")
disable_created_metrics()  # the *_created series only add noise to a scrape


class UpstreamError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", {}).get("message", "upstream error"))
        self.status, self.body = status, body


class Proxy:
    def __init__(self, opts: ProxyOptions, policy: RoutingPolicy | None = None) -> None:
        self.opts = opts
        self.index = KVIndex()
        self.policy = policy or make_policy(opts.routing, self.index)
        self.health = WorkerHealth()
        self.prefilling: dict[str, int] = {}  # prefill worker -> requests in flight
        self.registry = CollectorRegistry()
        self.routed = Counter("disagg_proxy_requests", "Requests by the path they took: forward (single, "
                              "replicated), remote_prefill, local_prefill (conditional disaggregation), push",
                              ["path"], registry=self.registry)
        Gauge("disagg_proxy_prefills_in_flight", "Prefill requests waiting on a prefill worker's answer",
              registry=self.registry).set_function(lambda: sum(self.prefilling.values()))
        self.kv_client = KVClient()
        self._kv_addresses: dict[str, tuple[str, int]] = {}  # decode URL -> its KV port, for pushes
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout, connect=5.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.watcher: KVWatcher | None = None

    async def start(self) -> None:
        if self.opts.routing == "prefix" or self.opts.local_prefill_threshold:
            self.watcher = KVWatcher(self.index, self.client, [w for pool in self.pools().values() for w in pool])
            self.watcher.start()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.client.aclose()

    def pools(self) -> dict[str, tuple[str, ...]]:
        if self.opts.mode == "disaggregated":
            return {"prefill": self.opts.prefill, "decode": self.opts.decode}
        return {"workers": self.opts.worker}

    # ---- sending ----

    async def _open(self, pool: str, path: str, body: dict[str, Any], stream: bool,
                    only: str | None = None, inflight: dict[str, int] | None = None) -> tuple[str, httpx.Response]:
        """Send to a worker of `pool` (or just `only`), moving on to the next one while connections
        are refused. `inflight` counts, per worker, the requests waiting on their answer."""
        workers = (only,) if only else self.pools()[pool]
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.health.healthy(workers) if w not in tried] or [
                w for w in workers if w not in tried]
            if not candidates:
                kind = "" if pool == "workers" else f"{pool} "
                raise UpstreamError(502, error_body(f"no {kind}worker is reachable ({', '.join(workers)})",
                                                    "bad_gateway", 502))
            url = only if only else self.policy.select(pool, candidates, body)  # `only`: selected already
            tried.add(url)
            if inflight is not None:
                inflight[url] = inflight.get(url, 0) + 1
            try:
                req = self.client.build_request("POST", url + path, json=body)
                resp = await self.client.send(req, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                log.warning("worker %s unreachable: %s", url, e)
                self.health.mark_down(url)
                self.policy.on_complete(url, body)
                continue
            except BaseException as e:
                self.policy.on_complete(url, body)
                if isinstance(e, httpx.HTTPError):
                    raise UpstreamError(502, error_body(f"worker {url} failed: {e!r}", "bad_gateway", 502)) from e
                raise
            finally:
                if inflight is not None:
                    inflight[url] -= 1
            self.health.mark_up(url)
            if resp.status_code != 200:
                self.policy.on_complete(url, body)
                data = (await resp.aread()) if stream else resp.content
                await resp.aclose()
                try:
                    err = json.loads(data)
                except ValueError:
                    err = error_body(f"worker {url} answered {resp.status_code}", "bad_gateway", 502)
                raise UpstreamError(resp.status_code, err)
            return url, resp

    async def _passthrough(self, url: str, resp: httpx.Response, body: dict[str, Any]) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            log.warning("worker %s failed mid-stream: %r", url, e)
            yield sse(error_body(f"worker {url} failed mid-stream: {e!r}", "bad_gateway", 502))
            yield SSE_DONE
        finally:
            await resp.aclose()
            self.policy.on_complete(url, body)

    # ---- modes ----

    async def handle(self, request: Request, path: str) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse(error_body("request body is not valid JSON"), status_code=400)
        if not isinstance(body, dict):
            return JSONResponse(error_body("request body must be a JSON object"), status_code=400)
        try:
            if self.opts.mode == "disaggregated" and body.get("max_tokens", body.get("max_completion_tokens")) != 1:
                if local := self._local_decode(body):
                    self.routed.labels("local_prefill").inc()
                    return await self._forward("decode", path, body, only=local)
                if self.opts.kv_push:
                    self.routed.labels("push").inc()
                    return await self._two_phase_push(request, path, body)
                self.routed.labels("remote_prefill").inc()
                return await self._two_phase(request, path, body)
            self.routed.labels("forward").inc()
            pool = "prefill" if self.opts.mode == "disaggregated" else "workers"
            return await self._forward(pool, path, body)
        except UpstreamError as e:
            return JSONResponse(e.body, status_code=e.status)

    def _local_decode(self, body: dict[str, Any]) -> str | None:
        """Conditional disaggregation: the decode worker that should prefill this request itself, or
        None when remote prefill pays. The uncached part is judged on the decode worker that holds
        most of the prompt, and that is the worker the request then goes to."""
        o = self.opts
        decodes = self.health.healthy(o.decode) or list(o.decode)
        prefills = self.health.healthy(o.prefill) or list(o.prefill)
        if o.prefill_queue_limit and all(self.prefilling.get(w, 0) >= o.prefill_queue_limit for w in prefills):
            return self.policy.select("decode", decodes, body)
        if not o.local_prefill_threshold:
            return None
        prompt = self.index.prompt(body, decodes)
        if prompt is None:  # workers that do not report: the proxy's estimate of the prompt, all of it uncached
            if estimated_prompt_tokens(body) >= o.local_prefill_threshold:
                return None
            return self.policy.select("decode", decodes, body)
        ids, hashes, block_size = prompt
        best = max(decodes, key=lambda w: self.index.matched(w, hashes))
        if len(ids) - self.index.matched(best, hashes) * block_size >= o.local_prefill_threshold:
            return None
        return self.policy.select("decode", [best], body)  # the policy still counts it

    async def _forward(self, pool: str, path: str, body: dict[str, Any], only: str | None = None) -> Response:
        stream = bool(body.get("stream"))
        url, resp = await self._open(pool, path, body, stream, only=only)
        if stream:
            return StreamingResponse(self._passthrough(url, resp, body), media_type="text/event-stream")
        self.policy.on_complete(url, body)
        return Response(resp.content, media_type="application/json")

    async def _prefill(self, path: str, body: dict[str, Any],
                       kvp: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Phase one: token 1 and the prefill's kv_transfer_params (None when token 1 ended it)."""
        pre_body = {k: v for k, v in body.items() if k not in ("stream_options", "max_completion_tokens")}
        pre_body |= {"max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True} | kvp}
        prefill_url, resp = await self._open("prefill", path, pre_body, stream=False, inflight=self.prefilling)
        self.policy.on_complete(prefill_url, pre_body)
        pre = resp.json()
        return pre, pre.pop("kv_transfer_params", None)

    async def _two_phase(self, request: Request, path: str, body: dict[str, Any]) -> Response:
        pre, kvp = await self._prefill(path, body, {})
        return await self._decode_phase(request, path, body, pre, kvp)

    async def _decode_phase(self, request: Request, path: str, body: dict[str, Any], pre: dict[str, Any],
                            kvp: dict[str, Any] | None) -> Response:
        """Phase two, pulling: the decode worker fetches the KV the prefill answer points to."""
        chat = path.endswith("chat/completions")
        if kvp is None:  # token 1 already ended the request (a stop token): that is the answer
            return self._as_client_answer(pre, chat, bool(body.get("stream")), body)
        if await request.is_disconnected():
            await self._release(kvp)
            return Response(status_code=499)
        first_text = _choice_text(pre, chat)
        if not self.opts.stream_first_token:
            kvp = {k: v for k, v in kvp.items() if k != "first_token_ids"}
        dec_body = body | {"kv_transfer_params": kvp}
        stream = bool(body.get("stream"))
        if stream and self.opts.stream_first_token:
            # token 1 goes out now; decode (KV pull included) runs while the client reads it
            return StreamingResponse(self._first_then_decode(
                lambda: self._open("decode", path, dec_body, stream=True), dec_body, kvp,
                _first_chunk(pre, first_text, chat)), media_type="text/event-stream")
        try:
            decode_url, dresp = await self._open("decode", path, dec_body, stream)
        except UpstreamError:
            await self._release(kvp)
            raise
        if stream:
            return StreamingResponse(self._passthrough(decode_url, dresp, dec_body), media_type="text/event-stream")
        self.policy.on_complete(decode_url, dec_body)
        answer = dresp.json()
        if self.opts.stream_first_token:
            _prepend_text(answer, pre, first_text, chat)
        return JSONResponse(answer)

    async def _two_phase_push(self, request: Request, path: str, body: dict[str, Any]) -> Response:
        """Decode worker first, waiting for a push; then prefill, pushing to it as it computes."""
        decodes = self.opts.decode
        decode_url = self.policy.select("decode", self.health.healthy(decodes) or list(decodes), body)
        try:
            host, port = await self._kv_address(decode_url)
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            log.warning("no KV port known for %s (%r); pulling instead", decode_url, e)
            return await self._two_phase(request, path, body)
        push_id = new_id("push")
        stream = bool(body.get("stream"))
        dec_body = body | {"kv_transfer_params": {"do_remote_prefill": True, "push_id": push_id}}
        waiting = asyncio.create_task(self._open("decode", path, dec_body, stream, only=decode_url))
        try:
            pre, kvp = await self._prefill(path, body, {"push_id": push_id, "push_host": host, "push_port": port})
        except BaseException:
            await self._cancel_push(host, port, push_id, waiting)
            raise
        if kvp is None or kvp.get("push_id") != push_id:  # no push started: decode must not wait for one
            await self._cancel_push(host, port, push_id, waiting)
            return await self._decode_phase(request, path, body, pre, kvp)
        # from here `waiting` owns the decode's routing charge: passthrough or _open settle it
        chat = path.endswith("chat/completions")
        pull_body = body | {"kv_transfer_params": kvp}

        async def decoded() -> tuple[str, httpx.Response]:
            try:
                return await waiting
            except UpstreamError as e:
                log.warning("KV push to %s failed (%s); pulling instead", decode_url, e)
                return await self._open("decode", path, pull_body, stream)

        if await request.is_disconnected():
            await self._cancel_push(host, port, push_id, waiting)
            await self._release(kvp)
            return Response(status_code=499)
        first_text = _choice_text(pre, chat)
        if stream:
            return StreamingResponse(self._first_then_decode(decoded, dec_body, kvp,
                                                             _first_chunk(pre, first_text, chat)),
                                     media_type="text/event-stream")
        try:
            decode_url, dresp = await decoded()
        except UpstreamError:
            await self._release(kvp)
            raise
        self.policy.on_complete(decode_url, dec_body)
        answer = dresp.json()
        _prepend_text(answer, pre, first_text, chat)
        return JSONResponse(answer)

    async def _kv_address(self, url: str) -> tuple[str, int]:
        if url not in self._kv_addresses:
            health = (await self.client.get(url + "/health", timeout=5)).json()
            self._kv_addresses[url] = (str(health["kv_host"]), int(health["kv_port"]))
        return self._kv_addresses[url]

    async def _cancel_push(self, host: str, port: int, push_id: str, waiting: asyncio.Task[Any]) -> None:
        with contextlib.suppress(KVTransferError):
            await self.kv_client.cancel_push(host, port, push_id)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)

    async def _first_then_decode(self, open_decode: Callable[[], Awaitable[tuple[str, httpx.Response]]],
                                 dec_body: dict[str, Any], kvp: dict[str, Any],
                                 first: dict[str, Any]) -> AsyncIterator[bytes]:
        yield sse(first)
        try:
            decode_url, dresp = await open_decode()
        except UpstreamError as e:
            await self._release(kvp)
            yield sse(e.body)
            yield SSE_DONE
            return
        async for chunk in self._passthrough(decode_url, dresp, dec_body):
            yield chunk

    async def _release(self, kvp: dict[str, Any]) -> None:
        with contextlib.suppress(KVTransferError, KeyError, TypeError):
            await self.kv_client.release(kvp["remote_host"], kvp["remote_port"], kvp["remote_request_id"])

    def _as_client_answer(self, pre: dict[str, Any], chat: bool, stream: bool, body: dict[str, Any]) -> Response:
        if not stream:
            return JSONResponse(pre)
        chunk = _first_chunk(pre, _choice_text(pre, chat), chat)
        chunk["choices"][0]["finish_reason"] = pre["choices"][0].get("finish_reason")
        parts = [sse(chunk)]
        if (body.get("stream_options") or {}).get("include_usage"):
            parts.append(sse(usage_chunk(chunk["id"], chunk["created"], chunk["model"], chat, pre.get("usage"))))
        parts.append(SSE_DONE)
        return Response(b"".join(parts), media_type="text/event-stream")


def _choice_text(resp: dict[str, Any], chat: bool) -> str:
    choice = resp["choices"][0]
    return choice["message"]["content"] if chat else choice["text"]


def _first_chunk(pre: dict[str, Any], text: str, chat: bool) -> dict[str, Any]:
    choice = pre["choices"][0]
    return stream_chunk(pre.get("id", new_id("cmpl")), pre.get("created", now()), pre.get("model"), chat, text,
                        role=True, token_ids=choice.get("token_ids"),
                        prompt_token_ids=pre.get("prompt_token_ids", choice.get("prompt_token_ids")))


def _prepend_text(answer: dict[str, Any], pre: dict[str, Any], text: str, chat: bool) -> None:
    """Token 1 (from prefill) goes before what decode generated: its text, and its id if asked for."""
    choice = answer["choices"][0]
    if chat:
        choice["message"]["content"] = text + (choice["message"].get("content") or "")
    else:
        choice["text"] = text + choice["text"]
    first_ids = pre["choices"][0].get("token_ids")
    if first_ids is not None and "token_ids" in choice:
        choice["token_ids"] = first_ids + choice["token_ids"]


def create_app(proxy: Proxy) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        yield
        await proxy.close()

    app = FastAPI(title="disagg proxy", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "mode": proxy.opts.mode, "pools": proxy.pools(), "routing": proxy.opts.routing,
                "kv_index": proxy.index.summary()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        for pool in proxy.pools().values():
            for url in pool:
                with contextlib.suppress(httpx.HTTPError):
                    r = await proxy.client.get(url + "/v1/models")
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
    uvicorn.run(create_app(Proxy(opts)), host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5)
