"""A test double for `disagg bench`: an OpenAI-style completions server with scripted timings. It
streams max_tokens tokens, the first TTFT seconds after the request, then one every GAP, and
reports usage. Run: python scripted_server.py PORT TTFT GAP."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse


def app(ttft: float, gap: float) -> FastAPI:
    api = FastAPI()

    @api.get("/v1/models")
    async def models():
        return {"data": [{"id": "scripted", "vocab_size": 50000}]}

    @api.post("/v1/completions")
    async def completions(body: dict):
        n = body["max_tokens"]
        start = time.perf_counter()

        async def stream():
            for i in range(n):
                await asyncio.sleep(max(0.0, start + ttft + i * gap - time.perf_counter()))
                yield f'data: {json.dumps({"choices": [{"index": 0, "text": f"t{i} "}]})}\n\n'.encode()
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n,
                     "total_tokens": len(body["prompt"]) + n}
            yield f'data: {json.dumps({"choices": [], "usage": usage})}\n\n'.encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return api


if __name__ == "__main__":
    port, ttft, gap = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    uvicorn.run(app(ttft, gap), host="127.0.0.1", port=port, log_level="warning")
