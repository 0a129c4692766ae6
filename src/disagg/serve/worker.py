"""The worker: one engine behind an OpenAI-compatible HTTP API, in one of three roles.

- both: an ordinary server.
- prefill: a request with kv_transfer_params.do_remote_decode computes the prompt and token 1,
  keeps the blocks under a lease, and answers with where to pull them (vLLM's protocol).
- decode: a request with kv_transfer_params.do_remote_prefill reserves cache blocks for the KV
  (waiting, and renewing the prefill's lease, while the cache is full), pulls the blocks into
  them, tells the prefill side to release them, and continues; if the pull fails it recomputes.

Layer-wise push (kv/push.py): a prefill request that names push_host/push_port/push_id streams
the KV to that decode worker's KV port layer by layer as it computes; the decode request with
that push_id reserves blocks and waits for it. A failed push fails the decode request (the proxy
then pulls), never silently.

Any role serves ordinary requests too. /health is 503 until the model has loaded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from disagg.engine.async_engine import AsyncEngine, EngineDeadError
from disagg.engine.config import EngineConfig, parse_bytes
from disagg.engine.kv_cache import BLOCK_DIM
from disagg.engine.llm_engine import ImportedKV, LLMEngine, RequestOutput
from disagg.engine.sampler import TokenLogprob
from disagg.engine.sampling import SamplingParams
from disagg.engine.sequence import Sequence
from disagg.errors import DisaggError, ModelNotFoundError
from disagg.kv import nixl
from disagg.kv.block_hash import tokens_digest
from disagg.kv.pool import DiskTier, KVPool, MemoryTier, RedisTier, Tier
from disagg.kv.push import Pusher, PushMeta, PushSlots
from disagg.kv.tcp import KVClient, KVPayload, KVServer, KVTransferError, is_loopback
from disagg.serve.metrics import WorkerMetrics
from disagg.serve.options import ServeOptions
from disagg.serve.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    new_id,
    now,
    sse,
    stream_chunk,
    usage,
    usage_chunk,
)

log = logging.getLogger("disagg.worker")

POOL_WRITES_PENDING = 8  # prompts waiting for the pool writer beyond which new ones are not kept

_EMPTY_STATS = dict.fromkeys(("running", "waiting", "held", "kv_blocks_used", "kv_blocks_total",
                              "prefix_cache_hits", "preemptions"), 0)


class Worker:
    def __init__(self, engine_config: EngineConfig, opts: ServeOptions) -> None:
        self.engine_config, self.opts = engine_config, opts
        self.model_name = opts.served_model_name or engine_config.model
        self.engine_id = uuid.uuid4().hex[:12]
        self.engine: AsyncEngine | None = None
        self.load_error: BaseException | None = None
        self.metrics = WorkerMetrics(lambda: self.engine.engine.stats() if self.engine else _EMPTY_STATS)
        self.leases: dict[str, float] = {}  # held request id -> monotonic expiry
        secret = os.environ.get("DISAGG_KV_SECRET") or None
        self.kv_server = KVServer(self._export, self._release, secret=secret, on_sent=self.metrics.kv_bytes_sent.inc,
                                  link=opts.link(), renew=self._renew, push_slots=PushSlots(wait=opts.kv_lease),
                                  push_check=self._check_push)
        self.kv_client = KVClient(secret=secret)
        self.kv_port = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self.pool = self._make_pool()
        self._pool_writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disagg-kv-pool")
        self._pool_lock = threading.Lock()
        self._pool_pending = 0  # prompts copied for the pool, not yet written

    def _make_pool(self) -> KVPool | None:
        o = self.opts
        tiers: list[Tier] = []
        if parse_bytes(o.kv_pool_memory) > 0:
            tiers.append(MemoryTier(parse_bytes(o.kv_pool_memory)))
        if o.kv_pool_dir:
            tiers.append(DiskTier(Path(o.kv_pool_dir).expanduser(), parse_bytes(o.kv_pool_disk)))
        if o.kv_pool_redis:
            tiers.append(RedisTier(o.kv_pool_redis, parse_bytes(o.kv_pool_redis_budget)))
        if not tiers:
            return None
        self.metrics.watch_pool(tiers)
        return KVPool(tiers, policy=o.kv_pool_write)

    # ---- lifecycle ----

    async def start(self) -> None:
        self.kv_port = await self.kv_server.start(self.opts.kv_host, self.opts.kv_port)  # decode: for pushes
        self._tasks = [asyncio.create_task(self._load()), asyncio.create_task(self._expire_leases())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.kv_server.close()
        if self.engine is not None:
            self.engine.shutdown()

    async def _load(self) -> None:
        try:
            engine = await asyncio.to_thread(LLMEngine, self.engine_config,
                                             self.opts.kv_transport == "shm" and self.opts.role != "decode")
            self.kv_server.arena = engine.kv_cache.arena
            if self.opts.kv_transport == "nixl" and self.opts.role != "decode":
                self.kv_server.nixl = nixl.NixlAgent(engine.kv_cache.layers)
            self.engine = AsyncEngine(engine)
            log.warning("worker ready: %s, role %s, http %s:%d, kv port %s (%s)", self.model_name, self.opts.role,
                        self.opts.host, self.opts.port, self.kv_port or "-", self.kv_server.link.describe())
        except BaseException as e:
            self.load_error = e
            log.error("model failed to load: %s", e)

    async def _expire_leases(self) -> None:
        period = min(1.0, self.opts.kv_lease / 4)
        while True:
            await asyncio.sleep(period)
            t = time.monotonic()
            for rid in [r for r, exp in self.leases.items() if exp <= t]:
                self.leases.pop(rid, None)
                if self.engine is not None and await self.engine.call(lambda e, rid=rid: e.release(rid)):
                    self.metrics.kv_leases_expired.inc()

    # ---- KV port callbacks ----

    async def _export(self, rid: str) -> KVPayload:
        if rid not in self.leases or self.engine is None:
            raise KVTransferError(f"no KV held for request {rid!r} (released or lease expired)")
        self.leases[rid] = time.monotonic() + self.opts.kv_lease  # renewed: never expires mid-transfer
        views = await self.engine.call(lambda e: e.kv_views(rid))
        if views is not None:  # straight from the CPU cache's memory
            chunks, shape, dtype, n, digest = views
            return KVPayload(None, n, digest, chunks=tuple(chunks), shape=shape, dtype=getattr(torch, dtype))
        kv = await self.engine.call(lambda e: e.export_kv(rid))
        return KVPayload(kv.data, kv.num_tokens, kv.digest)

    async def _renew(self, rid: str) -> float | None:
        if rid not in self.leases:
            return None
        self.leases[rid] = time.monotonic() + self.opts.kv_lease
        self.metrics.kv_lease_renewals.inc()
        return self.opts.kv_lease

    async def _release(self, rid: str) -> bool:
        if self.leases.pop(rid, None) is None or self.engine is None:
            return False
        return await self.engine.call(lambda e: e.release(rid))

    # ---- requests ----

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
        params = req.sampling_params()
        prompt = engine.engine.tokenizer.apply_chat_template(req.chat_messages()) if chat else req.prompt
        rid = new_id("chatcmpl" if chat else "cmpl")
        kvp = req.kv_transfer_params
        add: dict[str, Any] = {}
        pusher = None
        if kvp is not None and kvp.do_remote_decode:
            params = dataclasses.replace(params, max_tokens=1)
            add["hold_blocks"] = True
        seq = engine.engine.make_sequence(rid, prompt, params)  # tokenized once, for every use below
        if kvp is not None and kvp.do_remote_decode:
            if kvp.push_id and kvp.push_host and kvp.push_port:
                pusher = self._pusher(engine, kvp, seq)
                if pusher is not None:
                    add["layer_hook"] = pusher.layer_done
        elif kvp is not None and kvp.do_remote_prefill:
            add = await (self._await_push(engine, kvp, seq) if kvp.push_id else self._pull(engine, kvp, seq))
        if self.pool is not None and "kv" not in add and not (kvp is not None and kvp.do_remote_prefill):
            add |= await self._from_pool(engine, seq)
        prompt_ids = None
        # a decode worker given token 1 streams after the proxy, which already sent the prompt's ids
        if req.return_token_ids and not (kvp is not None and kvp.first_token_ids and req.stream):
            prompt_ids = seq.token_ids[: seq.num_prompt_tokens]
        t0 = time.perf_counter()
        stream = engine.generate(seq, params, request_id=rid, **add)
        try:
            first = await anext(stream)  # bad input raises here, before any byte is sent
        except BaseException:
            if pusher is not None:
                pusher.abort()
            raise
        fmt = _Formatter(engine.engine, rid, self.model_name, chat, params, prompt_ids,
                         token_ids=req.return_token_ids)
        if req.stream:
            return StreamingResponse(self._sse(fmt, first, stream, t0, req.include_usage),
                                     media_type="text/event-stream")
        outs = [first] + [o async for o in stream]
        self._record(outs[-1], t0, fmt.first_time)
        extra = await self._after_prefill(engine, rid, outs) if add.get("hold_blocks") else None
        if pusher is not None:
            if extra is None:  # token 1 ended the request: nothing to push
                pusher.abort()
            else:
                pusher.finish(extra["first_token_ids"])
                extra["push_id"] = kvp.push_id
                self._tasks.append(asyncio.create_task(self._after_push(pusher, rid)))
        return JSONResponse(fmt.whole(outs, kv_transfer_params=extra))

    async def _after_prefill(self, engine: AsyncEngine, rid: str, outs: list[RequestOutput]) -> dict[str, Any] | None:
        """Put the held blocks under a lease and say where to pull them; or free them at once when
        the request already ended (token 1 was a stop)."""
        if outs[-1].finish_reason != "length":
            await engine.call(lambda e: e.release(rid))
            return None
        blocks, n = await engine.call(lambda e: (list(e.scheduler.held[rid].block_table),
                                                 e.scheduler.held[rid].num_computed_tokens))
        self.leases[rid] = time.monotonic() + self.opts.kv_lease
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_host": self.opts.kv_host, "remote_port": self.kv_port, "remote_block_ids": blocks,
                "remote_request_id": rid, "num_tokens": n, "kv_dtype": engine.engine.dtype_name,
                "kv_transport": self.opts.kv_transport,
                "first_token_ids": [t for o in outs for t in o.new_token_ids]}

    async def _pull(self, engine: AsyncEngine, kvp: Any, seq: Sequence) -> dict[str, Any]:
        """Pull the prompt's KV, into reserved cache blocks when possible, else into a tensor to
        import; any failure means recomputing the prompt instead."""
        first = tuple(kvp.first_token_ids or ())
        if not (kvp.remote_host and kvp.remote_port and kvp.remote_request_id):
            return {"first_token_ids": first}
        if not is_loopback(kvp.remote_host) and not self.kv_client.has_secret:
            # a request must not make this worker connect anywhere it likes: beyond loopback, only
            # to KV servers that share our secret
            self.metrics.kv_pull_failures.inc()
            log.warning("refusing a KV pull from %s without DISAGG_KV_SECRET; recomputing", kvp.remote_host)
            return {"first_token_ids": first}
        rid = seq.request_id
        views = None
        codec = self.opts.kv_codec
        try:
            if kvp.kv_dtype and kvp.num_tokens and codec == "none" and await engine.call(  # coded KV is decoded
                    lambda e: e.can_receive_in_place(seq, kvp.num_tokens, kvp.kv_dtype)):
                views = await self._reserve(engine, seq, kvp.num_tokens, kvp.kv_dtype, kvp)
            via = self._via(kvp)
            payload = await self.kv_client.pull(kvp.remote_host, kvp.remote_port, kvp.remote_request_id,
                                                engine.engine.kv_cache.export_shape(-1),
                                                into=(lambda shape, dtype: views) if views is not None else None,
                                                via=via,
                                                codec=codec)
            if payload.digest != tokens_digest(seq.token_ids[: payload.num_tokens]):
                raise KVTransferError(f"KV from {kvp.remote_host} was computed from other tokens than this prompt")
        except KVTransferError as e:
            if views is not None:
                await engine.call(lambda e: e.unreserve(rid))
            self.metrics.kv_pull_failures.inc()
            log.warning("%s; recomputing the prompt instead", e)
            return {"first_token_ids": first}
        except BaseException:  # cancelled (the client left): the reserved blocks must not leak
            if views is not None:
                self._tasks.append(asyncio.create_task(engine.call(lambda e: e.unreserve(rid))))
            raise
        self.metrics.kv_bytes_received.inc(payload.wire_bytes)
        self.metrics.kv_pulls.labels(via).inc()
        return {"kv": ImportedKV(payload.data, payload.num_tokens, payload.digest), "first_token_ids": first}

    async def _from_pool(self, engine: AsyncEngine, seq: Sequence) -> dict[str, Any]:
        """The prompt's longest pooled prefix as KV to import (when it beats the engine's own prefix
        cache), and a hook that stores the prompt's full blocks once they are computed."""
        e = engine.engine
        bs = e.config.block_size
        ids = seq.token_ids[: seq.num_prompt_tokens]

        def prefix_state(eng: LLMEngine) -> tuple[int, list[bytes]]:  # blocks hashed once, for cache and pool
            eng.block_manager.update_hashes(seq)
            return len(eng.block_manager.cached_prefix(seq)), list(seq.block_hashes)

        cached, keys = await engine.call(prefix_state)
        if not keys:
            return {}
        pooled = await asyncio.to_thread(self.pool.leading, keys)  # existence only: nothing read yet
        out: dict[str, Any] = {}
        if pooled < len(keys):  # store what the pool lacks, once computed
            out = {"on_prefilled": lambda kv: self._queue_pool_write(keys[pooled:], kv), "prefilled_from": pooled}
        if pooled <= cached:  # the engine's own prefix cache has at least as much: read nothing
            return out
        hit = await asyncio.to_thread(self.pool.lookup, keys)
        shape = e.kv_cache.export_shape(1)
        size = math.prod(shape) * e.dtype.itemsize
        blocks = list(itertools.takewhile(lambda b: len(b) == size, hit.blocks))  # a foreign shape: a miss
        self.metrics.pool_load.observe(hit.seconds)
        if len(blocks) <= cached:
            return out
        self.metrics.pool_tokens_saved.inc((len(blocks) - cached) * bs)
        data = torch.cat([torch.frombuffer(bytearray(b), dtype=e.dtype).reshape(shape) for b in blocks], dim=BLOCK_DIM)
        n = len(blocks) * bs
        return out | {"kv": ImportedKV(data, n, tokens_digest(ids[:n]))}

    def _queue_pool_write(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """On the engine thread: hand a prompt's new blocks to the writer, unless it is this far
        behind (each waiting copy holds memory, GPU memory on CUDA): then they are not kept."""
        with self._pool_lock:
            if self._pool_pending >= POOL_WRITES_PENDING:
                self.metrics.pool_writes_dropped.inc()
                return
            self._pool_pending += 1
        self._pool_writer.submit(self._to_pool, keys, kv)

    def _to_pool(self, keys: list[bytes], kv: torch.Tensor) -> None:
        """On the pool's writer thread: split the prompt's full blocks and store them."""
        try:
            cpu = kv.to("cpu").contiguous()
            del kv
            blocks = [cpu.narrow(BLOCK_DIM, j, 1).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      for j in range(cpu.shape[BLOCK_DIM])]
            self.pool.store(keys[: len(blocks)], blocks)
        finally:
            with self._pool_lock:
                self._pool_pending -= 1

    def _pusher(self, engine: AsyncEngine, kvp: Any, seq: Sequence) -> Pusher | None:
        """A pusher for this prefill's KV, or None where pushing cannot work (the decode side then
        waits in vain until the proxy, seeing no push_id echoed, cancels it and pulls instead)."""
        if engine.engine.device.type != "cpu":
            return None
        if not is_loopback(kvp.push_host) and not self.kv_client.has_secret:
            log.warning("refusing to push KV to %s without DISAGG_KV_SECRET", kvp.push_host)
            return None
        e = engine.engine
        n = seq.num_prompt_tokens
        shape = e.kv_cache.export_shape(-(-n // e.config.block_size))
        head = {"push_id": kvp.push_id, "num_tokens": n, "digest": tokens_digest(seq.token_ids[:n]),
                "shape": list(shape), "dtype": e.dtype_name, "nbytes": math.prod(shape) * e.dtype.itemsize}
        return Pusher(self.kv_client.session, kvp.push_host, kvp.push_port, head, e.model_config.num_layers,
                      self.kv_server.link)

    async def _after_push(self, pusher: Pusher, rid: str) -> None:
        """A confirmed push frees the held blocks at once; a failed one leaves them under the lease
        for the proxy's fallback pull."""
        try:
            sent = await asyncio.wrap_future(pusher.result)
        except KVTransferError as e:
            log.warning("KV push for %s failed: %s; its KV stays held for a pull", rid, e)
            return
        self.metrics.kv_bytes_sent.inc(sent)
        await self._release(rid)

    async def _await_push(self, engine: AsyncEngine, kvp: Any, seq: Sequence) -> dict[str, Any]:
        """Reserve blocks for the whole prompt's KV and wait for a prefill worker to push it."""
        n, rid = seq.num_prompt_tokens, seq.request_id
        dtype = engine.engine.dtype_name
        if not await engine.call(lambda e: e.can_receive_in_place(seq, n, dtype)):
            raise KVPushError("this decode worker cannot receive pushed KV (GPU cache, or the prompt does not fit)")
        views = await self._reserve(engine, seq, n, dtype)
        digest = tokens_digest(seq.token_ids[:n])
        expected = (n, digest, engine.engine.kv_cache.export_shape(-(-n // engine.engine.config.block_size)), dtype)
        try:
            first = await self.kv_server.push_slots.expect(kvp.push_id, expected, views)
        except BaseException as e:
            await engine.call(lambda e: e.unreserve(rid))
            if isinstance(e, KVTransferError):
                self.metrics.kv_pull_failures.inc()
                raise KVPushError(f"pushed KV did not arrive: {e}") from e
            raise
        self.metrics.kv_bytes_received.inc(sum(v.nbytes for v in views))
        self.metrics.kv_pulls.labels("push").inc()
        return {"kv": ImportedKV(None, n, digest), "first_token_ids": tuple(first)}

    @staticmethod
    def _check_push(expected: Any, meta: PushMeta) -> None:
        n, digest, shape, dtype = expected
        if (meta.num_tokens, meta.digest, meta.shape, meta.dtype) != (n, digest, tuple(shape), dtype):
            raise KVTransferError("pushed KV does not match the waiting request (tokens, shape or dtype)")

    def _via(self, kvp: Any) -> str:
        """How to pull: as the prefill answer says, where this worker can (shared memory only on one
        host; NIXL only with NIXL installed and no wire codec, falling back to the TCP port)."""
        if kvp.kv_transport == "shm" and is_loopback(kvp.remote_host):
            return "shm"
        if kvp.kv_transport == "nixl" and self.opts.kv_codec == "none" and nixl.available():
            if self.kv_client.nixl is None:
                self.kv_client.nixl = nixl.NixlAgent(self.engine.engine.kv_cache.layers)
            return "nixl"
        return "tcp"

    async def _reserve(self, engine: AsyncEngine, seq: Sequence, n: int, dtype: str,
                       held: Any = None) -> list[memoryview]:
        """Cache blocks to receive `n` tokens of KV into. While the cache is full the request waits
        here, renewing the lease of the KV `held` by a prefill worker (at a third of its length) so
        it outlives the wait: the alternative, pulling into memory outside the cache, would let a
        queue grow without bound."""
        next_renewal = time.monotonic()
        while (views := await engine.call(lambda e: e.reserve_kv(seq, n, dtype))) is None:
            if held is not None and time.monotonic() >= next_renewal:
                lease = await self.kv_client.renew(held.remote_host, held.remote_port, held.remote_request_id)
                if lease is None:
                    raise KVTransferError("the prefill worker no longer holds the KV this request waited for")
                next_renewal = time.monotonic() + lease / 3
            await asyncio.sleep(0.02)  # blocks free as running requests finish, step by step
        return views

    async def _sse(self, fmt: _Formatter, first: RequestOutput, stream: AsyncIterator[RequestOutput], t0: float,
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


class KVPushError(DisaggError):
    http_status = 503
    error_type = "kv_push_failed"


class EngineNotReady(DisaggError):
    http_status = 503
    error_type = "service_unavailable"


class _Formatter:
    """RequestOutputs -> OpenAI response bodies and stream chunks, for completions and chat."""

    def __init__(self, engine: LLMEngine, rid: str, model: str, chat: bool, params: SamplingParams,
                 prompt_token_ids: list[int] | None = None, token_ids: bool = False) -> None:
        self.tok = engine.tokenizer
        self.rid, self.model, self.chat, self.params = rid, model, chat, params
        self.prompt_ids, self.token_ids = prompt_token_ids, token_ids  # return_token_ids
        self.created = now()
        self.first_time: float | None = None
        self._role_sent = False

    def _logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.params.logprobs is None:
            return None
        piece = self.tok.decode
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict[str, Any]:
                text = piece([token_id])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            return {"content": [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp in lps]}
        return {"tokens": [piece([lp.token_id]) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{piece([t]): v for t, v in lp.top} for lp in lps], "text_offset": []}

    def chunk(self, out: RequestOutput) -> dict[str, Any]:
        if self.first_time is None:
            self.first_time = time.perf_counter()
        first = not self._role_sent
        self._role_sent = True
        return stream_chunk(self.rid, self.created, self.model, self.chat, out.new_text, role=self.chat and first,
                            finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                            logprobs=self._logprobs(out.new_logprobs),
                            token_ids=out.new_token_ids if self.token_ids else None,
                            prompt_token_ids=self.prompt_ids if first else None)

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        return usage_chunk(self.rid, self.created, self.model, self.chat,
                           usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens))

    def whole(self, outs: list[RequestOutput], kv_transfer_params: dict[str, Any] | None) -> dict[str, Any]:
        if self.first_time is None:
            self.first_time = time.perf_counter()
        last = outs[-1]
        text = "".join(o.new_text for o in outs)
        lps = self._logprobs([lp for o in outs for lp in o.new_logprobs])
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                      "finish_reason": last.finish_reason, "stop_reason": last.stop_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": last.finish_reason,
                      "stop_reason": last.stop_reason}
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)}
        if self.token_ids:  # where vLLM puts them: per choice, the prompt's on chat's body
            choice["token_ids"] = [t for o in outs for t in o.new_token_ids]
            (body if self.chat else choice)["prompt_token_ids"] = self.prompt_ids
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        return body


def error_response(status: int, message: str, err_type: str) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, status), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON"
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(worker: Worker) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="disagg worker", lifespan=lifespan)

    @app.exception_handler(DisaggError)
    async def _disagg_error(request: Request, exc: DisaggError) -> JSONResponse:
        worker.metrics.errors.labels(str(exc.http_status)).inc()
        return error_response(exc.http_status, str(exc), exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        worker.metrics.errors.labels("400").inc()
        return error_response(400, _validation_message(exc), "invalid_request_error")

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        worker.metrics.errors.labels("503").inc()
        return error_response(503, str(exc), "service_unavailable")

    @app.get("/health")
    async def health() -> Response:
        try:
            worker.ready_engine()
        except EngineNotReady as e:
            return error_response(503, str(e), "service_unavailable")
        return JSONResponse({"status": "ok", "role": worker.opts.role, "kv_host": worker.opts.kv_host,
                             "kv_port": worker.kv_port,
                             "kv_link": worker.kv_server.link.describe()})

    @app.get("/kv/tokenizer")
    async def kv_tokenizer() -> Response:
        """How to turn a request into this worker's block hashes (serve/kv_index.py)."""
        engine = worker.ready_engine().engine
        return JSONResponse({"model": worker.model_name, "model_id": engine.model_id,
                             "block_size": engine.config.block_size, "tokenizer": engine.tokenizer.to_dict()})

    @app.get("/kv/events")
    async def kv_events(since: int = -1, epoch: str = "") -> Response:
        """Prefix-cache changes after event `since` of this engine (`epoch`); a snapshot of the whole
        cache when the reader is new, fell behind, or follows an engine that has since restarted."""
        engine = worker.ready_engine()
        log = engine.engine.block_manager.events
        events = log.since(since) if epoch == worker.engine_id and since >= 0 else None
        if events is not None:
            return JSONResponse({"epoch": worker.engine_id, "number": events[-1][0] if events else since,
                                 "events": [[int(stored), h.hex()] for _, stored, h in events]})
        number, held = await engine.call(lambda e: (e.block_manager.events.number, e.block_manager.cached_hashes()))
        return JSONResponse({"epoch": worker.engine_id, "number": number, "snapshot": [h.hex() for h in held]})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = worker.engine
        return {"object": "list", "data": [{
            "id": worker.model_name, "object": "model", "created": now(), "owned_by": "disagg",
            "max_model_len": engine.engine.max_model_len if engine else None,
            "vocab_size": engine.engine.model_config.vocab_size if engine else None}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        return await worker.handle(req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        return await worker.handle(req, chat=True)

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
    uvicorn.run(create_app(Worker(engine_config, opts)), host=opts.host, port=opts.port, log_level=opts.log_level,
                timeout_graceful_shutdown=5)
