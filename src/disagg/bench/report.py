"""Plots and the self-contained HTML report of a `disagg compare` run."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

PLOTS = (  # file, title, y label, [(field, line style)]
    ("throughput.png", "Output throughput", "output tokens / s", [("output_throughput", "-")]),
    ("ttft.png", "Time to first token (p50 solid, p99 dashed)", "ms", [("median_ttft_ms", "-"),
                                                                        ("p99_ttft_ms", "--")]),
    ("tpot.png", "Time per output token (p50 solid, p99 dashed)", "ms", [("median_tpot_ms", "-"),
                                                                          ("p99_tpot_ms", "--")]),
    ("goodput.png", "Goodput (requests meeting every SLO)", "requests / s", [("request_goodput", "-")]),
)


def write_plots(doc: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = doc["averaged"]
    archs = list(dict.fromkeys(r["arch"] for r in avg))
    paths = []
    for name, title, ylabel, series in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for i, arch in enumerate(archs):
            pts = sorted((r for r in avg if r["arch"] == arch), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in pts]
            for field, style in series:
                ys = [r[field] for r in pts]
                spread = [r.get(f"spread_{field}", 0.0) / 2 for r in pts]
                ax.errorbar(xs, ys, yerr=spread if any(spread) else None, linestyle=style, marker="o",
                            color=f"C{i}", label=arch if style == "-" else None, capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in avg}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}\n{doc['model']}, budget {doc['budget']}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("arch", "arch", "{}"), ("concurrency", "c", "{}"), ("runs", "runs", "{:.0f}"),
            ("completed", "done", "{:.0f}"), ("failed", "failed", "{:.0f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("spread_output_throughput", "± spread", "{:.1f}"),
            ("request_throughput", "req/s", "{:.2f}"), ("request_goodput", "goodput", "{:.2f}"),
            ("median_ttft_ms", "TTFT p50", "{:.0f}"), ("p99_ttft_ms", "TTFT p99", "{:.0f}"),
            ("median_tpot_ms", "TPOT p50", "{:.1f}"), ("p99_tpot_ms", "TPOT p99", "{:.1f}"),
            ("median_itl_ms", "ITL p50", "{:.1f}"), ("median_e2el_ms", "E2E p50", "{:.0f}")]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt.format(r.get(k, '')))}</td>" for k, _, fmt in cols)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(doc: dict[str, Any], plots: list[Path], out: Path) -> Path:
    esc = html.escape
    m = doc["machine"]
    wl = doc["workload"]
    imgs = "".join(f'<img alt="{esc(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in plots)
    usage = "".join(f"<li><b>{esc(a)}</b>: {esc(u)}</li>" for a, u in doc["usage"].items())
    defs = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in doc["definitions"].items())
    found = "".join(f"<p class=finding>{esc(s)}</p>" for s in doc["findings"]["sentences"])
    link = doc["compare"].get("kv_bandwidth")
    link_note = (f"<p>KV link between prefill and decode: EMULATED {esc(link)}, "
                 f"{esc(doc['compare'].get('kv_latency') or '0')} one-way.</p>" if link else "")
    slo = ", ".join(f"{k} {wl[k]:g} ms" for k in ("slo_ttft_ms", "slo_tpot_ms") if wl.get(k) is not None)
    pool = "memory + disk" if doc["compare"].get("kv_pool") else "none (each engine keeps its own prefix cache)"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>disagg compare: {esc(doc['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 7px;
text-align:right}}img{{max-width:49%;margin:2px}}.finding{{font-size:17px;font-weight:600}}</style></head><body>
<h1>Single vs replicated vs disaggregated: {esc(doc['model'])}</h1>
{found}
<h2>Setup</h2>
<p>Budget: <b>{doc['budget']} units</b> for every architecture. What each used of it:</p><ul>{usage}</ul>
<p>Workload <b>{esc(wl['workload'])}</b>: input {esc(str(wl['input_len']))} tokens, output {esc(str(wl['output_len']))}
tokens, {wl['num_prompts']} requests per point after {wl['warmup']} warm-up, closed loop at concurrency
{esc(wl['concurrency'])}; SLOs for goodput: {esc(slo or 'none (goodput = throughput of completed requests)')}.
Repeats: {doc['compare']['repeat']}. Proxy routing: {esc(doc['compare'].get('routing', 'round-robin'))};
KV pool: {pool}.</p>{link_note}
<p>Machine: {esc(m.get('cpu', ''))}, {m.get('cores')} cores, {esc(m.get('platform', ''))}, torch
{esc(m.get('torch', '-'))}{', GPUs: ' + esc(', '.join(m['gpus'])) if m.get('gpus') else ''}. Run {esc(doc['date'])},
{doc['duration_s']:.0f} s.</p>
<h2>Plots</h2>{imgs}
<h2>Results (mean over repeats; spread = max - min)</h2>{_table(doc['averaged'])}
<h2>Metric definitions (as vLLM's benchmark)</h2><ul>{defs}</ul>
<p>Raw per-run numbers: results.json, results.csv.</p></body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path
