"""`disagg calibrate [--url URL]`: measure this machine's engine (or a running server) and fit the
cost model's factors, so `disagg plan --hardware this-machine` predicts it.

Prefill is timed at several prompt lengths (one request each, fresh tokens), decode steps at
several batch sizes (steps where every sequence of the batch is decoding). Through a server
(`--url`), prefill is TTFT at concurrency 1 and a decode step is TPOT with the batch in flight,
HTTP included. The fit, per the cost
model (sim/cost.py) with memory and compute adding up: decode step = bytes / bandwidth + FLOPs /
decode FLOP/s (least squares over the batches); prefill = the weights' read + matmul FLOPs /
prefill FLOP/s + attention FLOPs / attention FLOP/s, chunk by chunk (least squares over lengths).
The KV link is this machine's loopback as the TCP transport moves it. The profile is a TOML
catalog file (sim/hardware.py) with `this-machine` entries.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from disagg.engine.config import EngineConfig
from disagg.parsing import parse_ints
from disagg.sim.model import ModelSpec
from disagg.sim.options import CalibrateOptions
from disagg.sim.planner import DEFAULT_PROFILE


def _prefill_time(engine: Any, n: int, rng: random.Random) -> float:
    from disagg.engine.sampling import SamplingParams

    vocab = engine.model_config.vocab_size
    ids = [rng.randrange(min(1000, vocab // 8), vocab) for _ in range(n)]
    t0 = time.perf_counter()
    engine.add_request(f"p{rng.random()}", ids, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def _decode_step_time(engine: Any, batch: int, context: int, rng: random.Random, steps: int = 24) -> float:
    from disagg.engine.sampling import SamplingParams

    vocab = engine.model_config.vocab_size
    for i in range(batch):
        ids = [rng.randrange(min(1000, vocab // 8), vocab) for _ in range(context)]
        engine.add_request(f"d{batch}-{i}-{rng.random()}", ids, SamplingParams(max_tokens=steps + 2, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        all_decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running) and \
            len(engine.scheduler.running) == batch and not engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        if all_decoding:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(engine: Any, opts: CalibrateOptions) -> dict[str, Any]:
    rng = random.Random(0)
    _prefill_time(engine, 64, rng)  # warm-up
    prefill = {n: statistics.median(_prefill_time(engine, n, rng) for _ in range(3))
               for n in parse_ints(opts.lengths, "lengths")}
    decode = {b: _decode_step_time(engine, b, opts.decode_context, rng) for b in parse_ints(opts.batches, "batches")}
    return {"prefill": prefill, "decode": decode}


def _lstsq2(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Non-negative least squares of t = a x + b y over (a, b, t) rows."""
    saa = sum(a * a for a, _, _ in rows)
    sbb = sum(b * b for _, b, _ in rows)
    sab = sum(a * b for a, b, _ in rows)
    sat = sum(a * t for a, _, t in rows)
    sbt = sum(b * t for _, b, t in rows)
    det = saa * sbb - sab * sab
    if det > 0:
        x, y = (sat * sbb - sbt * sab) / det, (sbt * saa - sat * sab) / det
        if x > 0 and y > 0:
            return x, y
    # one of them is not measurable here: fit the other alone
    x, y = sat / saa if saa else 0.0, sbt / sbb if sbb else 0.0
    err_x = sum((t - a * x) ** 2 for a, _, t in rows)
    err_y = sum((t - b * y) ** 2 for _, b, t in rows)
    return (x, 1e-30) if err_x <= err_y else (1e-30, y)


