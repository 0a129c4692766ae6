"""Soak: many mixed requests through a disaggregated cluster while workers are killed, against the
same load without faults, in the same run.

The load: `--requests` requests at `--concurrency`, prompts of 50-2,000 tokens, outputs of 1-128,
half streamed, a tenth cancelled by their client at a random moment. With faults, one worker
(prefill or decode, in turn) is SIGKILLed every `--kill-every` seconds; `disagg up`'s supervisor
starts it again and the proxy moves what was in flight on it. Every request ends one of three
ways: completed (the whole answer), failed (an HTTP error or an error event, by type) or
cancelled (by its client); lost (no answer, no error: a hang, a stream cut with no [DONE]) must
be 0. After the load: KV blocks still used or held on every worker (must be 0), RSS growth of the
processes that lived through the run, moves the proxy made, and p99 TTFT/TPOT of completed
streams against the fault-free run.

    .venv/bin/python benchmarks/soak.py [--requests 1000] [--concurrency 32] [--kill-every 60]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import NO_KV_POOL, UpOptions


@dataclass
class Tally:
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


async def one(client: httpx.AsyncClient, url: str, rng: random.Random, tally: Tally,
              args: argparse.Namespace) -> None:
    prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
    out, stream, cancel = rng.randint(1, args.max_output), rng.random() < 0.5, rng.random() < 0.1
    body = {"prompt": prompt, "max_tokens": out, "temperature": 0, "ignore_eos": True, "stream": stream}
    work = asyncio.ensure_future(_send(client, url, body, out, tally))
    if cancel:
        await asyncio.sleep(rng.uniform(0.05, 5.0))
        if not work.done():
            work.cancel()
            tally.outcomes["cancelled"] += 1
    with contextlib.suppress(asyncio.CancelledError):
        await work


async def _send(client: httpx.AsyncClient, url: str, body: dict, out: int, tally: Tally) -> None:
    t0 = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                tally.outcomes[f"failed: HTTP {r.status_code}"] += 1
            elif r.json()["usage"]["completion_tokens"] == out:
                tally.outcomes["completed"] += 1
            else:
                tally.outcomes["lost: short answer"] += 1
            return
        times, done, error = [], False, None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                tally.outcomes[f"failed: HTTP {r.status_code}"] += 1
                return
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        error = obj["error"].get("type")
                    elif obj["choices"] and obj["choices"][0]["text"]:
                        times.append(time.perf_counter())
        if error:
            tally.outcomes[f"failed: {error}"] += 1
        elif not done:
            tally.outcomes["lost: stream cut"] += 1
        else:
            tally.outcomes["completed"] += 1
            if times:
                tally.ttft.append(times[0] - t0)
            if len(times) > 1:
                tally.tpot.append((times[-1] - times[0]) / (len(times) - 1))
    except httpx.TimeoutException:
        tally.outcomes["lost: timeout"] += 1
    except httpx.HTTPError as e:
        tally.outcomes[f"failed: {type(e).__name__}"] += 1


async def load(url: str, args: argparse.Namespace, progress: Progress, label: str) -> Tally:
    rng, tally = random.Random(args.seed), Tally()
    gate = asyncio.Semaphore(args.concurrency)
    task = progress.add_task(label, total=args.requests)
    async with httpx.AsyncClient(timeout=args.client_timeout) as client:
        async def limited() -> None:
            async with gate:
                await one(client, url, random.Random(rng.random()), tally, args)
            progress.advance(task)

        await asyncio.gather(*(limited() for _ in range(args.requests)))
    return tally


def killer(cluster: Cluster, every: float, stop: threading.Event, kills: list[str]) -> None:
    names = [w.name for w in cluster.workers]
    i = 0
    while not stop.wait(every):
        name = names[i % len(names)]
        i += 1
        proc = cluster.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills.append(name)


def run(args: argparse.Namespace, faults: bool, progress: Progress) -> dict:
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="1GiB")
    opts = UpOptions(arch="disaggregated", budget=2, port=free_port(), **NO_KV_POOL)
    with Cluster(opts, engine).start() as cluster:
        # a warm-up at the load's concurrency first: the KV cache's pages are touched as it fills,
        # which is not growth
        asyncio.run(load(cluster.url, argparse.Namespace(**vars(args) | {"requests": args.concurrency}), progress,
                         "warm-up"))
        pids = {n: p.pid for n, p in cluster.procs.items()}
        rss0 = {n: rss_mib(pid) for n, pid in pids.items()}
        stop, kills = threading.Event(), []
        thread = threading.Thread(target=killer, args=(cluster, args.kill_every, stop, kills), daemon=True)
        if faults:
            thread.start()
        t0 = time.monotonic()
        tally = asyncio.run(load(cluster.url, args, progress, "with faults" if faults else "fault-free"))
        seconds = time.monotonic() - t0
        stop.set()
        # what is still starting up is waited for: its blocks count too
        deadline = time.monotonic() + 120
        held = None
        while time.monotonic() < deadline:
            try:
                held = sum(metric(u, "disagg_kv_blocks_used") + metric(u, "disagg_kv_held_requests")
                           for u in cluster.worker_urls().values())
                if held == 0:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        survivors = {n: rss_mib(p.pid) - rss0[n] for n, p in cluster.procs.items() if p.pid == pids[n]}
        moves = metric(cluster.url, "disagg_proxy_migrations_total")
    return {"tally": tally, "seconds": seconds, "held": held, "rss": survivors, "moves": moves, "kills": kills}


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills")
    ap.add_argument("--min-prompt", type=int, default=50)
    ap.add_argument("--max-prompt", type=int, default=2000)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--client-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    with Progress() as progress:
        clean = run(args, False, progress)
        faulty = run(args, True, progress)
    table = Table(title=f"soak: {args.requests} requests at concurrency {args.concurrency}, 1P1D {args.model}, "
                        f"prompts {args.min_prompt}-{args.max_prompt}, outputs 1-{args.max_output}, "
                        f"a worker killed every {args.kill_every:g} s")
    table.add_column("")
    table.add_column("fault-free", justify="right")
    table.add_column("with faults", justify="right")
    keys = sorted(set(clean["tally"].outcomes) | set(faulty["tally"].outcomes))
    for k in keys:
        table.add_row(k, str(clean["tally"].outcomes[k]), str(faulty["tally"].outcomes[k]))
    lost = [sum(v for k, v in r["tally"].outcomes.items() if k.startswith("lost")) for r in (clean, faulty)]
    table.add_row("lost (must be 0)", str(lost[0]), str(lost[1]))
    table.add_row("workers killed", "0", str(len(faulty["kills"])))
    table.add_row("moves by the proxy", f"{clean['moves']:.0f}", f"{faulty['moves']:.0f}")
    table.add_row("KV blocks + held requests at the end (must be 0)", str(clean["held"]), str(faulty["held"]))
    for name in ("ttft", "tpot"):
        a, b = p99(getattr(clean["tally"], name)), p99(getattr(faulty["tally"], name))
        table.add_row(f"p99 {name.upper()} s (ratio)", f"{a:.3f}", f"{b:.3f} ({b / a:.2f}x)")
    table.add_row("wall s", f"{clean['seconds']:.0f}", f"{faulty['seconds']:.0f}")
    for r, label in ((clean, "fault-free"), (faulty, "with faults")):
        growth = ", ".join(f"{n} {v:+.0f}" for n, v in sorted(r["rss"].items()))
        table.add_row(f"RSS growth MiB, processes alive throughout ({label})", "", growth)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
