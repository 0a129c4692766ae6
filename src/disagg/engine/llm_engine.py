"""The synchronous engine core: add, step, abort, has_unfinished.

    step():  collect finished KV loads and releases -> schedule -> start loads -> run the model
             -> update requests -> detokenize

KV that comes from or goes to elsewhere (a prefill worker, a decode worker, the KV pool) passes
through the engine's KV connector (engine/connector), never around it. Not thread-safe: one thread
drives it (see async_engine.py); `make_sequence` alone may run on any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from disagg.engine.block_manager import BlockManager
from disagg.engine.config import EngineConfig, parse_bytes
from disagg.engine.connector.base import KVConnector
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.engine.kv_cache import PagedKVCache
from disagg.engine.runner import ModelRunner, StepResult
from disagg.engine.sampler import TokenLogprob
from disagg.engine.sampling import SamplingParams
from disagg.engine.scheduler import Scheduler, SchedulerOutput
from disagg.engine.sequence import Sequence, Status
from disagg.errors import ConfigError, ContextLengthError, InvalidRequestError, OverloadedError
from disagg.kv.block_hash import chain_hashes
from disagg.kv.layout import format_bytes
from disagg.kv.params import KVTransferParams
from disagg.kv.transport import dtype_name
from disagg.model.loader import load_model, resolve

IDLE_WAIT = 0.05  # a step that found nothing to do waits this long for something to happen
KV_TRANSFER_FAILED, INTERNAL_ERROR = "kv_transfer_failed", "internal_error"  # why a request failed

log = logging.getLogger("disagg.engine")


@dataclass
class RequestOutput:
    """What one step produced for one request (deltas), plus running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None  # on the last output: what the KV connector says (prefill)
    error: str | None = None  # the request failed: finish_reason is abort, error_type says why
    error_type: str = ""  # KV_TRANSFER_FAILED (its KV never came) or INTERNAL_ERROR (computing it failed)
    prompt_token_ids: list[int] | None = None  # on the first output a stream yields (async_engine.py)


