"""KV bytes moved per turn of a multi-turn conversation in a disaggregated (1P1D) cluster.

Each turn sends the whole history (the earlier prompts and the answers the server returned, as
token ids) plus a new message. The decode worker holds the history already (its prefix cache kept
the blocks it received and generated last turn), so it asks the prefill worker only for the blocks
it lacks. The reference, measured in the same run: a cluster that cannot reuse what it holds
(prefix caching off, no pool), whose decode worker receives the whole prompt every turn, as every
decode worker did before it said what it held. With the defaults the decode worker also loads from
the KV pool the prefill worker writes (a shared disk directory): the blocks it lacks that the
prefill's pool write has already stored come from there, not over the KV port. Bytes read from the
pool are not counted as received (disagg_kv_pool_read_bytes counts them).

    .venv/bin/python benchmarks/disagg_multi_turn.py [--turns 6] [--sessions 3] [--new 256,32]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from dataclasses import replace

import httpx
from rich.console import Console
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions
from disagg.units import format_bytes


def received(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return float(re.search(r"^disagg_kv_bytes_received_total (\S+)$", text, re.M).group(1))


def conversation(cluster: Cluster, session: int, news: list[int], answer: int) -> list[tuple[int, float, float]]:
    """(prompt tokens, KV bytes the decode worker received, seconds) of each turn."""
    decode = next(u for n, u in cluster.worker_urls().items() if n.startswith("decode"))
    history: list[int] = []
    turns = []
    for t, n in enumerate(news):
        history += [100 + (97 * session + 31 * t + j) % 40000 for j in range(n)]  # the new message
        before = received(decode)
        t0 = time.perf_counter()
        r = httpx.post(cluster.url + "/v1/completions", timeout=600, json={
            "prompt": history, "max_tokens": answer, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        r.raise_for_status()
        seconds = time.perf_counter() - t0
        turns.append((len(history), received(decode) - before, seconds))
        history += r.json()["choices"][0]["token_ids"]  # the answer, as the model produced it
    return turns


def run(opts: UpOptions, engine: EngineConfig, sessions: int, news: list[int], answer: int) -> list[list[tuple]]:
    with Cluster(replace(opts, port=free_port()), engine).start() as cluster:
        return [conversation(cluster, s, news, answer) for s in range(sessions)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--sessions", type=int, default=3, help="conversations, one after another")
    ap.add_argument("--new", default="256,32", help="new tokens per turn, cycled")
    ap.add_argument("--answer", type=int, default=32)
    args = ap.parse_args()
    cycle = [int(x) for x in args.new.split(",")]
    news = [cycle[t % len(cycle)] for t in range(args.turns)]
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="512MiB")
    base = UpOptions(arch="disaggregated", budget=2, kv_pool_dir=tempfile.mkdtemp(prefix="disagg-multi-turn-"))
    runs = {name: run(opts, eng, args.sessions, news, args.answer) for name, opts, eng in (
        ("reference", replace(base, **NO_KV_POOL), replace(engine, enable_prefix_caching=False)),
        ("prefix cache", replace(base, **NO_KV_POOL), engine),
        ("defaults", base, engine))}
    table = Table(title=f"1P1D, {args.model}: KV bytes into the decode worker per turn (median of {args.sessions} "
                        f"conversations); each turn adds the new tokens and a {args.answer}-token answer")
    for col in ("turn", "prompt tokens", "new tokens", "whole prompt (reference)", "decode's prefix cache",
                "ratio", "defaults (+ pool)", "latency ms: reference / prefix cache / defaults"):
        table.add_column(col, justify="right")
    for t in range(args.turns):
        nbytes = {k: statistics.median(c[t][1] for c in v) for k, v in runs.items()}
        ms = {k: 1000 * statistics.median(c[t][2] for c in v) for k, v in runs.items()}
        ratio = nbytes["reference"] / nbytes["prefix cache"] if nbytes["prefix cache"] else float("inf")
        table.add_row(str(t + 1), str(runs["defaults"][0][t][0]), str(news[t]), format_bytes(nbytes["reference"]),
                      format_bytes(nbytes["prefix cache"]), f"{ratio:.1f}x", format_bytes(nbytes["defaults"]),
                      " / ".join(f"{ms[k]:.0f}" for k in runs))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
