"""Sends benchmark requests to any OpenAI-compatible server and time-stamps every streamed chunk.

Requests go to /v1/completions with the prompt as token ids (vLLM, SGLang, llama.cpp and ours
accept them), `stream: true` and `stream_options.include_usage`, so token counts come from the
server's own usage report; a server that sends none is counted by chunks with text.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from disagg.metrics import RequestRecord


class BenchClient:
    def __init__(self, base_url: str, model: str | None, timeout: float = 600.0, ignore_eos: bool = True,
                 api_key: str | None = None) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"
        self.model, self.ignore_eos = model, ignore_eos
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), headers=headers,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=1024))
        self.t0 = time.perf_counter()

    async def aclose(self) -> None:
        await self.http.aclose()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def send(self, prompt: list[int], max_tokens: int) -> tuple[RequestRecord, list[int] | str]:
        """One streamed request; returns its record and what it generated: token ids where the
        server returns them (vLLM's return_token_ids), else text."""
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if self.model:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        rec = RequestRecord(prompt_tokens=len(prompt), sent=self.now())
        text: list[str] = []
        ids: list[int] | None = None
        usage = None
        try:
            async with self.http.stream("POST", self.url, json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    raise RuntimeError(f"HTTP {resp.status_code}: {detail}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(str(chunk["error"].get("message", chunk["error"]))[:300])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        if choice.get("text"):
                            rec.chunk_times.append(self.now())
                            text.append(choice["text"])
                        if isinstance(choice.get("token_ids"), list):
                            ids = (ids or []) + [int(t) for t in choice["token_ids"]]
            rec.end = self.now()
            rec.output_tokens = int(usage["completion_tokens"]) if usage else len(rec.chunk_times)
            if usage and usage.get("prompt_tokens"):
                rec.prompt_tokens = int(usage["prompt_tokens"])
            rec.ok = True
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError, TypeError) as e:
            rec.end = self.now()
            rec.error = str(e) or type(e).__name__
        return rec, ids if ids is not None else "".join(text)
