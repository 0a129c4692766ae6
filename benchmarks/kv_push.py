"""Layer-wise KV push against pull, on long prompts over an emulated link (labelled EMULATED).

Same 1P1D cluster shape, same prompts, both modes in the same run. Token 1 comes from the prefill
worker in both; what the push changes is when decode can start, so the number that matters is
the time to token 2 (the first token decode produces): with a pull it waits for prefill and then
the whole transfer, with a push only for the last layer's share of it.

    .venv/bin/python benchmarks/kv_push.py [--prompt-tokens 2048] [--requests 6] [--links 10gbit,1gbit]
        [--baseline-src /tmp/base/src]   # another checkout, measured in the same run
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from rich.console import Console
from rich.table import Table

from baseline import use_src
from disagg.engine.config import EngineConfig
from disagg.kv.layout import format_bytes, kv_bytes_per_token
from disagg.model.presets import PRESETS
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions


def token_times(url: str, prompt: list[int]) -> tuple[float, float]:
    """(time to token 1, time to token 2), seconds, from the streamed chunks."""
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    seen: list[float] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"text":"' in line:
                seen.append(time.perf_counter() - t0)
    return seen[0], seen[1]


def measure(link: str, push: bool, engine: EngineConfig, args: argparse.Namespace,
            src: str | None) -> list[tuple[float, float]]:
    """(token 1, token 2) times of each request after a warm-up, on a fresh 1P1D cluster."""
    emulated = link != "none"
    opts = UpOptions(arch="disaggregated", budget=2, port=free_port(), kv_push=push,
                     kv_bandwidth=link if emulated else None, kv_latency="20us" if emulated else None,
                     **NO_KV_POOL)  # every request's KV computed and moved, none read from a pool
    with use_src(src), Cluster(opts, engine).start() as cluster:
        return [token_times(cluster.url, [100 + (i * 7 + j) % 40000 for j in range(args.prompt_tokens)])
                for i in range(args.requests + 1)][1:]  # the first is a warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--links", default="10gbit,1gbit", help="emulated link rates to compare on (none: loopback "
                                                            "as is)")
    ap.add_argument("--baseline-src", help="another checkout's src/ directory to measure in the same run")
    args = ap.parse_args()
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="1GiB", max_num_batched_tokens=4096,
                          enable_prefix_caching=False)
    kv = kv_bytes_per_token(PRESETS[args.model].config, "fp32") * args.prompt_tokens if args.model in PRESETS else 0
    table = Table(title=f"KV push vs pull, 1P1D, {args.model}, {args.prompt_tokens}-token prompts (KV "
                        f"{format_bytes(kv)}), {args.requests} sequential requests each")
    for col in ("link", "code", "mode", "token 1 p50 ms", "token 2 p50 ms", "token 2 - token 1 p50 ms"):
        table.add_column(col, justify="right")
    codes = [("baseline", args.baseline_src)] if args.baseline_src else []
    codes.append(("this checkout", None))
    for link in args.links.split(","):
        where = f"EMULATED {link}" if link != "none" else "loopback, not emulated"
        gaps = {}
        for code, src in codes:
            for push in (False, True):
                times = measure(link, push, engine, args, src)
                gaps[code, push] = statistics.median(t[1] - t[0] for t in times)
                t1, t2 = (statistics.median(t[k] for t in times) for k in (0, 1))
                table.add_row(where, code, "push" if push else "pull", f"{1000 * t1:.0f}", f"{1000 * t2:.0f}",
                              f"{1000 * gaps[code, push]:.0f}")
            table.add_row("", code, "push saves", "", "", f"{1000 * (gaps[code, False] - gaps[code, True]):.0f}")
    Console(width=140).print(table)
    if args.baseline_src:
        for push in (False, True):
            mode = "push" if push else "pull"
            print(f"handoff ({mode}, {args.links}): {1000 * gaps['this checkout', push]:.0f} ms vs baseline "
                  f"{1000 * gaps['baseline', push]:.0f} ms "
                  f"({gaps['this checkout', push] / gaps['baseline', push]:.2f}x)")


if __name__ == "__main__":
    main()
