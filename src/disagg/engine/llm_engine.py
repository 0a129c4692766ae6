"""The synchronous engine core: add_request, step, abort, has_unfinished.

    step():  schedule -> write imported KV -> run the model -> update requests -> detokenize

Requests may arrive with KV computed elsewhere (the decode role imports a prefill worker's
blocks) and may keep their blocks after finishing until released (the prefill role holds them
for a decode worker to pull). Not thread-safe: one thread drives it (see async_engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from disagg.engine.block_manager import BlockManager
from disagg.engine.config import EngineConfig, parse_bytes
from disagg.engine.detokenizer import IncrementalDetokenizer
from disagg.engine.kv_cache import BLOCK_DIM, PagedKVCache
from disagg.engine.runner import ModelRunner
from disagg.engine.sampler import TokenLogprob
from disagg.engine.sampling import SamplingParams
from disagg.engine.scheduler import Scheduler
from disagg.engine.sequence import Sequence
from disagg.errors import ConfigError, ContextLengthError, InvalidRequestError
from disagg.kv.block_hash import tokens_digest
from disagg.kv.layout import format_bytes
from disagg.model.loader import load_model, resolve


@dataclass(frozen=True)
class ImportedKV:
    """KV of a prompt's first `num_tokens` tokens, as exported by another engine."""

    data: torch.Tensor | None  # [layers, 2, kv_heads, blocks, block_size, head_dim]; None: already in place
    num_tokens: int
    digest: str = ""  # tokens_digest of the tokens the KV was computed from ("" = unchecked)


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


