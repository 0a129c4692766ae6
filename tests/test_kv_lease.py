"""A decode worker whose cache is full waits for blocks and keeps the prefill's KV alive meanwhile.

Two real workers in one process (engines, KV port and client over loopback); the test decides
when the decode worker's cache frees up, so the wait is longer than the prefill's lease."""

from __future__ import annotations

import asyncio
import json
import time

from disagg.engine.async_engine import EngineRequest
from disagg.engine.config import EngineConfig
from disagg.engine.sampling import SamplingParams
from disagg.kv.params import KVTransferParams
from disagg.kv.tcp import TcpTransport
from disagg.serve.options import ServeOptions
from disagg.serve.protocol import CompletionRequest
from disagg.serve.worker import Worker

MODEL = "smollm2-135m"
LEASE = 1.0
PROMPT = ("In the quiet hours before dawn the lighthouse keeper climbed the spiral stairs, counting each "
          "step as his father had taught him, and wondered whether the ships")


async def _ready(*workers: Worker) -> None:
    for w in workers:
        await w.start()
    deadline = time.monotonic() + 120
    while not all(w.engine is not None for w in workers):
        assert time.monotonic() < deadline, "workers did not load"
        assert not any(w.load_error for w in workers)
        await asyncio.sleep(0.05)


async def _complete(worker: Worker, **body) -> dict:
    req = CompletionRequest.model_validate({"model": MODEL, "prompt": PROMPT, "temperature": 0, **body})
    return json.loads((await worker.handle(req, chat=False)).body)


def test_a_queued_decode_renews_the_lease_and_pulls_after_it_would_have_expired():
    async def main():
        prefill = Worker(EngineConfig(model=MODEL, kv_cache_memory="64MiB", device="cpu", threads=1),
                         ServeOptions(role="prefill", kv_lease=LEASE))
        decode = Worker(EngineConfig(model=MODEL, kv_cache_memory="8MiB", device="cpu", threads=1),
                        ServeOptions(role="decode", kv_lease=30))
        await _ready(prefill, decode)
        try:
            reference = await _complete(prefill, max_tokens=8, ignore_eos=True)
            need = -(-reference["usage"]["prompt_tokens"] // 16)
            # fill the decode cache with held blocks until the prompt's KV no longer fits
            total = await decode.engine.call(lambda e: e.kv_cache.num_blocks)
            blocker = [1000 + i for i in range((total - need + 1) * 16)]
            hold = EngineRequest("blocker", blocker, SamplingParams(max_tokens=1, ignore_eos=True),
                                 KVTransferParams(do_remote_decode=True))
            async for _ in decode.engine.generate(hold):
                pass
            free = await decode.engine.call(lambda e: e.kv_cache.num_blocks - e.stats()["kv_blocks_used"])
            assert free < need

            held = await _complete(prefill, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
            t_held = time.monotonic()
            kvp = held["kv_transfer_params"]
            waiting = asyncio.create_task(_complete(decode, max_tokens=8, ignore_eos=True, kv_transfer_params=kvp))
            deadline = time.monotonic() + 30
            while time.monotonic() - t_held < 2 * LEASE or prefill.metrics.kv_lease_renewals._value.get() < 3:
                assert time.monotonic() < deadline, "the decode request did not wait"
                assert not waiting.done()
                await asyncio.sleep(0.05)
            assert await asyncio.to_thread(TcpTransport().release, decode.kv.port.address, "blocker")
            out = await asyncio.wait_for(waiting, 60)
            return reference, held, out, prefill.metrics, decode.metrics
        finally:
            await prefill.stop()
            await decode.stop()

    reference, held, out, pm, dm = asyncio.run(main())
    assert held["choices"][0]["text"] + out["choices"][0]["text"] == reference["choices"][0]["text"]
    assert pm.kv_leases_expired._value.get() == 0
    assert dm.kv_pull_failures._value.get() == 0
    assert dm.kv_bytes_received._value.get() == pm.kv_bytes_sent._value.get() > 0
