"""The worker: one engine behind an OpenAI-compatible HTTP API, in one of three roles.

- both: an ordinary server.
- prefill: a request with kv_transfer_params.do_remote_decode computes the prompt and token 1 and
  answers with where its KV is held (vLLM's protocol); or pushes it, layer by layer, to the decode
  worker the request names.
- decode: a request with kv_transfer_params.do_remote_prefill loads the prompt's KV (the part it
  lacks) from the prefill worker and continues; if the KV cannot be had it recomputes.

All of that is the engine's KV connector's business (engine/connector), configured here from the
worker's options and serving the worker's KV port. The worker itself is HTTP and formatting: it
reads a request into one typed `EngineRequest`, hands it to the engine, and streams what comes
back. Any role serves ordinary requests too. /health is 503 until the model has loaded, and
while the engine has work and has finished no step for --stall-timeout seconds. A worker whose
engine died exits (after answering its open requests), so that its supervisor (`disagg up`,
systemd, Kubernetes) starts a fresh one; a worker that keeps running with a dead engine only
answers 503. With --api-key, every route but /health and /metrics needs the key (serve/guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from disagg.engine.async_engine import AsyncEngine, EngineDeadError, EngineRequest
from disagg.engine.config import EngineConfig
from disagg.engine.connector.factory import WorkerConnector, make_connector
from disagg.engine.llm_engine import LLMEngine, RequestOutput
from disagg.errors import DisaggError, ModelNotFoundError
from disagg.serve.disconnect import unless_disconnected
from disagg.serve.formatting import Formatter, error_response
from disagg.serve.guard import Guard, warn_if_open
from disagg.serve.metrics import WorkerMetrics
from disagg.serve.openapi import truthful_openapi
from disagg.serve.options import ServeOptions
from disagg.serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    sse,
    validation_message,
)

log = logging.getLogger("disagg.worker")

_EMPTY_STATS = dict.fromkeys(("running", "waiting", "held", "kv_blocks_used", "kv_blocks_total",
                              "prefix_cache_hits", "preemptions"), 0)


class EngineNotReady(DisaggError):
    http_status = 503
    error_type = "service_unavailable"


class Worker:
    def __init__(self, engine_config: EngineConfig, opts: ServeOptions) -> None:
        self.engine_config, self.opts = engine_config, opts
        self.model_name = opts.served_model_name or engine_config.model
        self.engine: AsyncEngine | None = None
        self.kv: WorkerConnector | None = None  # the engine's KV connector, as configured here
        self.load_error: BaseException | None = None
        self.metrics = WorkerMetrics(lambda: self.engine.stats() if self.engine else _EMPTY_STATS)
        self._loading: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.died = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loading = asyncio.create_task(self._load())

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        if self.engine is not None:
            self.engine.shutdown()
        elif self.kv is not None:
            self.kv.close()

    async def _load(self) -> None:
        cfg = self.opts.kv_connector()

        def connector(engine: LLMEngine) -> WorkerConnector:
            self.kv = make_connector(engine, cfg, self.metrics)
            return self.kv

        try:
            shared = self.opts.kv_transport == "shm" and self.opts.role != "decode"  # decode workers are not read
            engine = await asyncio.to_thread(LLMEngine, self.engine_config, connector, shared)
            self.metrics.watch_pool(self.kv.tiers)
            self.engine = AsyncEngine(engine, on_dead=self._engine_died)
            log.warning("worker ready: %s, role %s, http %s:%d, kv port %s (%s)", self.model_name, self.opts.role,
                        self.opts.host, self.opts.port, self.kv.port.address, self.opts.link().describe())
        except BaseException as e:
            self.load_error = e
            log.error("model failed to load: %s", e)

    def _engine_died(self, error: BaseException) -> None:
        """On the engine thread: its open requests have their error; stop the server (it answers
        them first), so that a supervisor starts a fresh worker rather than one that 503s for ever."""
        log.error("the engine died (%r): this worker exits so that its supervisor restarts it", error)
        self.died = True
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(loop.call_later, 0.5, os.kill, os.getpid(), signal.SIGTERM)

    def check_health(self) -> None:
        """EngineNotReady unless the engine is loaded, alive and making progress."""
        engine = self.ready_engine()
        stalled = engine.stalled_for()
        if stalled > self.opts.stall_timeout:
            raise EngineNotReady(f"the engine has finished no step for {stalled:.0f} s with requests waiting "
                                 f"(--stall-timeout {self.opts.stall_timeout:g})")

    def ready_engine(self) -> AsyncEngine:
        if self.engine is None or not self.engine.alive:
            raise EngineNotReady("the model is still loading" if self.load_error is None and self.engine is None
                                 else f"the engine is down: {self.load_error or self.engine.error}")
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(f"the model `{name}` does not exist; this worker serves `{self.model_name}`")

    async def handle(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
        engine = self.ready_engine()
        self.check_model(req.model)
        prompt = engine.tokenizer.apply_chat_template(req.chat_messages()) if chat else req.prompt
        request = EngineRequest(new_id("chatcmpl" if chat else "cmpl"), prompt, req.sampling_params(),
                                req.kv_transfer_params)
        t0 = time.perf_counter()
        stream = engine.generate(request)
        first = await anext(stream)  # bad input raises here, before any byte is sent
        kvp = req.kv_transfer_params
        # a decode worker given token 1 streams after the proxy, which already sent the prompt's ids
        prompt_ids = first.prompt_token_ids if req.return_token_ids and not (
            kvp is not None and kvp.first_token_ids and req.stream) else None
        fmt = Formatter(engine.tokenizer, request.request_id, self.model_name, chat, request.params, prompt_ids,
                        token_ids=req.return_token_ids)
        if req.stream:
            return StreamingResponse(self._sse(fmt, first, stream, t0, req.include_usage),
                                     media_type="text/event-stream")
        outs = [first] + [o async for o in stream]
        self._record(outs[-1], t0, fmt.first_time)
        return JSONResponse(fmt.whole(outs, kv_transfer_params=outs[-1].kv_transfer_params))

    async def _sse(self, fmt: Formatter, first: RequestOutput, stream: AsyncIterator[RequestOutput], t0: float,
                   include_usage: bool) -> AsyncIterator[bytes]:
        last = first
        try:
            async with contextlib.aclosing(stream):
                yield sse(fmt.chunk(first))
                async for out in stream:
                    last = out
                    yield sse(fmt.chunk(out))
            self._record(last, t0, fmt.first_time)
            if include_usage:
                yield sse(fmt.usage_chunk(last))
        except EngineDeadError as e:
            self.metrics.errors.labels("503").inc()
            yield sse(error_body(str(e), "engine_dead", 503))
        except DisaggError as e:  # this request failed mid-stream (its KV, the model): the others go on
            self.metrics.errors.labels(str(e.http_status)).inc()
            yield sse(error_body(str(e), e.error_type, e.http_status))
        yield SSE_DONE

    def _record(self, last: RequestOutput, t0: float, first_time: float | None) -> None:
        m = self.metrics
        m.requests.labels(last.finish_reason or "unknown").inc()
        m.prompt_tokens.inc(last.num_prompt_tokens)
        m.generation_tokens.inc(last.num_output_tokens)
        if first_time is not None:
            m.ttft.observe(first_time - t0)
            if last.num_output_tokens > 1:
                m.tpot.observe((time.perf_counter() - first_time) / (last.num_output_tokens - 1))

    def health(self) -> dict[str, Any]:
        address = self.kv.port.address
        return {"status": "ok", "role": self.opts.role, "kv_host": address.host, "kv_port": address.port,
                "kv_link": self.opts.link().describe()}

    async def kv_events(self, since: int, epoch: str) -> dict[str, Any]:
        """Prefix-cache changes after event `since` of this engine (`epoch`); a snapshot of the whole
        cache when the reader is new, fell behind, or follows an engine that has since restarted."""
        engine = self.ready_engine()
        this = engine.info()["engine_id"]
        events = engine.kv_events(since) if epoch == this and since >= 0 else None
        if events is not None:
            return {"epoch": this, "number": events[-1][0] if events else since,
                    "events": [[int(stored), h.hex()] for _, stored, h in events]}
        number, held = await engine.kv_snapshot()
        return {"epoch": this, "number": number, "snapshot": [h.hex() for h in held]}


def create_app(worker: Worker) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="disagg worker", lifespan=lifespan)
    app.add_middleware(Guard, api_key=worker.opts.api_key)
    truthful_openapi(app)

    @app.exception_handler(DisaggError)
    async def _disagg_error(request: Request, exc: DisaggError) -> JSONResponse:
        worker.metrics.errors.labels(str(exc.http_status)).inc()
        response = error_response(exc.http_status, str(exc), exc.error_type)
        if retry_after := getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        worker.metrics.errors.labels("400").inc()
        return error_response(400, validation_message(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own (an unreadable body, an unknown route or method), as OpenAI error objects too
        worker.metrics.errors.labels(str(exc.status_code)).inc()
        kind = "invalid_request_error" if exc.status_code == 400 else "not_found_error" if exc.status_code == 404 \
            else "api_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        worker.metrics.errors.labels("503").inc()
        return error_response(503, str(exc), "service_unavailable")

    @app.get("/health")
    async def health() -> Response:
        try:
            worker.check_health()
        except EngineNotReady as e:
            return error_response(503, str(e), "service_unavailable")
        return JSONResponse(worker.health())

    @app.get("/kv/tokenizer")
    async def kv_tokenizer() -> Response:
        """How to turn a request into this worker's block hashes (serve/kv_index.py)."""
        engine = worker.ready_engine()
        info = engine.info()
        return JSONResponse({"model": worker.model_name, "model_id": info["model_id"],
                             "block_size": info["block_size"], "tokenizer": engine.tokenizer.to_dict()})

    @app.get("/kv/events")
    async def kv_events(since: int = -1, epoch: str = "") -> Response:
        return JSONResponse(await worker.kv_events(since, epoch))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = worker.engine.info() if worker.engine else {}
        return {"object": "list", "data": [{
            "id": worker.model_name, "object": "model", "created": now(), "owned_by": "disagg",
            "max_model_len": info.get("max_model_len"), "vocab_size": info.get("vocab_size")}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def answer(request: Request, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
        answered, response = await unless_disconnected(request, worker.handle(req, chat))
        return response if answered else Response(status_code=499)  # the client left: its request was aborted

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Response:
        return await answer(request, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatCompletionRequest) -> Response:
        return await answer(request, req, chat=True)

    return app


def serve(engine_config: EngineConfig, opts: ServeOptions) -> None:
    """Run a worker until SIGINT/SIGTERM (the CLI's `disagg serve`)."""
    import uvicorn

    cpus = opts.cpu_list()
    if cpus:
        os.sched_setaffinity(0, cpus)
        if engine_config.threads is None:
            engine_config = dataclasses.replace(engine_config, threads=len(cpus))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    warn_if_open(opts.host, opts.api_key, "this worker")
    worker = Worker(engine_config, opts)
    uvicorn.run(create_app(worker), host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5)
    if worker.died:
        raise SystemExit(1)
