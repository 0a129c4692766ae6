"""The async front: concurrent streams, aborts on disconnect, errors in the caller."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conftest import make_engine
from disagg.engine.async_engine import AsyncEngine, EngineRequest
from disagg.engine.sampling import SamplingParams
from disagg.errors import InvalidRequestError

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["first prompt", "a second, longer prompt than the first", "3", "four four four four"]


@pytest.fixture
def front():
    engine = make_engine(model="tiny", kv_cache_memory="4MiB")
    f = AsyncEngine(engine)
    yield f
    f.shutdown()


def request(prompt: str, params: SamplingParams = PARAMS) -> EngineRequest:
    return EngineRequest(f"r-{prompt[:20]}-{id(params)}", prompt, params)


async def collect(front: AsyncEngine, prompt: str) -> list[int]:
    tokens: list[int] = []
    async for out in front.generate(request(prompt)):
        tokens += out.new_token_ids
    return tokens


def test_concurrent_streams_equal_the_sync_engine(front):
    async def main():
        return await asyncio.gather(*(collect(front, p) for p in PROMPTS))

    got = asyncio.run(main())
    reference = make_engine(model="tiny", kv_cache_memory="4MiB").generate(PROMPTS, PARAMS)
    assert got == [c.token_ids for c in reference]


def test_closing_a_stream_aborts_the_request_and_frees_blocks(front):
    async def main():
        long = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        stream = front.generate(request("abandoned", long))
        async with contextlib.aclosing(stream):
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
        return await front.call(lambda e: e.stats())

    stats = asyncio.run(main())
    # the abort is queued before the stats call, and the engine thread runs commands in order
    assert stats["running"] == 0
    assert stats["kv_blocks_used"] == 0


def test_bad_input_raises_in_the_caller(front):
    async def main():
        async for _ in front.generate(request("")):
            pass

    with pytest.raises(InvalidRequestError):
        asyncio.run(main())
    assert front.alive
