"""TTFT of a disaggregated cluster both ways: token 1 streamed by the proxy as soon as prefill
answers (our extension), or only after decode has pulled the KV and recomputed the last prompt
position (vLLM's way). Same cluster shape, same prompts, measured in the same run.

    .venv/bin/python benchmarks/disagg_ttft.py [--prompt-tokens 1024] [--requests 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from rich.console import Console
from rich.table import Table

from disagg.engine.config import EngineConfig
from disagg.kv.layout import format_bytes, kv_bytes_per_token
from disagg.model.presets import PRESETS
from disagg.serve.launcher import Cluster, free_port
from disagg.serve.options import UpOptions


def ttft(url: str, prompt: list[int]) -> tuple[float, float]:
    """(time to the first streamed token, end-to-end), seconds."""
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and '"text":"' in line:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--requests", type=int, default=12)
    args = ap.parse_args()
    engine = EngineConfig(model=args.model, device="cpu", kv_cache_memory="512MiB", max_num_batched_tokens=2048,
                          enable_prefix_caching=False)
    rows = []
    for extension in (True, False):
        cluster = Cluster(UpOptions(arch="disaggregated", budget=2, port=free_port(), stream_first_token=extension),
                          engine).start()
        try:
            results = [ttft(cluster.url, [100 + (i * 7 + j) % 40000 for j in range(args.prompt_tokens)])
                       for i in range(args.requests + 1)][1:]  # the first is a warm-up
        finally:
            cluster.stop()
        firsts, e2es = [r[0] for r in results], [r[1] for r in results]
        rows.append(("token 1 from prefill (extension)" if extension else "token 1 after the KV pull (vLLM)",
                     statistics.median(firsts), max(firsts), statistics.median(e2es)))
    kv = kv_bytes_per_token(PRESETS[args.model].config, "fp32") * args.prompt_tokens if args.model in PRESETS else 0
    table = Table(title=f"disaggregated 1P1D TTFT, {args.model}, {args.prompt_tokens}-token prompts "
                        f"(KV {format_bytes(kv)} over loopback TCP), {args.requests} sequential requests")
    for col in ("mode", "TTFT p50 ms", "TTFT max ms", "end-to-end p50 ms"):
        table.add_column(col, justify="right")
    for mode, p50, worst, e2e in rows:
        table.add_row(mode, f"{1000 * p50:.1f}", f"{1000 * worst:.1f}", f"{1000 * e2e:.1f}")
    Console(width=120).print(table)
    print(f"the extension saves {1000 * (rows[1][1] - rows[0][1]):.1f} ms of TTFT at p50")


if __name__ == "__main__":
    main()
