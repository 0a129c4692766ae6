"""Latency and throughput metrics, defined once for what `disagg bench` measures and what `disagg plan`
simulates (both emit RequestRecords and summarize them here), so a prediction and a measurement
mean the same thing. The definitions are vLLM's (`vllm bench serve`), and so are the summary's
field names, so existing tooling reads our JSON:

- TTFT: request sent -> first streamed token.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: the gaps between consecutive streamed chunks, over all requests.
- E2E latency (e2el): request sent -> last byte.
- request / output / total-token throughput: completed requests, output tokens, prompt + output
  tokens, each per second of the run.
- goodput (request_goodput): completed requests per second that met every SLO given.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

DEFINITIONS = {
    "TTFT": "request sent -> first streamed token",
    "TPOT": "(E2E - TTFT) / (output tokens - 1), per request",
    "ITL": "gap between consecutive streamed chunks, over all requests",
    "E2EL": "request sent -> response complete",
    "throughput": "completed requests, output tokens, prompt+output tokens per second of the run",
    "goodput": "completed requests per second that met every SLO given (TTFT, TPOT)",
}


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds from the run's start."""

    prompt_tokens: int
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # each streamed chunk with new text
    end: float = 0.0
    output_tokens: int = 0
    ok: bool = False
    error: str = ""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2el(self) -> float:
        return self.end - self.sent

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    def meets(self, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
        if not self.ok:
            return False
        if slo_ttft_ms is not None and (self.ttft is None or self.ttft * 1000 > slo_ttft_ms):
            return False
        return slo_tpot_ms is None or self.tpot is None or self.tpot * 1000 <= slo_tpot_ms


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0 for no data."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: list[RequestRecord], duration: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None, percentiles: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """The run's summary under vLLM's field names (times in ms)."""
    done = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    duration = max(duration, 1e-9)
    result: dict[str, float] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration,
        "request_goodput": sum(r.meets(slo_ttft_ms, slo_tpot_ms) for r in done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [x for r in done for x in r.itls],
        "e2el": [r.e2el for r in done],
    }
    for name, xs in series.items():
        ms = [1000 * x for x in xs]
        result[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        result[f"median_{name}_ms"] = percentile(ms, 50)
        result[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for q in percentiles:
            result[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    return result


def beats(a: dict[str, float], b: dict[str, float], metric: str, margin: float) -> bool:
    """`a` wins on `metric` by more than `margin` (relative) and more than both points' run-to-run
    spread: a difference this machine's noise could make is a tie, not a crossover."""
    gap = a[metric] - b[metric]
    return gap > margin * abs(b[metric]) and gap > a.get(f"spread_{metric}", 0.0) + b.get(f"spread_{metric}", 0.0)


def crossover(avg: dict[tuple[str, int], dict[str, float]], metric: str, margin: float = 0.05) -> int | None:
    """The lowest concurrency at which disaggregated beats replicated on `metric`, or None."""
    cs = sorted({c for a, c in avg if a == "disaggregated"} & {c for a, c in avg if a == "replicated"})
    return next((c for c in cs if beats(avg[("disaggregated", c)], avg[("replicated", c)], metric, margin)), None)
