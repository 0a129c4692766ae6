"""`disagg compare`: the reference paper's experiment, made fair. Every architecture gets the same
budget of units (CPU cores or GPUs), is started with the launcher, swept with the same workload
and loads, and stopped; then the results are written to a folder (results.json, results.csv, PNG
plots, report.html) with the crossover (the lowest concurrency at which disaggregated beats
replicated on throughput, and on goodput) and the single-request penalty of disaggregation.

    disagg compare --model smollm2-135m --budget 2 --concurrency 1,2,4,8,16,32
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from disagg.bench.bench import progress_bar, requests_per_point, results_table, server_info, sweep
from disagg.bench.options import CompareOptions, LoadOptions
from disagg.engine.config import EngineConfig
from disagg.errors import ConfigError
from disagg.metrics import DEFINITIONS, crossover

CSV_FIELDS = ("arch", "repeat", "concurrency", "request_rate", "completed", "failed", "duration",
              "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
              "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
              "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
              "p99_e2el_ms")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
                            "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def averaged(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Mean over repeats of each (arch, concurrency) point's numeric fields, with the spread
    (max - min) of throughput and goodput."""
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        points.setdefault((r["arch"], r["concurrency"]), []).append(r)
    out = {}
    for key, rs in points.items():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))
                and not isinstance(rs[0][k], bool) and k not in ("concurrency", "repeat")}
        for k in ("output_throughput", "request_goodput", "median_ttft_ms", "median_tpot_ms"):
            mean[f"spread_{k}"] = max(r[k] for r in rs) - min(r[k] for r in rs)
        mean["runs"] = len(rs)
        out[key] = mean
    return out


def findings(avg: dict[tuple[str, int], dict[str, float]], archs: tuple[str, ...],
             concurrencies: tuple[int, ...], margin: float = 0.05) -> dict[str, Any]:
    found: dict[str, Any] = {"crossover_throughput": None, "crossover_goodput": None, "sentences": []}
    say = found["sentences"]
    if "disaggregated" in archs and "replicated" in archs:
        found["crossover_throughput"] = crossover(avg, "output_throughput", margin)
        found["crossover_goodput"] = crossover(avg, "request_goodput", margin)
        span = f"{min(concurrencies)}-{max(concurrencies)}"
        for what, key in (("output throughput", "crossover_throughput"), ("goodput", "crossover_goodput")):
            c = found[key]
            say.append(f"Disaggregated first beats replicated on {what} at concurrency {c}." if c is not None else
                       f"Disaggregated does not beat replicated on {what} at any concurrency in {span} "
                       f"(by more than {100 * margin:g}% and the run-to-run spread).")
    c1 = min(concurrencies)
    at1 = {a: avg[(a, c1)] for a in archs if (a, c1) in avg}
    if "disaggregated" in at1 and len(at1) > 1:
        best = min((a for a in at1 if a != "disaggregated"), key=lambda a: at1[a]["median_e2el_ms"])
        d, b = at1["disaggregated"], at1[best]
        found["single_request_penalty"] = {
            "concurrency": c1, "versus": best,
            "e2el_ms": [d["median_e2el_ms"], b["median_e2el_ms"]],
            "ttft_ms": [d["median_ttft_ms"], b["median_ttft_ms"]],
            "slowest_arch": max(at1, key=lambda a: at1[a]["median_e2el_ms"])}
        pct = 100 * (d["median_e2el_ms"] / b["median_e2el_ms"] - 1) if b["median_e2el_ms"] else 0.0
        if abs(pct) <= 100 * margin:
            found["single_request_penalty"]["slowest_arch"] = None
            say.append(f"At concurrency {c1} the architectures tie within {100 * margin:g}% end to end "
                       f"(disaggregated {d['median_e2el_ms']:.0f} ms, {best} {b['median_e2el_ms']:.0f} ms): the "
                       "handoff costs less than this machine's noise.")
            return found
        say.append(f"At concurrency {c1}, disaggregated takes {d['median_e2el_ms']:.0f} ms end to end against "
                   f"{b['median_e2el_ms']:.0f} ms for {best} ({pct:+.0f}%; TTFT {d['median_ttft_ms']:.0f} vs "
                   f"{b['median_ttft_ms']:.0f} ms); the slowest at {c1} is "
                   f"{found['single_request_penalty']['slowest_arch']}.")
    return found


