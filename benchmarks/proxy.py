"""The proxy's added latency: the same streaming requests sent to a worker directly and through
`disagg proxy --mode single`, alternating rounds, in the same run.

    .venv/bin/python benchmarks/proxy.py [--model smollm2-135m] [--concurrency 8] [--rounds 6]

Prints p50/p99 of end-to-end latency, time to first chunk and gaps between chunks, each direct and
proxied, with the difference. The worker is pinned to core 0; the proxy runs where the OS puts it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import httpx
from rich.console import Console
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.metrics import percentile
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import UpOptions


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float, list[float]]:
    """(end-to-end s, first chunk s, gaps between chunks s) of one streamed request."""
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    return end - t0, stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


async def measure(direct: str, proxied: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    body = {"prompt": "Tell me a long story about a lighthouse keeper.", "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    out = {name: {"e2e": [], "first": [], "gap": []} for name in ("direct", "proxy")}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(*(one(client, u, body) for u in (direct, proxied)))  # warm-up
        for r in range(args.rounds):
            order = [("direct", direct), ("proxy", proxied)] if r % 2 == 0 else [("proxy", proxied), ("direct", direct)]
            for name, url in order:
                results = await asyncio.gather(*(one(client, url, body) for _ in range(args.concurrency)))
                for e2e, first, gaps in results:
                    out[name]["e2e"].append(e2e)
                    out[name]["first"].append(first)
                    out[name]["gap"].extend(gaps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    cluster = Cluster(UpOptions(arch="single", budget=1, port=free_port()),
                      EngineConfig(model=args.model, device="cpu", kv_cache_memory="512MiB")).start()
    try:
        worker = next(iter(cluster.worker_urls().values()))
        res = asyncio.run(measure(worker, cluster.url, args))
    finally:
        cluster.stop()
    table = Table(title=f"proxy overhead: {args.model}, {args.concurrency} concurrent streams x {args.rounds} rounds, "
                        f"{args.max_tokens} tokens each")
    for col in ("metric", "direct p50 ms", "proxy p50 ms", "added p50 ms", "direct p99 ms", "proxy p99 ms",
                "added p99 ms"):
        table.add_column(col, justify="right")
    for key, label in (("e2e", "end-to-end"), ("first", "first chunk"), ("gap", "chunk gap")):
        d, p = res["direct"][key], res["proxy"][key]
        d50, p50, d99, p99 = percentile(d, 50), percentile(p, 50), percentile(d, 99), percentile(p, 99)
        row = [d50, p50, p50 - d50, d99, p99, p99 - d99]
        table.add_row(label, *(f"{1000 * v:.2f}" for v in row))
    Console(width=120).print(table)
    d50, p50 = statistics.median(res["direct"]["e2e"]), statistics.median(res["proxy"]["e2e"])
    print(f"added end-to-end latency at p50: {1000 * (p50 - d50):.2f} ms = {100 * (p50 - d50) / d50:.2f}% "
          f"(targets: < 1 ms, < 2%)")


if __name__ == "__main__":
    main()
