"""Decode-request TTFT in a busy 1P1D cluster: how long a decode worker takes from receiving a
request (with the prefill's KV to pull) to its first token, while `--concurrency` requests run.

What it measures, per cluster: at the client, the time from token 1 (streamed by the proxy as soon
as prefill answers) to token 2 (the decode worker's first): the decode request's whole path, the
KV pull and every wait for an engine included. That is the number to compare across versions. It
also shows the decode worker's own TTFT histogram, whose clock starts wherever that version's
worker starts it (this one: on the request's arrival; before the KV connector, after the pull).

`--baseline-src DIR` runs the same load, in the same run, against another checkout's `src/` (the
workers and proxy import it), e.g. one made with `git worktree add /tmp/base <commit>`, and prints
the ratio: the reference for a change to the decode path.

    .venv/bin/python benchmarks/decode_ttft.py [--concurrency 8] [--requests 48] [--baseline-src /tmp/base/src]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from dataclasses import replace

import httpx
from rich.console import Console
from rich.table import Table

from baseline import use_src
from disagg.engine.config import EngineConfig
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions


def ttft_histogram(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = float(re.search(r"^disagg_time_to_first_token_seconds_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^disagg_time_to_first_token_seconds_count (\S+)$", text, re.M).group(1))
    return total, count


async def one(client: httpx.AsyncClient, url: str, prompt: list[int], out: int) -> float:
    """Seconds from token 1 to token 2 of one streamed request."""
    seen: list[float] = []
    body = {"prompt": prompt, "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and '"text":"' in line:
                seen.append(time.perf_counter())
    return seen[1] - seen[0]


async def load(url: str, prompts: list[list[int]], concurrency: int, out: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def limited(p: list[int]) -> float:
            async with gate:
                return await one(client, url, p, out)

        return await asyncio.gather(*(limited(p) for p in prompts))


def measure(opts: UpOptions, engine: EngineConfig, args: argparse.Namespace, src: str | None) -> dict[str, float]:
    with use_src(src), Cluster(replace(opts, port=free_port()), engine).start() as cluster:
        decode = next(u for n, u in cluster.worker_urls().items() if n.startswith("decode"))
        prompts = [[100 + (i * 13 + j) % 40000 for j in range(args.prompt_tokens)]
                   for i in range(args.requests + args.concurrency)]
        asyncio.run(load(cluster.url, prompts[: args.concurrency], args.concurrency, args.output_tokens))  # warm-up
        s0, n0 = ttft_histogram(decode)
        gaps = asyncio.run(load(cluster.url, prompts[args.concurrency :], args.concurrency, args.output_tokens))
        s1, n1 = ttft_histogram(decode)
    gaps.sort()
    return {"decode_ttft_ms": 1000 * (s1 - s0) / (n1 - n0), "gap_p50_ms": 1000 * statistics.median(gaps),
            "gap_p90_ms": 1000 * gaps[int(0.9 * (len(gaps) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--baseline-src", help="another checkout's src/ directory to measure in the same run")
    args = ap.parse_args()
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="512MiB", enable_prefix_caching=False)
    opts = UpOptions(arch="disaggregated", budget=2, **NO_KV_POOL)
    rows = []
    if args.baseline_src:
        rows.append((f"baseline ({args.baseline_src})", measure(opts, engine, args, args.baseline_src)))
    rows.append(("this checkout", measure(opts, engine, args, None)))
    table = Table(title=f"1P1D decode-request TTFT, {args.model}, {args.prompt_tokens}-token prompts, "
                        f"{args.output_tokens} out, concurrency {args.concurrency}, {args.requests} requests")
    for col in ("code", "decode worker's own TTFT mean ms", "token 1 -> 2 p50 ms", "token 1 -> 2 p90 ms"):
        table.add_column(col, justify="right")
    for name, r in rows:
        table.add_row(name, f"{r['decode_ttft_ms']:.1f}", f"{r['gap_p50_ms']:.1f}", f"{r['gap_p90_ms']:.1f}")
    Console(width=140).print(table)
    if len(rows) == 2:
        base, now = rows[0][1], rows[1][1]
        print(f"token 1 -> 2 p50: {now['gap_p50_ms']:.1f} ms vs baseline {base['gap_p50_ms']:.1f} ms "
              f"({now['gap_p50_ms'] / base['gap_p50_ms']:.2f}x); p90 {now['gap_p90_ms']:.1f} vs "
              f"{base['gap_p90_ms']:.1f} ms ({now['gap_p90_ms'] / base['gap_p90_ms']:.2f}x)")


if __name__ == "__main__":
    main()
