"""`disagg bench`'s arithmetic against a scripted server, its workloads, and a small real compare."""

from __future__ import annotations

import asyncio
import csv
import functools
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from disagg.bench.bench import sweep
from disagg.bench.options import CompareOptions, LoadOptions
from disagg.bench.workloads import WorkloadSpec, generate
from disagg.engine.config import EngineConfig
from disagg.metrics import RequestRecord, percentile, summarize
from disagg.serve.launcher import free_port

TTFT, GAP = 0.300, 0.050  # the scripted server's timings (tests/scripted_server.py), seconds
# Measured times are checked one-sided: never earlier than scripted (minus clock rounding, EPS), and at
# most SLACK later, what a loaded machine may add (scheduling, HTTP); the arithmetic is checked exactly.
EPS, SLACK = 0.001, 0.25


@pytest.fixture(scope="module")
def scripted():
    """A test double for the thing measured, in a process of its own like a real server."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "scripted_server.py"), str(port),
                             str(TTFT), str(GAP)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the scripted server did not start"
            assert proc.poll() is None, "the scripted server exited"
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def recorded(monkeypatch):
    """The (records, duration) of every load point a sweep summarizes, as the benchmark measured them."""
    import disagg.bench.bench as bench

    seen: list[tuple[list[RequestRecord], float]] = []

    def spy(records, duration, *args, **kwargs):
        seen.append((list(records), duration))
        return summarize(records, duration, *args, **kwargs)

    monkeypatch.setattr(bench, "summarize", spy)
    return seen


def check_timings(rec: RequestRecord, out_len: int) -> None:
    """Every streamed token arrives no earlier than the scripted server sends it (it sends token i
    TTFT + i * GAP after it got the request, which is after the client sent it) and at most SLACK later."""
    assert rec.ok, rec.error
    assert rec.output_tokens == out_len
    assert len(rec.chunk_times) == out_len  # one streamed chunk per token; the usage chunk carries no text
    for i, t in enumerate([*rec.chunk_times, rec.end]):
        scripted = TTFT + min(i, out_len - 1) * GAP
        assert scripted - EPS <= t - rec.sent <= scripted + SLACK, (i, t - rec.sent, scripted)


def ms(xs: list[float], stat=statistics.median) -> float:
    return 1000 * stat(xs)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_metrics_come_out_as_scripted(scripted, recorded, concurrency):
    out_len, n = 10, 2 * concurrency
    e2e = TTFT + (out_len - 1) * GAP
    # SLOs every request meets when check_timings holds: TPOT <= GAP + (SLACK + EPS) / (out_len - 1)
    slo_ttft_ms, slo_tpot_ms = 1000 * (TTFT + SLACK), 1000 * (GAP + (SLACK + EPS) / (out_len - 1))
    opts = LoadOptions(input_len="32", output_len=str(out_len), num_prompts=n, warmup=0,
                       concurrency=str(concurrency), slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms)
    (row,) = asyncio.run(sweep(scripted, "scripted", (1000, 2000), opts))
    ((records, duration),) = recorded
    assert row["completed"] == n
    assert row["failed"] == 0
    assert row["total_output_tokens"] == n * out_len
    assert row["total_input_tokens"] == n * 32
    # what the client measured is what the server did, within what a loaded machine adds
    for rec in records:
        check_timings(rec, out_len)
    # the summary is the definitions applied to those records, exactly
    ttft = [r.chunk_times[0] - r.sent for r in records]
    tpot = [(r.end - r.chunk_times[0]) / (r.output_tokens - 1) for r in records]
    itl = [b - a for r in records for a, b in itertools.pairwise(r.chunk_times)]
    e2el = [r.end - r.sent for r in records]
    exact = functools.partial(pytest.approx, rel=1e-9)
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        assert row[f"median_{name}_ms"] == exact(ms(xs)), name
        assert row[f"mean_{name}_ms"] == exact(ms(xs, statistics.fmean)), name
    assert len(itl) == n * (out_len - 1)
    # closed loop: exactly `concurrency` requests in flight whenever one is sent, each taking >= e2e,
    # so the run lasts at least n / concurrency of them back to back
    assert max(sum(q.sent <= r.sent < q.end for q in records) for r in records) == concurrency
    rounds = n // concurrency
    assert max(r.end for r in records) - min(r.sent for r in records) <= duration
    assert rounds * e2e - EPS <= duration <= rounds * (e2e + SLACK) + SLACK
    assert row["duration"] == duration
    assert row["request_throughput"] == exact(n / duration)
    assert row["output_throughput"] == exact(n * out_len / duration)
    assert row["request_goodput"] == exact(row["request_throughput"])  # every SLO met


def test_goodput_counts_only_requests_within_every_slo(scripted):
    opts = LoadOptions(input_len="8", output_len="4", num_prompts=4, warmup=0, concurrency="2",
                       slo_ttft_ms=1000 * TTFT / 2)  # nobody gets a first token that fast
    (row,) = asyncio.run(sweep(scripted, "scripted", (1000, 2000), opts))
    assert row["completed"] == 4
    assert row["request_goodput"] == 0


def test_open_loop_sends_at_the_rate_and_reports_errors_as_failures(scripted, recorded):
    opts = LoadOptions(input_len="8", output_len="3", num_prompts=6, warmup=0, request_rate=float("inf"))
    (row,) = asyncio.run(sweep(scripted, "scripted", (1000, 2000), opts))
    ((records, duration),) = recorded
    assert row["completed"] == 6
    for rec in records:
        check_timings(rec, 3)
    # all at once: every request is sent before any ends, and the run lasts about one request
    assert max(r.sent for r in records) < min(r.end for r in records)
    assert TTFT + 2 * GAP - EPS <= duration <= TTFT + 2 * GAP + SLACK
    (bad,) = asyncio.run(sweep(scripted + "/nowhere", "scripted", (1000, 2000),
                               LoadOptions(num_prompts=2, warmup=0, concurrency="1", output_len="2")))
    assert bad["completed"] == 0
    assert bad["failed"] == 2
    assert bad["errors"]


def test_summary_arithmetic_on_hand_made_records():
    recs = [RequestRecord(10, sent=0.0, chunk_times=[0.1, 0.2, 0.4], end=0.4, output_tokens=3, ok=True),
            RequestRecord(20, sent=1.0, chunk_times=[1.3, 1.4], end=1.5, output_tokens=2, ok=True),
            RequestRecord(30, sent=2.0, end=2.1, error="HTTP 500")]
    s = summarize(recs, duration=2.0, slo_ttft_ms=200)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 30
    assert s["total_output_tokens"] == 5
    assert s["mean_ttft_ms"] == pytest.approx(200)  # 100 and 300
    assert s["mean_tpot_ms"] == pytest.approx((150 + 200) / 2)  # (400-100)/2 and (500-300)/1
    assert s["median_itl_ms"] == pytest.approx(100)  # 100, 200, 100
    assert s["request_goodput"] == pytest.approx(0.5)  # one of two within 200 ms TTFT
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5


def test_workloads_are_seeded_and_shaped_as_named():
    base = WorkloadSpec(num_prompts=20, input_len="10:20", output_len="5", seed=3)
    a, b = generate(base), generate(base)
    assert a == b
    assert all(10 <= len(s.turns[0].new_tokens) <= 20 and s.turns[0].max_tokens == 5 for s in a)
    prefixed = generate(WorkloadSpec(name="shared-prefix", num_prompts=5, input_len="8", prefix_len=64))
    heads = {s.turns[0].new_tokens[:64] for s in prefixed}
    assert len(heads) == 1
    assert all(len(s.turns[0].new_tokens) == 72 for s in prefixed)
    multi = generate(WorkloadSpec(name="multi-turn", num_prompts=3, turns=4))
    assert all(len(s.turns) == 4 for s in multi)
    heavy = generate(WorkloadSpec(name="prefill-heavy", num_prompts=2))
    assert len(heavy[0].turns[0].new_tokens) == 1024
    assert heavy[0].turns[0].max_tokens == 16
    tails = [len(s.turns[0].new_tokens) for s in generate(WorkloadSpec(name="sharegpt", num_prompts=200,
                                                                        input_len="1:4096"))]
    assert max(tails) > 4 * sorted(tails)[len(tails) // 2]  # long-tailed


def test_a_small_real_compare_writes_every_file_with_consistent_numbers(tmp_path, monkeypatch):
    from disagg.bench.compare import run, write

    monkeypatch.setenv("DISAGG_CACHE_DIR", str(tmp_path / "cache"))  # the clusters' disk pool goes there

    load = LoadOptions(input_len="24", output_len="6", num_prompts=4, warmup=1, concurrency="1,2")
    opts = CompareOptions(budget=2, out_dir=str(tmp_path))
    doc = run(opts, load, EngineConfig(model="tiny", device="cpu", kv_cache_memory="32MiB"))
    files = write(doc, str(tmp_path))
    names = {f.name for f in files}
    assert {"results.json", "results.csv", "report.html", "throughput.png", "ttft.png", "tpot.png",
            "goodput.png"} <= names
    assert all(f.stat().st_size > 0 for f in files)
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {(r["arch"], r["concurrency"]) for r in rows} == {
        (a, c) for a in ("single", "replicated", "disaggregated") for c in (1, 2)}
    for r in rows:
        assert r["completed"] + r["failed"] == 4
        assert r["total_output_tokens"] == 6 * r["completed"]
        assert r["total_input_tokens"] == 24 * r["completed"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    report = (tmp_path / "report.html").read_text()
    assert "budget" in report.lower()
    assert report.count("data:image/png;base64,") == 4
    for sentence in doc["findings"]["sentences"]:
        assert sentence in report
    assert any("replicated on output throughput" in s for s in doc["findings"]["sentences"])


def test_crossover_needs_a_win_beyond_the_tie_margin_and_the_spread():
    from disagg.metrics import crossover

    def point(v, spread=0.0):
        return {"output_throughput": v, "spread_output_throughput": spread}

    avg = {("replicated", 1): point(100), ("disaggregated", 1): point(90),
           ("replicated", 4): point(100), ("disaggregated", 4): point(104),  # within 5%: a tie
           ("replicated", 8): point(100, 10), ("disaggregated", 8): point(112, 10),  # within the spread
           ("replicated", 16): point(100), ("disaggregated", 16): point(120)}
    assert crossover(avg, "output_throughput", 0.05) == 16
    assert crossover(avg, "output_throughput", 0.0) == 4
    del avg[("disaggregated", 16)]
    assert crossover(avg, "output_throughput", 0.05) is None


def test_every_load_point_gets_fresh_prompts(monkeypatch):
    import disagg.bench.bench as bench

    seen: list[list[tuple[int, ...]]] = []

    async def fake_run_load(client, sessions, load, warmup, on_done):
        seen.append([s.turns[0].new_tokens for s in sessions])
        return [], 1.0

    monkeypatch.setattr(bench, "run_load", fake_run_load)
    asyncio.run(bench.sweep("http://127.0.0.1:9", "m", (1000, 2000), LoadOptions(concurrency="1,2,4", num_prompts=3)))
    assert len(seen) == 3
    flat = [p for point in seen for p in point]
    assert len(set(flat)) == len(flat), "a prompt repeats across load points: the prefix cache would serve it"


def test_calibrate_through_a_server_writes_a_profile_the_planner_reads(scripted, tmp_path):
    from disagg.bench.calibrate import main as calibrate
    from disagg.sim.options import CalibrateOptions, PlanOptions
    from disagg.sim.planner import plan

    profile = tmp_path / "profile.toml"
    opts = CalibrateOptions(url=scripted, out=str(profile), lengths="16,64", batches="1,2", decode_context=32)
    assert calibrate(opts, EngineConfig(model="tiny", device="cpu")) == 0
    text = profile.read_text()
    assert "[device.this-machine]" in text
    assert "[link.this-machine-loopback]" in text
    result = plan(PlanOptions(model="tiny", hardware="this-machine", link="this-machine-loopback", units=2,
                              dtype="fp32", input_len="64", output_len="8", concurrency="1", profile=str(profile)))
    # the scripted server answers every prompt after TTFT and a token every GAP, whatever the load: the
    # fit may land a little under what was measured, a loaded machine adds up to SLACK to the TTFT measured
    # and SLACK spread over 32 tokens to the TPOT
    single = next(p for p in result["predictions"] if p["arch"] == "single")
    assert 0.75 * 1000 * TTFT <= single["ttft_p50_ms"] <= 1000 * (TTFT + SLACK)
    assert 0.75 * 1000 * GAP <= single["tpot_p50_ms"] <= 1.25 * 1000 * GAP