@dataclass
class Completion:
    """A whole finished request, for callers that do not stream."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob]
    num_cached_tokens: int
    kv_transfer_params: dict | None = None


ConnectorFactory = Callable[["LLMEngine"], KVConnector]


class LLMEngine:
    def __init__(self, config: EngineConfig, connector: ConnectorFactory | None = None,
                 shared_kv_cache: bool = False) -> None:
        """`connector(engine)`: builds the engine's KV connector (none: KV never leaves the engine).
        `shared_kv_cache`: put a CPU KV cache in shared memory (kv/shm.py), so that a decode worker
        on the same host copies blocks straight out of it."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        source = resolve(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.model_name = config.model
        self.engine_id = uuid.uuid4().hex[:12]

        bs = config.block_size
        block_bytes = PagedKVCache.bytes_per_block(self.model_config, bs, self.dtype)
        num_blocks = parse_bytes(config.kv_cache_memory) // block_bytes
        capacity = num_blocks * bs
        ctx = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > ctx:
            raise ConfigError(f"max_model_len {config.max_model_len} exceeds the model's context of {ctx} tokens")
        self.max_model_len = min(config.max_model_len or ctx, capacity)
        if (config.max_model_len is not None and config.max_model_len > capacity) or self.max_model_len < bs:
            raise ConfigError(f"a KV cache of {config.kv_cache_memory} holds {capacity} tokens of "
                              f"{self.model_config.name}, too few for max_model_len; raise --kv-cache-memory "
                              f"(each block of {bs} tokens takes {format_bytes(block_bytes)})")

        model = load_model(source, dtype=self.dtype, device=self.device, max_positions=self.max_model_len,
                           seed=config.seed)
        self.kv_cache = PagedKVCache(self.model_config, num_blocks, bs, self.dtype, self.device, shared_kv_cache)
        self.model_id = f"{self.model_config.name}/{self.dtype}".replace("torch.", "")
        self.block_manager = BlockManager(num_blocks, bs, self.model_id, config.enable_prefix_caching)
        self.wakeup = threading.Event()  # set when there may be work: a request, a finished load
        self.connector = connector(self) if connector is not None else KVConnector()
        self.connector.notify = self.wakeup.set
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.connector)
        self.runner = ModelRunner(model, self.kv_cache, self.device, config.seed)
        self._requests: dict[str, tuple[Sequence, IncrementalDetokenizer]] = {}

    @property
    def dtype_name(self) -> str:
        """The KV cache's dtype as the wire names it: float32, float16, bfloat16."""
        return dtype_name(self.dtype)

    # ---- requests ----

    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            self._check_ids(ids, "prompt token ids")
        if not ids:
            raise InvalidRequestError("prompt must not be empty")
        return ids

    def _check_ids(self, ids: Seq[int], what: str) -> None:
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"{what} must be integers in [0, {vocab})")

    def make_sequence(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                      kv: KVTransferParams | None = None) -> Sequence:
        """Tokenize and validate a request, all of it, before it touches engine state (any thread)."""
        ids = self.tokenize(prompt)
        if kv is not None and kv.do_remote_decode:  # prefill for a decode worker: the prompt and token 1,
            # checked against what the decode worker will be asked to generate
            self._check_length(ids, kv.decode_max_tokens or 1)
            params = dataclasses.replace(params, max_tokens=1)
        max_tokens = self._check_length(ids, params.max_tokens)
        if any(t >= self.model_config.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be below the vocabulary size {self.model_config.vocab_size}")
        first = list(kv.first_token_ids or ()) if kv is not None and kv.do_remote_prefill else []
        self._check_first_tokens(first, max_tokens)
        seq = Sequence(request_id, ids + first, len(ids), params, max_tokens, kv=kv)
        seq.block_hashes = chain_hashes(ids, self.config.block_size, self.model_id)
        return seq

    def _check_length(self, ids: list[int], max_tokens: int | None) -> int:
        """`max_tokens` resolved (None: the rest of the context), once the prompt and it are known to
        fit the context."""
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens, and the prompt has "
                                     f"{len(ids)}; shorten the prompt")
        max_tokens = max_tokens if max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens, but {len(ids)} prompt "
                                     f"tokens + max_tokens {max_tokens} = {len(ids) + max_tokens}; lower max_tokens "
                                     "or shorten the prompt")
        return max_tokens

    def _check_first_tokens(self, first: Seq[int], max_tokens: int) -> None:
        self._check_ids(first, "first_token_ids")
        if first and len(first) >= max_tokens:
            raise InvalidRequestError("first_token_ids already reach max_tokens: nothing left to generate")

    def add(self, seq: Sequence) -> None:
        """Queue a request made by `make_sequence`."""
        if seq.request_id in self._requests or seq.request_id in self.scheduler.held:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self._admit(seq)
        if not seq.prepared:
            self.connector.prepare(seq)
            seq.prepared = True
        detok = IncrementalDetokenizer(self.tokenizer, seq.params)
        if seq.num_output_tokens:  # tokens sampled elsewhere, streamed by someone else already
            detok.add(seq.output_token_ids)
            detok.skip_emitted()
        self._requests[seq.request_id] = (seq, detok)
        self.scheduler.add(seq)
        self.connector.request_added(seq)

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    kv: KVTransferParams | None = None) -> None:
        self.add(self.make_sequence(request_id, prompt, params or SamplingParams(), kv))

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks: at once, or, where something still reads or writes
        them (an export of held KV, a load), as soon as it is done. False if it is unknown."""
        entry = self._requests.pop(request_id, None)
        if entry is None:  # finished already: held KV is the connector's to let go
            return self.connector.release(request_id) or self.scheduler.release(request_id)
        seq, _ = entry
        self._end(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.connector.has_finished()

    def _end(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> dict | None:
        """Finish a request everywhere; the connector may keep its blocks and says what to answer."""
        seq.finish_reason = reason
        ending = self.connector.request_finished(seq)
        self.scheduler.finish(seq, reason, stop_reason, hold=ending.hold and reason != "abort")
        self.runner.release(seq.request_id)
        return ending.params

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        self.wakeup.clear()
        outputs = self._collect_kv()
        out = self.scheduler.schedule()
        self.connector.start_load()
        if not out.scheduled:
            if not outputs:  # nothing to do until a load, a release or a request comes
                self.wakeup.wait(IDLE_WAIT)
            return outputs
        result, failed = self._execute(out)
        completing = self._completing(out)
        if failed:  # those requests end with the error; the rest of the step stands
            out.scheduled = [(s, n) for s, n in out.scheduled if s.request_id not in failed]
            completing = [s for s in completing if s.request_id not in failed]
        self.connector.step_done(completing)
        for seq in self.scheduler.update(out, result.tokens):
            outputs.append(self._process(seq, result.logprobs.get(seq.request_id)))
        for seq, error in failed.values():
            if not seq.finished:
                outputs.append(self._fail(seq, error, INTERNAL_ERROR))
        return outputs

    @staticmethod
    def _completing(out: SchedulerOutput) -> list[Sequence]:
        """The step's requests whose prompt it completes."""
        return [s for s, n in out.scheduled if s.num_computed_tokens < s.num_prompt_tokens <= s.num_computed_tokens + n]

    def _execute(self, out: SchedulerOutput) -> tuple[StepResult, dict[str, tuple[Sequence, str]]]:
        """Run the step (the connector saves each layer of the prompts it completes); if it fails,
        run its requests one by one to find those that make it fail (each run writes the same KV into
        the same slots, so running again is harmless). Returns the results and the failed requests
        with their errors."""
        completing = self._completing(out)
        save = (lambda i: self.connector.save_layer(i, completing)) if self.connector.wants_layers(completing) \
            else None
        try:
            return self.runner.execute(out, after_layer=save), {}
        except Exception as e:
            if len(out.scheduled) == 1:
                seq = out.scheduled[0][0]
                log.warning("request %s failed in the engine: %r", seq.request_id, e)
                return StepResult({}, {}), {seq.request_id: (seq, f"the engine could not compute it: {e}")}
            log.warning("an engine step of %d requests failed (%r): running them one by one", len(out.scheduled), e)
        tokens, logprobs, failed = {}, {}, {}
        for seq, n in out.scheduled:
            one, f = self._execute(SchedulerOutput([(seq, n)]))
            tokens.update(one.tokens)
            logprobs.update(one.logprobs)
            failed.update(f)
        return StepResult(tokens, logprobs), failed

    def _collect_kv(self) -> list[RequestOutput]:
        """Apply what the connector finished since the last step: held blocks released, loads done
        (or failed: those requests end with an error)."""
        failed: list[RequestOutput] = []
        finished = self.connector.take_finished()
        for rid in finished.released:
            self.scheduler.release(rid)
        for rid, result in finished.loads.items():
            seq = self.scheduler.receiving.get(rid)
            entry = self._requests.get(rid)
            if seq is None:  # not admitted yet (a push that failed before it had blocks)
                if result.error and entry is not None and entry[0].status is Status.WAITING:
                    failed.append(self._fail(entry[0], result.error))
                continue
            error = result.error
            if not error and result.first_token_ids and not seq.finished:
                try:
                    self._check_first_tokens(result.first_token_ids, seq.max_tokens)
                except InvalidRequestError as e:
                    error = f"the pushed first tokens are unusable: {e}"
                else:
                    seq.token_ids.extend(result.first_token_ids)
                    detok = self._requests[rid][1]
                    detok.add(list(result.first_token_ids))
                    detok.skip_emitted()
            self.scheduler.loaded(seq, 0 if error else result.tokens)
            if error and not seq.finished:
                failed.append(self._fail(seq, error))
        return failed

    def _admit(self, seq: Sequence) -> None:
        """Refuse a request beyond the configured limits (503 + Retry-After; nothing was allocated):
        the queue of requests waiting for a slot, their prompt tokens, and the KV held for decode
        workers (a prefill-for-remote request would add its prompt's blocks to it)."""
        c, sched = self.config, self.scheduler
        waiting = list(sched.waiting)
        if c.max_num_queued_reqs and len(waiting) >= c.max_num_queued_reqs:
            raise OverloadedError(f"{len(waiting)} requests are already waiting (--max-num-queued-reqs "
                                  f"{c.max_num_queued_reqs}); retry shortly")
        queued = sum(s.num_uncomputed_tokens for s in waiting)
        if c.max_num_queued_tokens and queued + seq.num_tokens > c.max_num_queued_tokens:
            raise OverloadedError(f"{queued} prompt tokens are already waiting and this request brings "
                                  f"{seq.num_tokens} (--max-num-queued-tokens {c.max_num_queued_tokens})"
                                  "; retry shortly")
        if seq.kv is not None and seq.kv.do_remote_decode and c.kv_max_held_fraction < 1:
            held = sum(len(s.block_table) for s in sched.held.values())
            cap = int(c.kv_max_held_fraction * self.block_manager.num_blocks)
            need = -(-seq.num_tokens // c.block_size)
            if held and held + need > cap:  # with nothing held, any prompt that fits may go
                raise OverloadedError(f"{held} KV blocks are held for decode workers and this prompt needs {need} "
                                      f"more (--kv-max-held-fraction {c.kv_max_held_fraction}: {cap} of "
                                      f"{self.block_manager.num_blocks}); retry shortly")

    def _fail(self, seq: Sequence, error: str, kind: str = KV_TRANSFER_FAILED) -> RequestOutput:
        del self._requests[seq.request_id]
        self._end(seq, "abort")
        return RequestOutput(seq.request_id, [], "", True, "abort", num_prompt_tokens=seq.num_prompt_tokens,
                             error=error, error_type=kind)

    def _process(self, seq: Sequence, logprob: TokenLogprob | None) -> RequestOutput:
        token = seq.token_ids[-1]
        _, detok = self._requests[seq.request_id]
        stop_str = detok.add([token])
        reason: str | None = None
        stop_reason: int | str | None = None
        if stop_str is not None:
            reason, stop_reason = "stop", stop_str
        elif token in seq.params.stop_token_ids or (
            not seq.params.ignore_eos and token in self.tokenizer.eos_token_ids
        ):
            reason, stop_reason = "stop", token
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        params = None
        if reason is not None:
            params = self._end(seq, reason, stop_reason)
            del self._requests[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[token],
            new_text=detok.take(final=reason is not None),
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            new_logprobs=[logprob] if logprob is not None else [],
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            kv_transfer_params=params,
        )

    # ---- conveniences ----

    def generate(self, prompts: Seq[str | Seq[int]],
                 params: SamplingParams | Seq[SamplingParams]) -> list[Completion]:
        """Run prompts to completion together (continuous batching) and return them in order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        done: dict[str, Completion] = {}
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            seq = self.make_sequence(rid, prompt, p)
            done[rid] = Completion(rid, list(seq.token_ids), [], "", None, [], 0)
            self.add(seq)
        while self.has_unfinished():
            for o in self.step():
                c = done[o.request_id]
                c.token_ids += o.new_token_ids
                c.text += o.new_text
                c.logprobs += o.new_logprobs
                if o.finished:
                    c.finish_reason, c.num_cached_tokens = o.finish_reason, o.num_cached_tokens
                    c.kv_transfer_params = o.kv_transfer_params
        return [done[rid] for rid in ids]

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self.scheduler.receiving),
            "held": len(self.scheduler.held),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "prefix_cache_queries": bm.queries,
            "prefix_cache_hits": bm.hits,
            "preemptions": self.scheduler.num_preemptions,
        }
