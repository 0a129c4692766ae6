"""Engine outputs as OpenAI response bodies and stream chunks (completions and chat), and errors as
OpenAI error objects."""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import JSONResponse

from disagg.engine.llm_engine import RequestOutput
from disagg.engine.sampler import TokenLogprob
from disagg.engine.sampling import SamplingParams
from disagg.model.tokenizer import Tokenizer
from disagg.serve.protocol import error_body, now, stream_chunk, usage, usage_chunk


class Formatter:
    """RequestOutputs -> OpenAI response bodies and stream chunks, for completions and chat."""

    def __init__(self, tokenizer: Tokenizer, rid: str, model: str, chat: bool, params: SamplingParams,
                 prompt_token_ids: list[int] | None = None, token_ids: bool = False) -> None:
        self.tok = tokenizer
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