class LLMEngine:
    def __init__(self, config: EngineConfig, shared_kv_cache: bool = False) -> None:
        """`shared_kv_cache`: put a CPU KV cache in shared memory (kv/shm.py), so that a decode
        worker on the same host copies blocks straight out of it."""
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        source = resolve(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.model_name = config.model

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
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache, self.device, config.seed)
        self._requests: dict[str, tuple[Sequence, IncrementalDetokenizer]] = {}
        self._imports: dict[str, torch.Tensor] = {}
        self._reserved: dict[str, Sequence] = {}  # blocks allocated for KV arriving in place
        self._ready: list[RequestOutput] = []  # outputs produced outside step(), returned by the next one

    # ---- requests ----

    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("prompt must not be empty")
        return ids

    def make_sequence(self, request_id: str, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        """Tokenize and validate a request without touching engine state (safe from any thread)."""
        ids = self.tokenize(prompt)
        limit = self.max_model_len
        if len(ids) >= limit:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens, and the prompt has "
                                     f"{len(ids)}; shorten the prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - len(ids)
        if len(ids) + max_tokens > limit:
            raise ContextLengthError(f"this model's maximum context length is {limit} tokens, but {len(ids)} prompt "
                                     f"tokens + max_tokens {max_tokens} = {len(ids) + max_tokens}; lower max_tokens "
                                     "or shorten the prompt")
        if any(t >= self.model_config.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be below the vocabulary size {self.model_config.vocab_size}")
        return Sequence(request_id, ids, len(ids), params, max_tokens)

    def add_request(self, request_id: str, prompt: str | Seq[int] | Sequence,
                    params: SamplingParams | None = None, *, kv: ImportedKV | None = None,
                    first_token_ids: Seq[int] = (), hold_blocks: bool = False,
                    layer_hook: Callable[[int, list[memoryview]], None] | None = None,
                    on_prefilled: Callable[[torch.Tensor], None] | None = None, prefilled_from: int = 0) -> None:
        """Queue a request. `kv`: the prompt's KV computed elsewhere; `first_token_ids`: tokens
        already sampled elsewhere (streamed by someone else, so not emitted again); `layer_hook(i,
        views)`: called on the engine thread as the prompt's last chunk passes layer i, with the
        byte views of that layer's prompt blocks (CPU caches; for streaming KV layer by layer);
        `on_prefilled(kv)`: called on the engine thread once the prompt is computed, with a copy of
        its full blocks' KV from block `prefilled_from` on, shaped like an export (for a KV pool to
        keep what it lacks)."""
        if request_id in self._requests or request_id in self.scheduler.held:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        seq = prompt if isinstance(prompt, Sequence) else self.make_sequence(request_id, prompt,
                                                                             params or SamplingParams())
        seq.hold_blocks = hold_blocks
        if on_prefilled is not None:
            full = seq.num_prompt_tokens // self.config.block_size
            if full > prefilled_from:
                seq.on_prefilled = lambda s: on_prefilled(self.kv_cache.read_blocks(s.block_table[prefilled_from:full]))
        if layer_hook is not None:
            if self.device.type != "cpu":
                raise InvalidRequestError("layer-wise KV streaming needs a CPU KV cache")
            n_blocks = -(-seq.num_prompt_tokens // self.config.block_size)
            seq.layer_hook = lambda i: layer_hook(i, self.kv_cache.block_views(seq.block_table[:n_blocks],
                                                                               range(i, i + 1)))
        detok = IncrementalDetokenizer(self.tokenizer, seq.params)
        if first_token_ids:
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in first_token_ids):
                raise InvalidRequestError(f"first_token_ids must be integers in [0, {vocab})")
            if len(first_token_ids) >= seq.max_tokens:
                raise InvalidRequestError("first_token_ids already reach max_tokens: nothing left to generate")
            seq.token_ids.extend(first_token_ids)
            detok.add(list(first_token_ids))
            detok.skip_emitted()
        if kv is not None and kv.data is None:  # written in place into blocks from reserve_kv()
            if self._reserved.pop(request_id, None) is not seq:
                raise InvalidRequestError(f"request {request_id!r} has no reserved KV blocks")
            seq.num_imported_tokens = min(kv.num_tokens, seq.num_tokens - 1)
        elif kv is not None:
            self._check_import(seq, kv)
            seq.num_imported_tokens = min(kv.num_tokens, seq.num_tokens - 1)
            self._imports[request_id] = kv.data
        self._requests[request_id] = (seq, detok)
        self.scheduler.add(seq)

    def _check_import(self, seq: Sequence, kv: ImportedKV) -> None:
        expected = self.kv_cache.export_shape(-(-kv.num_tokens // self.config.block_size))
        if not 0 < kv.num_tokens <= seq.num_prompt_tokens:
            raise InvalidRequestError(
                f"imported KV covers {kv.num_tokens} tokens; the prompt has {seq.num_prompt_tokens}")
        if tuple(kv.data.shape) != expected:
            raise InvalidRequestError(f"imported KV has shape {tuple(kv.data.shape)}, expected {expected}")
        if kv.digest and kv.digest != tokens_digest(seq.token_ids[: kv.num_tokens]):
            raise InvalidRequestError("imported KV was computed from other tokens than this prompt's")

    def can_receive_in_place(self, seq: Sequence, num_tokens: int, dtype: str) -> bool:
        """Whether `reserve_kv` can ever succeed for this KV: a CPU cache of the same dtype, and
        a cache big enough for it (blocks may still be short now)."""
        return (self.device.type == "cpu" and dtype == self.dtype_name and 0 < num_tokens <= seq.num_prompt_tokens
                and not seq.block_table and -(-num_tokens // self.config.block_size) <= self.kv_cache.num_blocks)

    def reserve_kv(self, seq: Sequence, num_tokens: int, dtype: str) -> list[memoryview] | None:
        """Allocate `seq`'s blocks for `num_tokens` tokens of incoming KV and return their memory in
        export order, for a transport to receive into; then `add_request(seq, kv=ImportedKV(None,
        num_tokens, digest))`, or `unreserve` if the transfer fails. None when the cache is not on
        the CPU, the dtype differs, or blocks are short (the caller then imports a copy)."""
        if (self.device.type != "cpu" or dtype != self.dtype_name
                or not 0 < num_tokens <= seq.num_prompt_tokens or seq.block_table
                or not self.block_manager.can_allocate(seq, num_tokens)):
            return None
        self.block_manager.allocate(seq, num_tokens)
        self._reserved[seq.request_id] = seq
        return self.kv_cache.block_views(seq.block_table)

    def unreserve(self, request_id: str) -> None:
        seq = self._reserved.pop(request_id, None)
        if seq is not None:
            self.block_manager.free(seq)

    def abort(self, request_id: str) -> bool:
        """End a request now and free its blocks (held ones too). False if it is unknown."""
        self.unreserve(request_id)
        entry = self._requests.pop(request_id, None)
        self._imports.pop(request_id, None)
        if entry is None:
            return self.release(request_id)
        seq, _ = entry
        self.scheduler.finish(seq, "abort")
        self.runner.release(request_id)
        return True

    def release(self, request_id: str) -> bool:
        """Free the blocks a finished `hold_blocks` request kept for export."""
        return self.scheduler.release(request_id)

    @property
    def dtype_name(self) -> str:
        """The KV cache's dtype as the wire names it: float32, float16, bfloat16."""
        return str(self.dtype).removeprefix("torch.")

    @staticmethod
    def _computed(seq: Sequence, block_size: int) -> tuple[list[int], int, str]:
        """The blocks holding `seq`'s computed KV, how many tokens that is, and their digest."""
        n = seq.num_computed_tokens
        return seq.block_table[: -(-n // block_size)], n, tokens_digest(seq.token_ids[:n])

    def export_kv(self, request_id: str) -> ImportedKV:
        """Copy of the computed KV of a running or held request."""
        seq = self.scheduler.held.get(request_id) or self._requests.get(request_id, (None,))[0]
        if seq is None or not seq.block_table:
            raise InvalidRequestError(f"request {request_id!r} holds no KV blocks")
        blocks, n, digest = self._computed(seq, self.config.block_size)
        return ImportedKV(self.kv_cache.read_blocks(blocks), n, digest)

    def kv_views(self, request_id: str) -> tuple[list[memoryview], tuple[int, ...], str, int, str] | None:
        """A held request's KV as byte views of the cache itself (views, export shape, dtype name,
        tokens, digest), for sending without a copy; None when the cache is not on the CPU."""
        seq = self.scheduler.held.get(request_id)
        if seq is None or self.device.type != "cpu":
            return None
        blocks, n, digest = self._computed(seq, self.config.block_size)
        return (self.kv_cache.block_views(blocks), self.kv_cache.export_shape(len(blocks)), self.dtype_name, n,
                digest)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready)

    # ---- the step ----

    def step(self) -> list[RequestOutput]:
        outputs, self._ready = self._ready, []
        out = self.scheduler.schedule()
        for seq in out.imports:
            data = self._imports.pop(seq.request_id, None)
            if data is not None:  # None: the KV was received in place
                self.kv_cache.write_blocks(seq.block_table[: data.shape[BLOCK_DIM]], data)
        result = self.runner.execute(out)
        for seq, n in out.scheduled:
            if seq.on_prefilled is not None and seq.num_computed_tokens + n >= seq.num_prompt_tokens:
                seq.on_prefilled(seq)
                seq.on_prefilled = None
        for seq in self.scheduler.update(out, result.tokens):
            outputs.append(self._process(seq, result.logprobs.get(seq.request_id)))
        return outputs

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
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
            self.runner.release(seq.request_id)
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
            self.add_request(rid, seq)
        while self.has_unfinished():
            for o in self.step():
                c = done[o.request_id]
                c.token_ids += o.new_token_ids
                c.text += o.new_text
                c.logprobs += o.new_logprobs
                if o.finished:
                    c.finish_reason, c.num_cached_tokens = o.finish_reason, o.num_cached_tokens
        return [done[rid] for rid in ids]

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "held": len(self.scheduler.held),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "prefix_cache_queries": bm.queries,
            "prefix_cache_hits": bm.hits,
            "preemptions": self.scheduler.num_preemptions,
        }
