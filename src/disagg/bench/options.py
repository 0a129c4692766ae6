"""Typed options of `disagg bench`, `disagg compare` and `disagg transfer-bench` (light: the CLI builds
its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.cli_args import described as _help
from disagg.errors import ConfigError
from disagg.parsing import parse_ints, parse_len

ARCH_CHOICES = ("single", "replicated", "disaggregated", "single-all")


@dataclass(frozen=True)
class LoadOptions:
    """workload and load (each flag also reads DISAGG_<FLAG> from the environment)"""

    workload: str = field(default="random", metadata=_help("random, sharegpt, shared-prefix, multi-turn, "
                                                           "prefill-heavy or decode-heavy"))
    input_len: str = field(default="256", metadata=_help("prompt tokens, or a range lo:hi"))
    output_len: str = field(default="64", metadata=_help("output tokens (max_tokens), or a range lo:hi"))
    prefix_len: int = field(default=512, metadata=_help("shared-prefix: tokens of the shared system prompt"))
    turns: int = field(default=3, metadata=_help("multi-turn: turns per session"))
    num_prompts: int = field(default=32, metadata=_help("requests (sessions) per load point"))
    warmup: int = field(default=2, metadata=_help("warm-up requests before each load point, not recorded"))
    concurrency: str = field(default="1,2,4,8", metadata=_help("closed-loop concurrencies to sweep, e.g. "
                                                               "1,2,4,8,16,32"))
    request_rate: float | None = field(default=None, metadata=_help("open loop instead: sessions per second "
                                                                    "(inf: all at once)"))
    burstiness: float = field(default=1.0, metadata=_help("open loop: gamma shape of the gaps (1: Poisson)"))
    max_concurrency: int | None = field(default=None, metadata=_help("open loop: cap on requests in flight"))
    slo_ttft_ms: float | None = field(default=None, metadata=_help("goodput SLO on time to first token"))
    slo_tpot_ms: float | None = field(default=None, metadata=_help("goodput SLO on time per output token"))
    ignore_eos: bool = field(default=True, metadata=_help("ask servers to generate exactly the output length"))
    workload_seed: int = field(default=0, metadata=_help("seed of the generated workload and arrivals"))

    def __post_init__(self) -> None:
        from disagg.bench.workloads import WORKLOADS

        if self.workload not in WORKLOADS:
            raise ConfigError(f"workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        parse_len(self.input_len, "input-len")
        parse_len(self.output_len, "output-len")
        self.concurrencies()
        if self.num_prompts < 1 or self.warmup < 0 or self.turns < 1 or self.prefix_len < 0:
            raise ConfigError("--num-prompts and --turns must be >= 1, --warmup and --prefix-len >= 0")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ConfigError("--request-rate must be > 0 (inf: all at once)")
        if self.burstiness <= 0:
            raise ConfigError("--burstiness must be > 0")

    def concurrencies(self) -> tuple[int, ...]:
        return parse_ints(self.concurrency, "concurrency")


@dataclass(frozen=True)
class BenchOptions:
    """the server (each flag also reads DISAGG_<FLAG> from the environment)"""

    url: str = field(default="http://127.0.0.1:8000", metadata=_help("base URL of an OpenAI-compatible server"))
    model: str | None = field(default=None, metadata=_help("model name to send (default: the server's first)"))
    api_key: str | None = field(default=None, metadata=_help("bearer token, if the server wants one"))
    out: str | None = field(default=None, metadata=_help("write the results as JSON here"))
    timeout: float = field(default=600.0, metadata=_help("seconds to wait for one request"))

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {self.url!r}")


@dataclass(frozen=True)
class CompareOptions:
    """the experiment (each flag also reads DISAGG_<FLAG> from the environment)"""

    budget: int = field(default=2, metadata=_help("units every architecture gets: CPU cores, or GPUs on CUDA"))
    archs: str = field(default="single,replicated,disaggregated", metadata=_help(
        "architectures to compare: single, replicated, disaggregated, single-all"))
    repeat: int = field(default=1, metadata=_help("runs of the whole sweep, to show run-to-run spread"))
    out_dir: str = field(default="results/compare", metadata=_help("where results, plots and report go"))
    kv_bandwidth: str | None = field(default=None, metadata=_help("disaggregated: emulated KV link rate"))
    kv_latency: str | None = field(default=None, metadata=_help("disaggregated: emulated KV link delay"))
    kv_push: bool = field(default=False, metadata=_help("disaggregated: layer-wise KV push instead of pull"))
    routing: str = field(default="round-robin", metadata=_help("the proxies' policy (round-robin: the paper's "
                                                               "stateless proxy; prefix: `disagg up`'s default)"))
    kv_pool: bool = field(default=False, metadata=_help("give workers `disagg up`'s memory + disk KV pool (off: "
                                                        "the paper's architectures, no reuse beyond each "
                                                        "engine's prefix cache)"))
    startup_timeout: float = field(default=300.0, metadata=_help("seconds to wait for a cluster to start"))
    tie_margin: float = field(default=0.05, metadata=_help("a win needs this relative margin (and more than the "
                                                           "run-to-run spread with --repeat); less is a tie"))

    def __post_init__(self) -> None:
        if self.budget < 1 or self.repeat < 1:
            raise ConfigError("--budget and --repeat must be >= 1")
        if not 0 <= self.tie_margin < 1:
            raise ConfigError("--tie-margin must be in [0, 1)")
        from disagg.serve.routing import ROUTING

        if self.routing not in ROUTING:
            raise ConfigError(f"--routing must be one of {', '.join(ROUTING)}, got {self.routing!r}")
        for arch in self.arch_list():
            if arch not in ARCH_CHOICES:
                raise ConfigError(f"unknown arch {arch!r}; choose from {', '.join(ARCH_CHOICES)}")

    def arch_list(self) -> tuple[str, ...]:
        archs = tuple(a.strip() for a in self.archs.split(",") if a.strip())
        if not archs:
            raise ConfigError("--archs names no architecture")
        return archs


@dataclass(frozen=True)
class TransferBenchOptions:
    """what to measure (each flag also reads DISAGG_<FLAG> from the environment)"""

    transport: str = field(default="tcp", metadata=_help("tcp, shm or nixl"))
    sizes: str = field(default="1M,8M,64M,512M", metadata=_help("payload sizes, comma-separated (K, M, G: binary)"))
    repeats: int = field(default=10, metadata=_help("pulls per size"))
    kv_bandwidth: str | None = field(default=None, metadata=_help("emulated link rate, e.g. 10gbit"))
    kv_latency: str | None = field(default=None, metadata=_help("emulated one-way delay, e.g. 20us"))
