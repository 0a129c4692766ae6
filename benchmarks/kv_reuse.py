"""KV reuse: the pool and prefix-aware routing on a shared-prefix and a multi-turn workload.

Shared prefix (2 replicas on 2 cores): a long system prompt followed by short questions, sent
through the `disagg bench` client and runner, closed loop. Four clusters, same requests:
  no reuse        prefix caching off, no pool, round-robin
  prefix cache    each engine's own prefix cache, round-robin (each replica computes the prefix once)
  defaults        `disagg up` as shipped: prefix-aware routing on the workers' reported block hashes,
                  memory + disk pool
  restarted       the defaults again over the same pool directory: memory empty, disk tier warm

Multi-turn: sessions whose turns alternate long and short new messages; every turn sends the whole
history (answers as the token ids the server returned). On 1 worker, with reuse TTFT should follow
the new turn's length, without it the whole history's. On 2 replicas with two sessions at a time,
round-robin sends a session's next turn to the replica that lacks its history; the defaults send
it where the history is (or load it from the shared pool).

    .venv/bin/python benchmarks/kv_reuse.py [--prefix-len 1024] [--question-len 64] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from disagg.bench.client import BenchClient
from disagg.bench.runner import Load, run_load
from disagg.bench.workloads import Session, Turn, WorkloadSpec, generate
from disagg.engine.config import EngineConfig
from disagg.metrics import RequestRecord, summarize
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions


def run(opts: UpOptions, engine: EngineConfig, sessions: list[Session], concurrency: int) -> list[RequestRecord]:
    with Cluster(replace(opts, port=free_port()), engine).start() as cluster:
        async def go() -> list[RequestRecord]:
            client = BenchClient(cluster.url, None)
            try:
                return (await run_load(client, sessions, Load(concurrency=concurrency)))[0]
            finally:
                await client.aclose()

        records = asyncio.run(go())
    failed = [r.error for r in records if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: {failed[0]}")
    return records


def shared_prefix(args: argparse.Namespace, engine: EngineConfig, console: Console) -> None:
    spec = WorkloadSpec(name="shared-prefix", num_prompts=args.requests, input_len=str(args.question_len),
                        output_len=str(args.output_len), prefix_len=args.prefix_len, seed=1)
    sessions = generate(spec)
    pool = tempfile.mkdtemp(prefix="disagg-kv-reuse-")
    base = UpOptions(arch="replicated", budget=2, kv_pool_dir=pool)
    none = {"routing": "round-robin"} | NO_KV_POOL
    configs = [("no reuse", replace(base, **none), replace(engine, enable_prefix_caching=False)),
               ("prefix cache, round-robin", replace(base, **none), engine),
               ("defaults: prefix routing + pool", base, engine),
               ("defaults, restarted (disk tier warm)", base, engine)]
    table = Table(title=f"Shared prefix: {args.prefix_len}-token system prompt + {args.question_len}-token "
                        f"questions, {args.output_len} out, {args.requests} requests, 2 replicas, concurrency 2")
    for col in ("cluster", "TTFT p50 ms", "TTFT p90 ms", "p50 vs no reuse", "output tok/s"):
        table.add_column(col, justify="right")
    reference = None
    for name, opts, eng in configs:
        records = run(opts, eng, sessions, concurrency=2)
        s = summarize(records, max(r.end for r in records) - min(r.sent for r in records))
        reference = reference or s["median_ttft_ms"]
        table.add_row(name, f"{s['median_ttft_ms']:.0f}", f"{s['p90_ttft_ms']:.0f}",
                      f"{reference / s['median_ttft_ms']:.1f}x lower", f"{s['output_throughput']:.1f}")
        console.print(f"  done: {name}")
    console.print(table)


def multi_turn(args: argparse.Namespace, engine: EngineConfig, console: Console) -> None:
    news = [256, 32, 256, 32, 256]
    turns = len(news)
    sessions = [Session(tuple(Turn(tuple(range(1000 + 7 * s + 1000 * t, 1000 + 7 * s + 1000 * t + n)), args.answer_len)
                              for t, n in enumerate(news))) for s in range(args.sessions)]

    def run_turns(opts: UpOptions, eng: EngineConfig, concurrency: int) -> tuple[list[float], list[int]]:
        records = run(opts, eng, sessions, concurrency=concurrency)
        by_prompt = {}
        for r in records:  # a turn is known by its prompt length (history + new), the same in every session
            by_prompt.setdefault(r.prompt_tokens, []).append(r.ttft)
        lengths = sorted(by_prompt)
        return [statistics.median(by_prompt[n]) * 1000 for n in lengths], lengths

    pool = tempfile.mkdtemp(prefix="disagg-kv-reuse-")
    single = UpOptions(arch="single", budget=1, kv_pool_dir=pool)
    with_reuse, lengths = run_turns(single, engine, 1)
    without, _ = run_turns(replace(single, **NO_KV_POOL), replace(engine, enable_prefix_caching=False), 1)
    table = Table(title=f"Multi-turn, 1 worker: {args.sessions} sessions one after another, each turn adds the "
                        f"new tokens below + a {args.answer_len}-token answer; TTFT p50 ms")
    for col in ("turn", "history tokens", "new tokens", "TTFT with reuse", "TTFT without", "without / with"):
        table.add_column(col, justify="right")
    for t in range(turns):
        a, b = with_reuse[t], without[t]
        table.add_row(str(t + 1), str(lengths[t] - news[t]), str(news[t]), f"{a:.0f}", f"{b:.0f}", f"{b / a:.1f}x")
    console.print(table)

    replicated = UpOptions(arch="replicated", budget=2, kv_pool_dir=tempfile.mkdtemp(prefix="disagg-kv-reuse-"))
    rr, _ = run_turns(replace(replicated, routing="round-robin", **NO_KV_POOL), engine, 2)
    defaults, _ = run_turns(replicated, engine, 2)
    table = Table(title=f"Multi-turn, 2 replicas, 2 sessions at a time ({args.sessions} in all); TTFT p50 ms")
    for col in ("turn", "history tokens", "new tokens", "round-robin, prefix cache only", "defaults", "ratio"):
        table.add_column(col, justify="right")
    for t in range(turns):
        table.add_row(str(t + 1), str(lengths[t] - news[t]), str(news[t]), f"{rr[t]:.0f}", f"{defaults[t]:.0f}",
                      f"{rr[t] / defaults[t]:.1f}x")
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--question-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--sessions", type=int, default=4, help="multi-turn sessions (use an even number)")
    ap.add_argument("--answer-len", type=int, default=32)
    ap.add_argument("--only", choices=("shared-prefix", "multi-turn"))
    args = ap.parse_args()
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="512MiB")
    console = Console()
    if args.only != "multi-turn":
        shared_prefix(args, engine, console)
    if args.only != "shared-prefix":
        multi_turn(args, engine, console)


if __name__ == "__main__":
    main()
