"""Typed options of `disagg plan` and `disagg calibrate` (light: the CLI builds its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.cli_args import described as _help
from disagg.errors import ConfigError
from disagg.parsing import parse_ints, parse_len

# The reference paper's situations, as plan settings; a scenario with several entries compares them.
SCENARIOS: dict[str, list[dict[str, object]]] = {
    # its lab: two GPUs, single vs replicated vs 1P1D, an 8B model
    "lab-2gpu": [{"model": "llama-3.1-8b", "hardware": "h100-sxm", "units": 2, "link": "tcp-100g",
                  "input_len": "1024", "output_len": "256", "concurrency": "1,2,4,8,16,32"}],
    # 70B at 32k context: the KV of one prompt is 10 GiB; TCP 10 GbE vs RDMA 400G
    "70b-tcp-vs-rdma": [{"model": "llama-3-70b", "hardware": "h100-sxm", "units": 16, "link": link,
                         "input_len": "32000", "output_len": "256", "concurrency": "1,2,4,8",
                         "slo_ttft_ms": 30000, "slo_tpot_ms": 60} for link in ("tcp-10g", "rdma-400g")],
    # prefill on one GPU, decode on a dual-Xeon node, over 1 and 10 GbE
    "gpu-prefill-cpu-decode": [{"model": "llama-3.1-8b", "hardware": "h100-sxm", "units": 1,
                                "decode_hardware": "dual-xeon", "decode_units": 1, "link": link,
                                "input_len": "2048", "output_len": "256", "concurrency": "1,4,16",
                                "slo_tpot_ms": 200} for link in ("tcp-1g", "tcp-10g")],
}


@dataclass(frozen=True)
class PlanOptions:
    """what to plan for (each flag also reads DISAGG_<FLAG> from the environment)"""

    model: str = field(default="llama-3.1-8b", metadata=_help("a preset or a Hugging Face config.json"))
    hardware: str = field(default="h100-sxm", metadata=_help("device from the catalog, or this-machine "
                                                             "(after disagg calibrate)"))
    units: int = field(default=8, metadata=_help("devices in the budget, shared by every architecture"))
    link: str = field(default="rdma-400g", metadata=_help("link between prefill and decode workers"))
    dtype: str = field(default="bf16", metadata=_help("weights and KV dtype"))
    input_len: str = field(default="2048", metadata=_help("prompt tokens, or a range lo:hi"))
    output_len: str = field(default="256", metadata=_help("output tokens, or a range lo:hi"))
    concurrency: str = field(default="1,2,4,8,16,32,64", metadata=_help("closed-loop concurrencies"))
    num_prompts: int = field(default=0, metadata=_help("simulated requests per point (0: 4 x concurrency, "
                                                       "at least 64)"))
    slo_ttft_ms: float | None = field(default=None, metadata=_help("goodput SLO on time to first token"))
    slo_tpot_ms: float | None = field(default=None, metadata=_help("goodput SLO on time per output token"))
    decode_hardware: str | None = field(default=None, metadata=_help("disaggregated: decode on other hardware "
                                                                     "(e.g. dual-xeon)"))
    decode_units: int | None = field(default=None, metadata=_help("with --decode-hardware: its units"))
    token_budget: int | None = field(default=None, metadata=_help("tokens per engine step (default: 8192 on "
                                                                  "GPUs, 512 on CPUs)"))
    max_seqs: int = field(default=256, metadata=_help("most sequences a worker runs at once"))
    hop_ms: float = field(default=0.0, metadata=_help("milliseconds a proxy hop adds"))
    catalog: str | None = field(default=None, metadata=_help("TOML file adding or overriding devices and links"))
    profile: str | None = field(default=None, metadata=_help("calibrated profile (default "
                                                             "~/.cache/disagg/profile.toml if present)"))
    json: bool = field(default=False, metadata=_help("print the predictions as JSON"))
    plot: str | None = field(default=None, metadata=_help("write a PNG of the predictions here"))
    tie_margin: float = field(default=0.05, metadata=_help("a win needs this relative margin"))
    scenario: str | None = field(default=None, metadata=_help("a preset from the reference paper instead: "
                                                              "lab-2gpu, 70b-tcp-vs-rdma, gpu-prefill-cpu-decode"))

    def __post_init__(self) -> None:
        parse_len(self.input_len, "input-len")
        parse_len(self.output_len, "output-len")
        parse_ints(self.concurrency, "concurrency")
        if self.units < 1:
            raise ConfigError("--units must be >= 1")
        if self.scenario is not None and self.scenario not in SCENARIOS:
            raise ConfigError(f"unknown scenario {self.scenario!r}; known: {', '.join(SCENARIOS)}")


@dataclass(frozen=True)
class CalibrateOptions:
    """what to measure (each flag also reads DISAGG_<FLAG> from the environment)"""

    url: str | None = field(default=None, metadata=_help("measure a running server instead of the local engine "
                                                         "(--model names its architecture)"))
    out: str | None = field(default=None, metadata=_help("profile file to write (default "
                                                         "~/.cache/disagg/profile.toml)"))
    lengths: str = field(default="128,256,512,1024", metadata=_help("prompt lengths to time prefill at"))
    batches: str = field(default="1,4,16", metadata=_help("batch sizes to time decode steps at"))
    decode_context: int = field(default=256, metadata=_help("context length of the decode measurements"))

    def __post_init__(self) -> None:
        parse_ints(self.lengths, "lengths")
        parse_ints(self.batches, "batches")
