"""Prometheus metrics of one worker, in a registry of its own (so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only add noise to a scrape

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class WorkerMetrics:
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("disagg_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("disagg_request_errors", "Requests answered with an error, by HTTP status", ["status"],
                              registry=r)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("disagg_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("disagg_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("disagg_time_per_output_token_seconds", "Mean time per output token after the first",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.kv_bytes_sent = Counter("disagg_kv_bytes_sent", "KV bytes served to decode workers", registry=r)
        self.kv_bytes_received = Counter("disagg_kv_bytes_received", "KV bytes received from prefill workers "
                                         "(pulled or pushed)", registry=r)
        self.kv_pulls = Counter("disagg_kv_pulls", "KV transfers received, by transport (tcp, shm, nixl; push)",
                                ["via"], registry=r)
        self.kv_pull_failures = Counter("disagg_kv_pull_failures", "KV transfers that failed (a pull is then "
                                        "recomputed, a push fails its request)", registry=r)
        self.kv_lease_renewals = Counter("disagg_kv_lease_renewals", "Leases renewed by a decode worker that waits for "
                                         "cache blocks", registry=r)
        self.pool_tokens_saved = Counter("disagg_kv_pool_saved_tokens", "Prompt tokens loaded instead of computed",
                                         registry=r)
        self.pool_writes_dropped = Counter("disagg_kv_pool_dropped_writes", "Prompts not stored in the KV pool "
                                           "because its writer was too far behind", registry=r)
        self.pool_load = Histogram("disagg_kv_pool_load_seconds", "Time to look up and load pooled blocks",
                                   registry=r, buckets=_LATENCY_BUCKETS)
        self.kv_leases_expired = Counter("disagg_kv_leases_expired", "Held KV freed because no decode pulled it",
                                         registry=r)
        gauges = {
            "running": ("disagg_requests_running", "Requests running in the engine"),
            "waiting": ("disagg_requests_waiting", "Requests waiting for the engine"),
            "held": ("disagg_kv_held_requests", "Finished prefills whose KV blocks are held for a decode worker"),
            "kv_blocks_used": ("disagg_kv_blocks_used", "KV cache blocks in use"),
            "kv_blocks_total": ("disagg_kv_blocks_total", "KV cache blocks in all"),
            "prefix_cache_hits": ("disagg_prefix_cache_hit_blocks", "Prefix-cache hits, in blocks"),
            "preemptions": ("disagg_preemptions", "Requests preempted for recompute"),
        }
        for key, (name, text) in gauges.items():
            Gauge(name, text, registry=r).set_function(lambda key=key: stats()[key])

    # ---- what the KV connector reports (engine/connector/base.py KVMetrics), from any thread ----

    def sent(self, nbytes: int) -> None:
        self.kv_bytes_sent.inc(nbytes)

    def received(self, nbytes: int, via: str) -> None:
        self.kv_bytes_received.inc(nbytes)
        self.kv_pulls.labels(via).inc()

    def load_failed(self) -> None:
        self.kv_pull_failures.inc()

    def lease_renewed(self) -> None:
        self.kv_lease_renewals.inc()

    def lease_expired(self) -> None:
        self.kv_leases_expired.inc()

    def pool_loaded(self, tokens: int, seconds: float) -> None:
        self.pool_tokens_saved.inc(tokens)
        self.pool_load.observe(seconds)

    def pool_write_dropped(self) -> None:
        self.pool_writes_dropped.inc()

    def watch_pool(self, tiers: Sequence[Any]) -> None:
        """Export each KV pool tier's own counters (kv/pool.py TierStats), labelled by tier."""
        self.registry.register(_PoolCollector(tiers))


class _PoolCollector(Collector):
    FIELDS = (("hits", "hit_blocks", "KV pool blocks found"),
              ("misses", "miss_blocks", "Prompt blocks looked up and not found"),
              ("bytes_read", "read_bytes", "Bytes loaded from the KV pool"),
              ("bytes_written", "written_bytes", "Bytes stored into the KV pool"),
              ("corrupt", "corrupt_blocks", "Pool entries that failed their checksum, dropped"),
              ("evicted", "evicted_blocks", "Blocks evicted to keep the tier's byte budget"),
              ("errors", "errors", "Tier operations that failed (answered as misses)"))

    def __init__(self, tiers: Sequence[Any]) -> None:
        self.tiers = tiers

    def collect(self) -> Iterator[CounterMetricFamily]:
        for attr, name, text in self.FIELDS:
            family = CounterMetricFamily(f"disagg_kv_pool_{name}", f"{text}, by tier", labels=["tier"])
            for tier in self.tiers:
                family.add_metric([tier.name], getattr(tier.stats, attr))
            yield family
