"""`disagg bench`: sweep a server with a workload at several loads and report vLLM-compatible
metrics, as a table, and as JSON with `--out`.

    disagg bench --url http://127.0.0.1:8000 --concurrency 1,2,4,8 --input-len 512 --output-len 128
"""

from __future__ import annotations

import asyncio
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx

from disagg.bench.client import BenchClient
from disagg.bench.options import BenchOptions, LoadOptions
from disagg.bench.runner import Load, run_load
from disagg.bench.workloads import WorkloadSpec, generate
from disagg.errors import ConfigError
from disagg.metrics import DEFINITIONS, summarize

DEFAULT_VOCAB = (1000, 20000)  # inside every modern tokenizer's vocabulary, clear of special tokens


def server_info(url: str, model: str | None, timeout: float = 10.0) -> tuple[str | None, tuple[int, int]]:
    """The model name to send and the token-id range to draw prompts from, from /v1/models (ours
    reports vocab_size; others get the default range)."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        data = httpx.get(base + "/v1/models", timeout=timeout).json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"no OpenAI-compatible server answers at {base}/v1/models ({e!r}); start one or "
                          "fix --url") from None
    vocab = data.get("vocab_size")
    lo, hi = DEFAULT_VOCAB
    if isinstance(vocab, int) and vocab > 0:
        lo, hi = min(lo, vocab // 8), min(hi, vocab)
    return model or data.get("id"), (lo, hi)


def load_points(opts: LoadOptions) -> list[Load]:
    if opts.request_rate is not None:
        return [Load(request_rate=opts.request_rate, burstiness=opts.burstiness,
                     max_concurrency=opts.max_concurrency, seed=opts.workload_seed)]
    return [Load(concurrency=c, seed=opts.workload_seed) for c in opts.concurrencies()]


def point_label(load: Load) -> dict[str, Any]:
    return {"concurrency": load.concurrency, "request_rate": load.request_rate,
            "burstiness": load.burstiness if load.request_rate is not None else None}


async def sweep(url: str, model: str | None, vocab: tuple[int, int], opts: LoadOptions, timeout: float = 600.0,
                api_key: str | None = None, on_done: Any = lambda: None) -> list[dict[str, Any]]:
    """Every load point of `opts` against one server: a list of vLLM-style summaries with the
    load point's label."""
    client = BenchClient(url, model, timeout=timeout, ignore_eos=opts.ignore_eos, api_key=api_key)
    spec = WorkloadSpec(opts.workload, opts.num_prompts, opts.input_len, opts.output_len, opts.prefix_len,
                        opts.turns, vocab, opts.workload_seed)
    results = []
    try:
        for i, load in enumerate(load_points(opts)):
            # fresh prompts at every load point: repeats would hit the server's prefix cache
            sessions = generate(replace(spec, seed=opts.workload_seed + 1_000_003 * (i + 1)))
            warmup = generate(replace(spec, num_prompts=max(opts.warmup, 1), seed=opts.workload_seed + 10_000,
                                      name="random", turns=1))[: opts.warmup]
            records, duration = await run_load(client, sessions, load, warmup, on_done)
            summary = summarize(records, duration, opts.slo_ttft_ms, opts.slo_tpot_ms)
            errors = sorted({r.error for r in records if not r.ok})
            results.append(point_label(load) | summary | {"errors": errors[:5]})
    finally:
        await client.aclose()
    return results


def requests_per_point(opts: LoadOptions) -> int:
    return opts.num_prompts * (opts.turns if opts.workload == "multi-turn" else 1)


def results_table(rows: list[dict[str, Any]], title: str, arch_column: bool = False) -> Any:
    from rich.table import Table

    table = Table(title=title)
    cols = (["arch"] if arch_column else []) + [
        "load", "done/failed", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50",
        "E2E p50", "goodput req/s"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        load = f"c={r['concurrency']:g}" if r.get("concurrency") else f"{r['request_rate']:g} req/s"
        cells = ([r["arch"]] if arch_column else []) + [
            load, f"{r['completed']:g}/{r['failed']:g}", f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:.1f}",
            f"{r['median_ttft_ms']:.0f}", f"{r['p99_ttft_ms']:.0f}", f"{r['median_tpot_ms']:.1f}",
            f"{r['p99_tpot_ms']:.1f}", f"{r['median_itl_ms']:.1f}", f"{r['median_e2el_ms']:.0f}",
            f"{r['request_goodput']:.2f}"]
        table.add_row(*cells)
    table.caption = "times in ms; " + "; ".join(f"{k}: {v}" for k, v in DEFINITIONS.items())
    return table


def progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def main(bench: BenchOptions, load: LoadOptions) -> int:
    from rich.console import Console

    model, vocab = server_info(bench.url, bench.model)
    total = requests_per_point(load) * len(load_points(load))
    with progress_bar() as bar:
        task = bar.add_task(f"bench {bench.url}", total=total)
        t0 = time.time()
        rows = asyncio.run(sweep(bench.url, model, vocab, load, bench.timeout, bench.api_key,
                                 on_done=lambda: bar.advance(task)))
    Console(width=160).print(results_table(rows, f"{bench.url} ({model}), workload {load.workload}"))
    if bench.out:
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), "backend": "openai", "url": bench.url,
               "model_id": model, "machine": platform.platform(), "workload": asdict(load),
               "definitions": DEFINITIONS, "results": rows}
        Path(bench.out).parent.mkdir(parents=True, exist_ok=True)
        Path(bench.out).write_text(json.dumps(doc, indent=2))
        print(f"results: {bench.out}")
    return 0 if all(r["completed"] for r in rows) else 1
