"""The simulator on hand-computable cases, the planner's sanity against published results, and
`sim/` staying free of torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from disagg.sim.cost import Efficiency, WorkerCost
from disagg.sim.hardware import DEVICES, LINKS, Device, Link, load_catalog
from disagg.sim.model import ModelSpec
from disagg.sim.options import PlanOptions
from disagg.sim.planner import plan
from disagg.sim.simulator import Cluster, EventLoop, simulate

# a device with round numbers: 1 TFLOP/s, 1 TB/s, no overhead, factors 1
UNIT = Device("unit", "gpu", {"bf16": 1e12}, 1e12, 1e12, "test", mfu=1.0, bw_util=1.0)


def cost(model="llama-3.2-1b") -> WorkerCost:
    return WorkerCost(ModelSpec.named(model), UNIT, "bf16", Efficiency.of(UNIT))


def test_kv_bytes_per_token_of_llama_3_1_8b_fp16_is_128_kib():
    assert ModelSpec.named("llama-3.1-8b").kv_bytes_per_token("fp16") == 128 * 1024


def test_sim_does_not_import_torch():
    code = ("import sys; from disagg.sim.planner import plan; from disagg.sim.options import PlanOptions; "
            "plan(PlanOptions(concurrency='1,2', units=2)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_event_loop_runs_in_time_order_and_keeps_insertion_order_for_ties():
    loop, seen = EventLoop(), []
    loop.at(2.0, lambda: seen.append("b"))
    loop.at(1.0, lambda: (seen.append("a"), loop.at(2.0, lambda: seen.append("c"))))
    loop.run()
    assert seen == ["a", "b", "c"]
    assert loop.now == 2.0


def test_one_request_takes_its_prefill_then_one_step_per_token():
    c = cost()
    (r,) = simulate(Cluster(c, workers=1, token_budget=4096), [(1000, 5)], concurrency=1)
    prefill = c.step_time([(1000, 0)], [])
    steps = [c.step_time([], [1000 + k]) for k in range(1, 5)]  # contexts 1001..1004
    assert r.token_times[0] == pytest.approx(prefill)
    assert r.end == pytest.approx(prefill + sum(steps))
    assert len(r.token_times) == 5


def test_two_requests_share_a_step_and_a_queue_waits_for_a_slot():
    c = cost()
    a, b = simulate(Cluster(c, workers=1, token_budget=4096), [(100, 2), (100, 2)], concurrency=2)
    both = c.step_time([(100, 0), (100, 0)], [])
    assert a.token_times[0] == pytest.approx(both) == pytest.approx(b.token_times[0])
    # one slot: the second request starts when the first has finished
    a, b = simulate(Cluster(c, workers=1, token_budget=4096, max_seqs=1), [(100, 2), (100, 2)], concurrency=2)
    assert b.token_times[0] == pytest.approx(a.end + c.step_time([(100, 0)], []))


def test_disaggregated_adds_the_link_between_token_1_and_token_2():
    c = cost()
    link = Link("slow", 1e9, 1e-3, "test")
    (r,) = simulate(Cluster(c, prefill=1, decode=1, link=link, token_budget=4096), [(160, 3)], concurrency=1)
    kv = 160 * c.model.kv_bytes_per_token("bf16")
    prefill = c.step_time([(160, 0)], [])
    assert r.token_times[0] == pytest.approx(prefill)
    assert r.token_times[1] == pytest.approx(prefill + link.transfer_time(kv) + c.step_time([], [161]))


def test_a_single_request_is_slowest_disaggregated():
    p = plan(PlanOptions(model="llama-3.1-8b", hardware="h100-sxm", units=2, link="tcp-10g", concurrency="1"))
    e2e = {x["arch"]: x["e2el_p50_ms"] for x in p["predictions"]}
    assert e2e["disaggregated"] > e2e["replicated"]
    assert e2e["disaggregated"] > e2e["single"]


def test_a_slow_link_and_long_context_make_disaggregation_lose():
    p = plan(PlanOptions(model="llama-3-70b", hardware="h100-sxm", units=16, link="tcp-10g", input_len="8000",
                         output_len="64", concurrency="4,16", slo_ttft_ms=3000, slo_tpot_ms=100))
    assert p["recommendation"]["arch"] != "disaggregated"
    assert p["crossover_concurrency"] is None


def test_long_prompts_and_a_tight_tpot_slo_favour_disaggregation_on_goodput():
    # DistServe's direction: colocated prefills stall decodes past the TPOT target
    p = plan(PlanOptions(model="llama-3.1-8b", hardware="h100-sxm", units=8, link="rdma-400g", input_len="8192",
                         output_len="256", concurrency="32,64", slo_ttft_ms=4000, slo_tpot_ms=15))
    assert p["recommendation"]["arch"] == "disaggregated"
    assert p["crossover_concurrency"] is not None
    rec = p["recommendation"]
    assert rec["prefill_units"] + rec["decode_units"] <= 8


def test_without_slos_equal_budget_throughput_favours_replication_or_ties():
    p = plan(PlanOptions(model="llama-3.1-8b", hardware="h100-sxm", units=4, link="rdma-400g",
                         concurrency="4,16,64"))
    by = {(x["arch"], x["concurrency"]): x["output_throughput"] for x in p["predictions"]}
    for c in (4, 16, 64):
        assert by[("disaggregated", c)] <= by[("replicated", c)] * 1.05
    assert p["recommendation"]["arch"] == "replicated"


def test_json_has_the_documented_shape():
    out = subprocess.run([sys.executable, "-m", "disagg.cli", "plan", "--units", "2", "--concurrency", "1,4",
                          "--json"], capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    assert set(doc) >= {"predictions", "crossover_concurrency", "recommendation"}
    keys = {"arch", "units", "prefill_units", "decode_units", "concurrency", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "output_throughput", "goodput"}
    assert all(keys <= set(p) for p in doc["predictions"])
    assert {p["arch"] for p in doc["predictions"]} == {"single", "replicated", "disaggregated"}
    assert set(doc["recommendation"]) == {"arch", "prefill_units", "decode_units", "reasons"}


def test_a_70b_model_spans_several_gpus_and_a_catalog_file_adds_hardware(tmp_path):
    assert WorkerCost.fit(ModelSpec.named("llama-3-70b"), DEVICES["h100-sxm"], "bf16").tp == 4
    f = tmp_path / "mine.toml"
    f.write_text('[device.my-gpu]\nkind = "gpu"\nflops = { bf16 = 1e14 }\nmem_bw = 1e12\nmem_bytes = 4.8e10\n'
                 'source = "made up"\n[link.my-net]\nbandwidth = 1e9\nlatency = 1e-5\nsource = "made up"\n')
    devices, links = load_catalog(f)
    assert devices["my-gpu"].mem_bw == 1e12
    assert links["my-net"].bandwidth == 1e9
    assert "h100-sxm" in devices
    assert "rdma-400g" in LINKS


def test_calibration_fit_recovers_the_factors_it_was_made_with():
    from disagg.bench.calibrate import fit

    spec = ModelSpec.named("smollm2-135m")
    true = {"prefill_flops": 200e9, "attn_flops": 60e9, "bandwidth": 25e9, "decode_flops": 80e9}
    dev = Device("synthetic", "cpu", {"fp32": true["prefill_flops"]}, true["bandwidth"], 16e9, "test", mfu=1.0,
                 bw_util=1.0, decode_mfu=true["decode_flops"] / true["prefill_flops"],
                 attn_mfu=true["attn_flops"] / true["prefill_flops"], overlap=False)
    c = WorkerCost(spec, dev, "fp32", Efficiency.of(dev))

    measured = {"prefill": {n: c.prefill_time(n, 512) for n in (128, 256, 512, 1024)},
                "decode": {b: c.decode_step_time(b, 256) for b in (1, 4, 16)}}
    got = fit(spec, "fp32", measured, 512, 256)
    for k, v in true.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
