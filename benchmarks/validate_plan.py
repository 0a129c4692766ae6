"""Check `disagg plan`'s simulator against a real `disagg compare` on this machine.

Needs a calibrated profile (`disagg calibrate --model smollm2-135m --threads 1`: each worker of a
compare gets one core) and a compare's results.json (default: `make run`'s). Simulates the same
architectures, budget, workload and concurrencies on the `this-machine` profile and prints, per
point, predicted vs measured output throughput, TTFT p50 and TPOT p50, and per architecture the
median absolute error over concurrencies 1-16 (target: <= 15% each).

    .venv/bin/python benchmarks/validate_plan.py [--results results/make-run/results.json] [--hop-ms 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

from rich.console import Console
from rich.table import Table

from disagg.parsing import parse_len
from disagg.sim.cost import WorkerCost
from disagg.sim.hardware import find
from disagg.sim.model import ModelSpec
from disagg.sim.options import PlanOptions
from disagg.sim.planner import catalogs
from disagg.sim.simulator import Cluster, run_summary

METRICS = (("output_throughput", "out tok/s"), ("median_ttft_ms", "TTFT p50 ms"), ("median_tpot_ms", "TPOT p50 ms"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results/make-run/results.json")
    ap.add_argument("--profile", default=None, help="calibrated profile (default ~/.cache/disagg/profile.toml)")
    ap.add_argument("--hop-ms", type=float, default=3.0, help="HTTP + proxy cost per hop, milliseconds")
    args = ap.parse_args()
    with open(args.results) as f:
        doc = json.load(f)
    wl = doc["workload"]
    devices, links = catalogs(PlanOptions(hardware="this-machine", profile=args.profile))
    spec = ModelSpec.named(doc["model"])
    cost = WorkerCost(spec, find(devices, "this-machine", "hardware"), "fp32")
    base = Cluster(cost, token_budget=512, max_seqs=64, hop=args.hop_ms / 1000,
                   link=find(links, "this-machine-loopback", "link"))
    clusters = {"single": replace(base, workers=1), "replicated": replace(base, workers=doc["budget"]),
                "disaggregated": replace(base, prefill=doc["budget"] // 2, decode=doc["budget"] - doc["budget"] // 2),
                "single-all": replace(base, workers=1)}
    (ilo, ihi), (olo, ohi) = parse_len(wl["input_len"], "input-len"), parse_len(wl["output_len"], "output-len")
    table = Table(title=f"plan (simulated, this-machine profile) vs compare (measured): {doc['model']}, budget "
                        f"{doc['budget']}, {wl['input_len']} in / {wl['output_len']} out, {doc['date'][:10]}")
    for col in ("arch", "c", *(f"{label} {kind}" for _, label in METRICS for kind in ("meas", "pred", "err"))):
        table.add_column(col, justify="right")
    errors: dict[str, dict[str, list[float]]] = {}
    for row in doc["averaged"]:
        arch, c = row["arch"], row["concurrency"]
        reqs = [((ilo + ihi) // 2, (olo + ohi) // 2)] * wl["num_prompts"]
        pred = run_summary(clusters[arch], reqs, concurrency=c)
        cells = []
        for key, _ in METRICS:
            err = pred[key] / row[key] - 1 if row[key] else 0.0
            if c <= 16:
                errors.setdefault(arch, {}).setdefault(key, []).append(abs(err))
            cells += [f"{row[key]:.1f}", f"{pred[key]:.1f}", f"{100 * err:+.0f}%"]
        table.add_row(arch, str(c), *cells)
    console = Console(width=160)
    console.print(table)
    summary = Table(title="median absolute error over concurrencies 1-16 (target <= 15%)")
    summary.add_column("arch")
    for _, label in METRICS:
        summary.add_column(label, justify="right")
    for arch, errs in errors.items():
        summary.add_row(arch, *(f"{100 * statistics.median(errs[k]):.0f}%" for k, _ in METRICS))
    console.print(summary)


if __name__ == "__main__":
    main()