def measure_url(url: str, opts: CalibrateOptions, vocab: int) -> dict[str, Any]:
    import asyncio

    from disagg.bench.client import BenchClient

    rng = random.Random(0)
    lo = min(1000, vocab // 8)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(lo, vocab) for _ in range(n)]

    async def run() -> dict[str, Any]:
        client = BenchClient(url, None)
        try:
            await client.send(prompt(64), 2)  # warm-up
            prefill = {}
            for n in parse_ints(opts.lengths, "lengths"):
                recs = [(await client.send(prompt(n), 1))[0] for _ in range(3)]
                prefill[n] = statistics.median(r.ttft for r in recs if r.ok)
            decode = {}
            for b in parse_ints(opts.batches, "batches"):
                got = await asyncio.gather(*(client.send(prompt(opts.decode_context), 33) for _ in range(b)))
                decode[b] = statistics.median(r.tpot for r, _ in got if r.ok and r.tpot)
            return {"prefill": prefill, "decode": decode}
        finally:
            await client.aclose()

    return asyncio.run(run())


def fit(spec: ModelSpec, dtype: str, measured: dict[str, Any], token_budget: int, context: int) -> dict[str, float]:
    """Seconds per byte and per FLOP of this engine, with memory and compute adding up (a CPU does
    not hide one behind the other the way a GPU does)."""
    weights, kv = spec.weight_bytes(dtype), spec.kv_bytes_per_token(dtype)
    mm = spec.matmul_flops_per_token
    per_byte, per_decode_flop = _lstsq2([
        (weights + b * context * kv, b * (mm + spec.attention_flops(1, context)), t)
        for b, t in measured["decode"].items()])
    rows = []
    for n, t in measured["prefill"].items():
        mem = matmul = attn = 0.0
        done = 0
        while done < n:  # the engine's chunks
            k = min(token_budget, n - done)
            mem += (weights + done * kv) * per_byte
            matmul += k * mm
            attn += spec.attention_flops(k, done)
            done += k
        rows.append((matmul, attn, max(t - mem, 1e-9)))
    per_flop, per_attn_flop = _lstsq2(rows)
    return {"prefill_flops": 1 / per_flop, "attn_flops": 1 / per_attn_flop, "bandwidth": 1 / per_byte,
            "decode_flops": 1 / per_decode_flop}


def profile_toml(factors: dict[str, float], link_bw: float, kind: str, source: str) -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 16e9
    f = factors["prefill_flops"]
    return f"""# written by disagg calibrate: {source}
[device.this-machine]
kind = "{kind}"
flops = {{ fp32 = {f:.6g}, bf16 = {f:.6g}, fp16 = {f:.6g} }}
mem_bw = {factors['bandwidth']:.6g}
mem_bytes = {mem:.6g}
mfu = 1.0
decode_mfu = {factors['decode_flops'] / f:.6g}
attn_mfu = {factors['attn_flops'] / f:.6g}
bw_util = 1.0
step_overhead = 0.0
overlap = false
source = "{source}"

[link.this-machine-loopback]
bandwidth = {link_bw:.6g}
latency = 1e-4
source = "{source}: the TCP KV transport over loopback, 64 MiB pulls"
"""


def main(opts: CalibrateOptions, engine_config: EngineConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from disagg.bench.options import TransferBenchOptions
    from disagg.bench.transfer import run as transfer_run
    from disagg.engine.llm_engine import LLMEngine
    from disagg.sim.cost import Efficiency, WorkerCost
    from disagg.sim.hardware import load_catalog

    if opts.url:
        from disagg.bench.bench import server_info
        from disagg.model.loader import resolve

        server_info(opts.url, None)  # a clear error if nothing answers
        spec = ModelSpec(resolve(engine_config.model).config)
        dtype = "float32" if engine_config.device in ("cpu", "auto") else "bfloat16"
        measured = measure_url(opts.url, opts, spec.config.vocab_size)
        device_type, threads = "server", "server's"
    else:
        engine = LLMEngine(engine_config)
        spec = ModelSpec(engine.model_config)
        dtype = engine.dtype_name
        measured = measure(engine, opts)
        device_type, threads = engine.device.type, engine_config.threads or "default"
    factors = fit(spec, dtype, measured, engine_config.max_num_batched_tokens, opts.decode_context)
    link_bw = transfer_run(TransferBenchOptions(sizes="64M", repeats=5))[0]["gbps"] * 1e9
    source = (f"disagg calibrate on {time.strftime('%Y-%m-%d')}, model {spec.name}, {dtype}, threads {threads}, "
              f"device {device_type}" + (f", through {opts.url}" if opts.url else ""))
    out = Path(opts.out) if opts.out else DEFAULT_PROFILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_toml(factors, link_bw, "gpu" if device_type == "cuda" else "cpu", source))
    devices, _ = load_catalog(out)
    dev = devices["this-machine"]
    cost = WorkerCost(spec, dev, dtype if dtype in dev.flops else "fp32", Efficiency.of(dev))
    table = Table(title=f"calibration of {spec.name} ({dtype}, threads {threads}): measured vs the fitted model")
    for col in ("what", "measured ms", "model ms", "error"):
        table.add_column(col, justify="right")
    for n, t in measured["prefill"].items():
        model_t = cost.prefill_time(n, engine_config.max_num_batched_tokens)
        table.add_row(f"prefill {n} tokens", f"{1000 * t:.1f}", f"{1000 * model_t:.1f}",
                      f"{100 * (model_t / t - 1):+.0f}%")
    for b, t in measured["decode"].items():
        model_t = cost.decode_step_time(b, opts.decode_context)
        table.add_row(f"decode step, batch {b}", f"{1000 * t:.1f}", f"{1000 * model_t:.1f}",
                      f"{100 * (model_t / t - 1):+.0f}%")
    console = Console(width=120)
    console.print(table)
    console.print(f"prefill matmuls {factors['prefill_flops'] / 1e9:.1f} GFLOP/s, attention "
                  f"{factors['attn_flops'] / 1e9:.1f} GFLOP/s, decode bandwidth "
                  f"{factors['bandwidth'] / 1e9:.1f} GB/s, decode matmuls {factors['decode_flops'] / 1e9:.1f} GFLOP/s, "
                  f"KV link {link_bw / 1e9:.2f} GB/s")
    console.print(f"profile: {out}  (disagg plan --hardware this-machine --link this-machine-loopback --dtype {dtype})")
    return 0
