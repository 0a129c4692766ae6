"""`disagg plan`: predict single vs replicated vs disaggregated for a model, hardware, link and
workload, by simulating each (every prefill:decode split of the budget for disaggregated), and
say which to run and why, in the reference paper's terms.

    disagg plan --model llama-3.1-8b --hardware h100-sxm --units 8 --link rdma-400g \\
        --input-len 2048 --output-len 256 --concurrency 1,2,4,8,16,32,64
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from disagg.errors import ConfigError
from disagg.metrics import beats, crossover
from disagg.parsing import parse_ints, parse_len
from disagg.sim.cost import WorkerCost
from disagg.sim.hardware import Device, Link, find, load_catalog
from disagg.sim.model import ModelSpec
from disagg.sim.options import PlanOptions
from disagg.sim.simulator import Cluster, run_summary
from disagg.units import format_bytes

DEFAULT_PROFILE = Path("~/.cache/disagg/profile.toml").expanduser()


def catalogs(opts: PlanOptions) -> tuple[dict[str, Device], dict[str, Link]]:
    devices, links = load_catalog(opts.catalog)
    profile = Path(opts.profile) if opts.profile else DEFAULT_PROFILE
    if profile.is_file():
        extra_devices, extra_links = load_catalog(profile)
        devices |= {k: v for k, v in extra_devices.items() if k not in devices or k.startswith("this-machine")}
        links |= {k: v for k, v in extra_links.items() if k not in links or k.startswith("this-machine")}
    elif opts.profile:
        raise ConfigError(f"no profile at {opts.profile}; run disagg calibrate first")
    if "this-machine" in (opts.hardware, opts.decode_hardware) and "this-machine" not in devices:
        raise ConfigError("this-machine has no profile yet: run `disagg calibrate --local` first")
    return devices, links


def workload(opts: PlanOptions, concurrency: int) -> list[tuple[int, int]]:
    n = opts.num_prompts or max(64, 4 * concurrency)
    (ilo, ihi), (olo, ohi) = parse_len(opts.input_len, "input-len"), parse_len(opts.output_len, "output-len")
    rng = random.Random(0)
    return [(rng.randint(ilo, ihi), rng.randint(olo, ohi)) for _ in range(n)]


@dataclass(frozen=True)
class Setup:
    arch: str
    cluster: Cluster

    @property
    def prefill_units(self) -> int:
        return self.cluster.prefill * self.cluster.cost.tp

    @property
    def decode_units(self) -> int:
        c = self.cluster
        return c.decode * (c.decode_cost or c.cost).tp


def setups(opts: PlanOptions) -> tuple[list[Setup], list[Setup], WorkerCost]:
    """The colocated setups (single, replicated) and every disaggregated split."""
    devices, links = catalogs(opts)
    model = ModelSpec.named(opts.model)
    device = find(devices, opts.hardware, "hardware")
    cost = WorkerCost.fit(model, device, opts.dtype)
    budget = opts.token_budget or (8192 if device.kind == "gpu" else 512)
    base = Cluster(cost, token_budget=budget, max_seqs=opts.max_seqs, hop=opts.hop_ms / 1000,
                   link=find(links, opts.link, "link"))
    workers = opts.units // cost.tp
    if workers < 1:
        raise ConfigError(f"{model.name} in {opts.dtype} needs {cost.tp} {device.name} units per worker; "
                          f"the budget has {opts.units}")
    colocated = [Setup("single", replace(base, workers=1))]
    if workers > 1:
        colocated.append(Setup("replicated", replace(base, workers=workers)))
    splits = []
    if opts.decode_hardware:
        dcost = WorkerCost.fit(model, find(devices, opts.decode_hardware, "hardware"), opts.dtype)
        dworkers = (opts.decode_units or opts.units) // dcost.tp
        if dworkers < 1:
            raise ConfigError(f"--decode-units {opts.decode_units} cannot hold one {model.name} worker")
        splits.append(Setup("disaggregated", replace(base, prefill=workers, decode=dworkers, decode_cost=dcost)))
    else:
        splits = [Setup("disaggregated", replace(base, prefill=p, decode=workers - p)) for p in range(1, workers)]
    return colocated, splits, cost


def _row(setup: Setup, c: int, s: dict[str, float]) -> dict[str, Any]:
    cl = setup.cluster
    return {"arch": setup.arch, "units": cl.units, "prefill_units": setup.prefill_units,
            "decode_units": setup.decode_units, "concurrency": c, "ttft_p50_ms": s["median_ttft_ms"],
            "ttft_p99_ms": s["p99_ttft_ms"], "tpot_p50_ms": s["median_tpot_ms"], "tpot_p99_ms": s["p99_tpot_ms"],
            "e2el_p50_ms": s["median_e2el_ms"], "output_throughput": s["output_throughput"],
            "goodput": s["request_goodput"]}


def plan(opts: PlanOptions) -> dict[str, Any]:
    colocated, splits, cost = setups(opts)
    concurrencies = parse_ints(opts.concurrency, "concurrency")
    slo = (opts.slo_ttft_ms, opts.slo_tpot_ms)
    key = "goodput" if any(slo) else "output_throughput"  # what "better" means here
    preds: list[dict[str, Any]] = []
    for setup in colocated:
        for c in concurrencies:
            preds.append(_row(setup, c, run_summary(setup.cluster, workload(opts, c), c, None, *slo)))
    best_split, split_preds = None, []
    if splits:
        scored = []
        for setup in splits:
            rows = [_row(setup, c, run_summary(setup.cluster, workload(opts, c), c, None, *slo))
                    for c in concurrencies]
            # the split that does best where load is highest, then on the sum
            scored.append(((rows[-1][key], sum(r[key] for r in rows)), setup, rows))
        _, best_split, split_preds = max(scored, key=lambda t: t[0])
        preds += split_preds
    by = {(p["arch"], p["concurrency"]): p for p in preds}
    cross = crossover(by, key, opts.tie_margin)
    top = concurrencies[-1]
    at_top = {a: by[(a, top)] for a in ("single", "replicated", "disaggregated") if (a, top) in by}
    choice = max(at_top, key=lambda a: (at_top[a][key], a == "replicated"))
    if choice == "disaggregated" and "replicated" in at_top and not beats(
            at_top["disaggregated"], at_top["replicated"], key, opts.tie_margin):
        choice = "replicated"  # a tie goes to the simpler system
    rec = {"arch": choice,
           "prefill_units": best_split.prefill_units if choice == "disaggregated" else 0,
           "decode_units": best_split.decode_units if choice == "disaggregated" else 0,
           "reasons": reasons(opts, cost, colocated[0].cluster.link, by, concurrencies, cross, choice, key)}
    return {"predictions": preds, "crossover_concurrency": cross, "recommendation": rec,
            "model": opts.model, "hardware": opts.hardware, "units": opts.units, "link": opts.link,
            "tp_per_worker": cost.tp,
            "best_split": [best_split.prefill_units, best_split.decode_units] if best_split else None}


def reasons(opts: PlanOptions, cost: WorkerCost, link: Link, by: dict[tuple[str, int], dict[str, Any]],
            concurrencies: tuple[int, ...], cross: int | None, choice: str, key: str) -> list[str]:
    (ilo, ihi), (olo, ohi) = parse_len(opts.input_len, "input-len"), parse_len(opts.output_len, "output-len")
    n_in, n_out = (ilo + ihi) // 2, (olo + ohi) // 2
    m = cost.model
    out = []
    ratio = n_in / max(n_out, 1)
    shape = "prefill-heavy" if ratio >= 4 else "decode-heavy" if ratio <= 0.5 else "balanced"
    out.append(f"Prompt/output length {n_in}/{n_out} ({shape}): separating prefill from decode pays when long "
               "prefills would stall decodes that have a TPOT target.")
    kv = m.kv_bytes_per_token(cost.dtype) * n_in
    t_kv, t_pre = link.transfer_time(kv), cost.prefill_time(n_in)
    out.append(f"One prompt's KV is {format_bytes(kv)}; over {link.name} it takes {1000 * t_kv:.1f} ms, "
               f"{100 * t_kv / t_pre:.0f}% of its {1000 * t_pre:.1f} ms prefill"
               + (": the link eats the gain." if t_kv > 0.5 * t_pre else "."))
    out.append(f"Model size: {format_bytes(m.weight_bytes(cost.dtype))} of weights; one worker spans {cost.tp} "
               f"{cost.device.name} device(s), so the budget of {opts.units} makes {opts.units // cost.tp} worker(s).")
    c1 = concurrencies[0]
    if ("disaggregated", c1) in by:
        d, s = by[("disaggregated", c1)], by[("single", c1)]
        out.append(f"At concurrency {c1}, disaggregated answers in {d['e2el_p50_ms']:.0f} ms against "
                   f"{s['e2el_p50_ms']:.0f} ms colocated: a lone request only pays for the transfer.")
    what = "goodput" if key == "goodput" else "throughput"
    if ("replicated", concurrencies[0]) not in by:
        out.append("The budget holds one worker, so there is no replicated arm: disaggregated is compared with "
                   "single, and its decode runs on hardware outside the budget." if opts.decode_hardware else
                   "The budget holds one worker: nothing to replicate or split.")
    elif cross:
        out.append(f"Crossover: disaggregated first beats replicated on {what} at concurrency {cross}.")
    else:
        out.append(f"No crossover in {concurrencies[0]}-{concurrencies[-1]}: disaggregated never beats replicated "
                   f"on {what} by more than {100 * opts.tie_margin:g}%.")
    if key != "goodput":
        out.append("No SLO given: at equal budget, throughput favours replication (or ties); give --slo-ttft-ms / "
                   "--slo-tpot-ms to plan for goodput.")
    out.append("Shared prefixes are not modelled: a prefix cache shortens prefill for every architecture alike.")
    out.append(f"Recommended: {choice} at concurrency {concurrencies[-1]}.")
    return out


def write_plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=100)
    for ax, (field_, label) in zip(axes, (("output_throughput", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 ms"),
                                          ("tpot_p50_ms", "TPOT p50 ms")), strict=True):
        for i, arch in enumerate(("single", "replicated", "disaggregated")):
            pts = [p for p in result["predictions"] if p["arch"] == arch]
            if pts:
                ax.plot([p["concurrency"] for p in pts], [p[field_] for p in pts], "o-", color=f"C{i}", label=arch)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"PREDICTED: {result['model']} on {result['units']} x {result['hardware']}, link {result['link']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(opts: PlanOptions) -> int:
    if opts.scenario:
        from disagg.sim.options import SCENARIOS

        for i, overrides in enumerate(SCENARIOS[opts.scenario]):
            one = replace(opts, scenario=None, **overrides,
                          plot=f"{Path(opts.plot).with_suffix('')}-{i + 1}.png" if opts.plot else None)
            if not opts.json:
                print(f"\n== {opts.scenario} {i + 1}/{len(SCENARIOS[opts.scenario])}: "
                      + ", ".join(f"{k}={v}" for k, v in overrides.items()))
            main(one)
        return 0
    result = plan(opts)
    if opts.plot:
        write_plot(result, opts.plot)
    if opts.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    split = result["best_split"]
    table = Table(title=f"PREDICTED (simulated): {opts.model} on {opts.units} x {opts.hardware}, link {opts.link}, "
                        f"{opts.input_len} in / {opts.output_len} out"
                        + (f"; disaggregated split {split[0]}P:{split[1]}D units" if split else ""))
    for col in ("arch", "units", "c", "out tok/s", "goodput req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
                "E2E p50"):
        table.add_column(col, justify="right")
    for p in result["predictions"]:
        table.add_row(p["arch"], str(p["units"]), str(p["concurrency"]), f"{p['output_throughput']:.0f}",
                      f"{p['goodput']:.2f}", f"{p['ttft_p50_ms']:.0f}", f"{p['ttft_p99_ms']:.0f}",
                      f"{p['tpot_p50_ms']:.1f}", f"{p['tpot_p99_ms']:.1f}", f"{p['e2el_p50_ms']:.0f}")
    console = Console(width=140)
    console.print(table)
    rec = result["recommendation"]
    console.print(f"[bold]Recommendation: {rec['arch']}"
                  + (f" ({rec['prefill_units']} prefill + {rec['decode_units']} decode units)"
                     if rec["arch"] == "disaggregated" else "") + "[/bold]")
    for r in rec["reasons"]:
        console.print(f"- {r}")
    return 0