async def _run_arch(arch: str, opts: CompareOptions, load: LoadOptions, engine: EngineConfig,
                    on_done: Any) -> tuple[list[dict[str, Any]], str]:
    from disagg.serve.launcher import Cluster, free_port
    from disagg.serve.options import NO_KV_POOL, UpOptions

    pool = {} if opts.kv_pool else NO_KV_POOL
    up = UpOptions(arch=arch, budget=opts.budget, port=free_port(), kv_bandwidth=opts.kv_bandwidth,
                   kv_latency=opts.kv_latency, kv_push=opts.kv_push, startup_timeout=opts.startup_timeout,
                   log_dir=str(Path(opts.out_dir) / "logs" / arch), routing=opts.routing, **pool)
    cluster = await asyncio.to_thread(Cluster(up, engine).start)
    try:
        model, vocab = await asyncio.to_thread(server_info, cluster.url, None)
        rows = await sweep(cluster.url, model, vocab, load, on_done=on_done)
    finally:
        await asyncio.to_thread(cluster.stop)
    return rows, cluster.usage


def run(opts: CompareOptions, load: LoadOptions, engine: EngineConfig) -> dict[str, Any]:
    if load.request_rate is not None:
        raise ConfigError("compare sweeps concurrencies; drop --request-rate (disagg bench takes it)")
    archs, concurrencies = opts.arch_list(), load.concurrencies()
    rows: list[dict[str, Any]] = []
    usage: dict[str, str] = {}
    total = opts.repeat * len(archs) * len(concurrencies) * requests_per_point(load)
    started = time.time()
    with progress_bar() as bar:
        task = bar.add_task("compare", total=total)
        for rep in range(opts.repeat):
            for arch in archs:
                bar.update(task, description=f"{arch} (run {rep + 1}/{opts.repeat})")
                got, usage[arch] = asyncio.run(_run_arch(arch, opts, load, engine, lambda: bar.advance(task)))
                rows += [{"arch": arch, "repeat": rep} | r for r in got]
    avg = averaged(rows)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": machine(),
        "model": engine.model,
        "budget": opts.budget,
        "usage": usage,
        "compare": dataclasses.asdict(opts),
        "workload": dataclasses.asdict(load),
        "definitions": DEFINITIONS,
        "results": rows,
        "averaged": [{"arch": a, "concurrency": c} | avg[(a, c)] for a in archs for c in concurrencies
                     if (a, c) in avg],
        "findings": findings(avg, archs, concurrencies, opts.tie_margin),
    }


def write(doc: dict[str, Any], out_dir: str) -> list[Path]:
    from disagg.bench.report import write_plots, write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(doc["results"])
    plots = write_plots(doc, out)
    report = write_report(doc, plots, out)
    return [out / "results.json", out / "results.csv", *plots, report]


def main(opts: CompareOptions, load: LoadOptions, engine: EngineConfig) -> int:
    from rich.console import Console

    doc = run(opts, load, engine)
    files = write(doc, opts.out_dir)
    console = Console(width=160)
    rows = [r | {"arch": r["arch"]} for r in doc["averaged"]]
    console.print(results_table(rows, f"{doc['model']} on a budget of {opts.budget} "
                                      f"({'; '.join(f'{a}: {u}' for a, u in doc['usage'].items())}), "
                                      f"workload {load.workload}", arch_column=True))
    for sentence in doc["findings"]["sentences"]:
        console.print(sentence)
    console.print(f"report: {files[-1]}  (results.json, results.csv and plots beside it)")
    failed = sum(r["failed"] for r in doc["results"])
    return 1 if failed else 0
