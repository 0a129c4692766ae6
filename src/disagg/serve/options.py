"""Typed options of the serving commands: worker, proxy and launcher.

Kept free of heavy imports: the CLI builds its flags from these classes at start-up."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disagg.cli_args import described as _help
from disagg.errors import ConfigError
from disagg.kv.address import is_loopback
from disagg.kv.netem import Link

if TYPE_CHECKING:
    from disagg.engine.connector.factory import KVConnectorConfig

ROLES = ("both", "prefill", "decode")
NO_KV_POOL = {"kv_pool_memory": "0", "kv_pool_dir": ""}  # UpOptions fields for workers without a KV pool
MODES = ("single", "replicated", "disaggregated")
ARCHS = ("single", "replicated", "disaggregated", "single-all")
KV_TRANSPORTS = ("tcp", "shm", "nixl")


KV_CODECS = ("none", "fp16", "fp8", "int8", "int4")  # kv/codecs.py's, kept here so the CLI starts without torch


def _check_routing(name: str) -> None:
    from disagg.serve.routing import ROUTING

    if name not in ROUTING:
        raise ConfigError(f"routing must be one of {', '.join(ROUTING)}, got {name!r}")


def _check_kv_bind(flag: str, host: str) -> None:
    if not is_loopback(host) and not os.environ.get("DISAGG_KV_SECRET"):
        raise ConfigError(f"--{flag} {host} puts a KV port beyond loopback: set DISAGG_KV_SECRET (every KV peer "
                          "then proves it knows it), or bind 127.0.0.1")


def _check_transport(name: str, codec: str) -> None:
    if name not in KV_TRANSPORTS:
        raise ConfigError(f"kv_transport must be one of {', '.join(KV_TRANSPORTS)}, got {name!r}")
    if name == "nixl" and not any(importlib.util.find_spec(m) for m in ("nixl", "nixl_cu12", "nixl_cu13")):
        raise ConfigError("kv_transport nixl needs NIXL: pip install --no-deps nixl-cu12 (UCX_TLS=tcp without RDMA)")
    if codec not in KV_CODECS:
        raise ConfigError(f"kv_codec must be one of {', '.join(KV_CODECS)}, got {codec!r}")


def _check_pool(redis_url: str | None, *sizes: str) -> None:
    """The pool's Redis URL and byte budgets, checked here so `up` fails before starting a worker."""
    from disagg.engine.config import parse_bytes

    for size in sizes:
        parse_bytes(size)
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"kv_pool_redis must be a redis://host:port/db URL, got {redis_url!r}")


def _check_conditional(threshold: int, queue_limit: int) -> None:
    if threshold < 0 or queue_limit < 0:
        raise ConfigError("local_prefill_threshold and prefill_queue_limit must be >= 0")


@dataclass(frozen=True)
class WorkerWatch:
    """Worker settings `disagg up` passes on to its workers (one definition for both commands)."""

    stall_timeout: float = field(default=60.0, metadata=_help(
        "seconds the engine may have work and finish no step before /health reports it unhealthy"))

    def __post_init__(self) -> None:
        if self.stall_timeout <= 0:
            raise ConfigError(f"stall_timeout must be > 0 seconds, got {self.stall_timeout}")


@dataclass(frozen=True)
class Resilience:
    """How the proxy bounds, judges and moves requests (shared by `proxy` and `up`)."""

    connect_timeout: float = field(default=5.0, metadata=_help("seconds to connect to a worker"))
    prefill_timeout: float = field(default=300.0, metadata=_help(
        "seconds to wait for a prefill worker's answer (its token 1)"))
    first_token_timeout: float = field(default=300.0, metadata=_help(
        "seconds to wait for a worker's first streamed token (decode, or a whole request)"))
    stream_idle_timeout: float = field(default=30.0, metadata=_help(
        "most seconds between two chunks of a worker's stream"))
    timeout: float = field(default=600.0, metadata=_help("seconds to wait for a worker's whole non-streamed answer"))
    migration_limit: int = field(default=3, metadata=_help(
        "times a request may move to another worker when its worker dies or hangs (0: never)"))
    health_interval: float = field(default=1.0, metadata=_help("seconds between the proxy's /health probes of a "
                                                               "worker"))
    health_timeout: float = field(default=3.0, metadata=_help("a /health probe slower than this fails"))
    breaker_threshold: int = field(default=3, metadata=_help(
        "failures in a row (probes, connections) that take a worker out of rotation"))
    breaker_cooldown: float = field(default=5.0, metadata=_help(
        "seconds before a worker out of rotation gets one trial request (half-open)"))

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "prefill_timeout", "first_token_timeout", "stream_idle_timeout", "timeout",
                     "health_interval", "health_timeout", "breaker_cooldown"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.migration_limit < 0 or self.breaker_threshold < 1:
            raise ConfigError("migration_limit must be >= 0 and breaker_threshold >= 1")

    def argv(self) -> list[str]:
        """These settings as proxy flags."""
        return [a for f in dataclasses.fields(Resilience) for a in (f"--{f.name.replace('_', '-')}",
                                                                   str(getattr(self, f.name)))]


@dataclass(frozen=True)
class ServeOptions(WorkerWatch):
    """the worker (each flag also reads DISAGG_<FLAG> from the environment)"""

    host: str = field(default="127.0.0.1", metadata=_help("HTTP bind address"))
    port: int = field(default=8100, metadata=_help("HTTP port"))
    role: str = field(default="both", metadata=_help("both, prefill or decode"))
    kv_host: str = field(default="127.0.0.1", metadata=_help("KV port bind address (beyond loopback needs "
                                                             "DISAGG_KV_SECRET)"))
    kv_port: int = field(default=0, metadata=_help("KV port of a prefill worker (0: any free port)"))
    kv_lease: float = field(default=30.0, metadata=_help("seconds a prefill holds KV blocks for a decode worker"))
    kv_transport: str = field(default="tcp", metadata=_help("how decode workers pull this prefill's KV: tcp, "
                                                               "shm (same host) or nixl (RDMA where present)"))
    kv_codec: str = field(default="none", metadata=_help("decode: ask prefill workers to compress KV on the wire "
                                                          "(none, fp16, fp8, int8, int4)"))
    kv_pool_memory: str = field(default="0", metadata=_help("KV pool memory tier, e.g. 1GiB (0: none): full "
                                                            "prompt blocks kept beyond the KV cache"))
    kv_pool_dir: str | None = field(default=None, metadata=_help("KV pool disk tier directory (survives restarts; "
                                                                 "workers may share it)"))
    kv_pool_disk: str = field(default="16GiB", metadata=_help("byte budget of the disk tier"))
    kv_pool_redis: str | None = field(default=None, metadata=_help("KV pool Redis tier, e.g. redis://127.0.0.1:6379/0 "
                                                                   "(shared by every worker pointed at it)"))
    kv_pool_redis_budget: str = field(default="4GiB", metadata=_help("byte budget of the Redis tier (all workers)"))
    kv_pool_write: str = field(default="through", metadata=_help("KV pool writes: through (every tier at once) or "
                                                                 "back (lower tiers when memory evicts)"))
    kv_bandwidth: str | None = field(default=None, metadata=_help("emulate a link rate for KV sent, e.g. 10gbit"))
    kv_latency: str | None = field(default=None, metadata=_help("emulate a one-way link delay for KV sent, e.g. 20us"))
    cpus: str | None = field(default=None, metadata=_help("pin to these CPU cores, e.g. 0,1 or 2-3 (threads default "
                                                          "to their count)"))
    served_model_name: str | None = field(default=None, metadata=_help("model name clients use (default: --model)"))
    api_key: str | None = field(default=None, metadata=_help("clients must send Authorization: Bearer KEY (every "
                                                             "route but /health and /metrics)"))
    log_level: str = field(default="warning", metadata=_help("uvicorn log level"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 0 < self.port < 65536 or not 0 <= self.kv_port < 65536:
            raise ConfigError("ports must be in 1-65535 (kv_port 0 picks a free one)")
        if self.kv_lease <= 0:
            raise ConfigError(f"kv_lease must be > 0 seconds, got {self.kv_lease}")
        _check_kv_bind("kv-host", self.kv_host)
        self.cpu_list()
        self.link()
        _check_transport(self.kv_transport, self.kv_codec)
        _check_pool(self.kv_pool_redis, self.kv_pool_memory, self.kv_pool_disk, self.kv_pool_redis_budget)
        if self.kv_pool_write not in ("through", "back"):
            raise ConfigError(f"kv_pool_write must be through or back, got {self.kv_pool_write!r}")

    def link(self) -> Link:
        return Link.parse(self.kv_bandwidth, self.kv_latency)

    def kv_connector(self) -> KVConnectorConfig:
        """The engine's KV connector as these options configure it (DISAGG_KV_SECRET included)."""
        from disagg.engine.config import parse_bytes
        from disagg.engine.connector.factory import KVConnectorConfig, PoolConfig

        pool = PoolConfig(parse_bytes(self.kv_pool_memory), self.kv_pool_dir or None, parse_bytes(self.kv_pool_disk),
                          self.kv_pool_redis or None, parse_bytes(self.kv_pool_redis_budget), self.kv_pool_write)
        return KVConnectorConfig(self.kv_host, self.kv_port, self.kv_transport, self.kv_codec, self.kv_lease,
                                 os.environ.get("DISAGG_KV_SECRET") or None, self.link(), pool)

    def cpu_list(self) -> list[int] | None:
        if not self.cpus:
            return None
        try:
            cpus: list[int] = []
            for part in self.cpus.split(","):
                lo, _, hi = part.partition("-")
                cpus.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ConfigError(f"cpus must look like 0,1 or 2-3, got {self.cpus!r}") from None
        return cpus


@dataclass(frozen=True)
class ProxyOptions(Resilience):
    """the proxy (each flag also reads DISAGG_<FLAG> from the environment)"""

    mode: str = field(default="single", metadata=_help("single, replicated or disaggregated"))
    worker: tuple[str, ...] = field(default=(), metadata=_help("worker URL (single, replicated)"))
    prefill: tuple[str, ...] = field(default=(), metadata=_help("prefill worker URL (disaggregated)"))
    decode: tuple[str, ...] = field(default=(), metadata=_help("decode worker URL (disaggregated)"))
    host: str = field(default="127.0.0.1", metadata=_help("HTTP bind address"))
    port: int = field(default=8000, metadata=_help("HTTP port"))
    stream_first_token: bool = field(default=True, metadata=_help("send token 1 from prefill at once and pass it "
                                                                  "to decode (off: decode recomputes it, as vLLM)"))
    kv_push: bool = field(default=False, metadata=_help("disaggregated: pick the decode worker first and have "
                                                        "prefill push the KV layer by layer as it computes"))
    routing: str = field(default="prefix", metadata=_help("prefix (to the worker holding most of the prompt's KV, "
                                                          "weighed against load), round-robin, least-load "
                                                          "(outstanding tokens) or session (user/session_id keeps "
                                                          "its worker)"))
    local_prefill_threshold: int = field(default=0, metadata=_help(
        "disaggregated: a prompt whose uncached part is shorter than this many tokens is prefilled by the decode "
        "worker itself (0: always remote)"))
    prefill_queue_limit: int = field(default=0, metadata=_help(
        "disaggregated: when every prefill worker has this many requests in flight, decode workers prefill "
        "locally (0: no limit)"))
    api_key: str | None = field(default=None, metadata=_help("clients must send Authorization: Bearer KEY (every "
                                                             "route but /health and /metrics)"))
    worker_api_key: str | None = field(default=None, metadata=_help("the key the proxy sends to workers started "
                                                                    "with --api-key"))
    log_level: str = field(default="warning", metadata=_help("uvicorn log level"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_routing(self.routing)
        _check_conditional(self.local_prefill_threshold, self.prefill_queue_limit)
        if self.mode == "single" and len(self.worker) != 1:
            raise ConfigError("--mode single takes exactly one --worker URL")
        if self.mode == "replicated" and not self.worker:
            raise ConfigError("--mode replicated takes one or more --worker URLs")
        if self.mode == "disaggregated" and not (self.prefill and self.decode):
            raise ConfigError("--mode disaggregated takes --prefill URL(s) and --decode URL(s)")
        for url in (*self.worker, *self.prefill, *self.decode):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"worker URL {url!r} must start with http:// or https://")


@dataclass(frozen=True)
class UpOptions(Resilience, WorkerWatch):
    """the local cluster (each flag also reads DISAGG_<FLAG> from the environment)"""

    arch: str = field(default="single", metadata=_help("single, replicated, disaggregated, or single-all (one "
                                                       "worker given the whole budget)"))
    budget: int = field(default=2, metadata=_help("units to use: CPU cores, or GPUs when the device is CUDA"))
    prefill: int | None = field(default=None, metadata=_help("prefill units (disaggregated; default: half)"))
    decode: int | None = field(default=None, metadata=_help("decode units (disaggregated; default: the rest)"))
    host: str = field(default="127.0.0.1", metadata=_help("bind address of the proxy and workers"))
    port: int = field(default=8000, metadata=_help("the proxy's port, the cluster's endpoint"))
    stream_first_token: bool = field(default=True, metadata=_help("disaggregated: stream token 1 from prefill"))
    kv_push: bool = field(default=False, metadata=_help("disaggregated: prefill pushes KV layer by layer to a "
                                                        "decode worker chosen up front (instead of decode pulling)"))
    routing: str = field(default="prefix", metadata=_help("the proxy's policy: prefix, round-robin, least-load or "
                                                          "session"))
    local_prefill_threshold: int = field(default=0, metadata=_help("disaggregated: prompts with fewer uncached "
                                                                   "tokens are prefilled on the decode worker"))
    prefill_queue_limit: int = field(default=0, metadata=_help("disaggregated: requests in flight per prefill "
                                                               "worker beyond which decode prefills locally"))
    kv_lease: float = field(default=30.0, metadata=_help("seconds a prefill worker holds KV for decode"))
    kv_transport: str = field(default="tcp", metadata=_help("tcp, shm (shared memory between the workers) or nixl"))
    kv_codec: str = field(default="none", metadata=_help("KV wire codec: none, fp16, fp8, int8 or int4"))
    kv_bandwidth: str | None = field(default=None, metadata=_help("emulated KV link rate, e.g. 10gbit"))
    kv_latency: str | None = field(default=None, metadata=_help("emulated KV link one-way delay, e.g. 20us"))
    kv_pool_memory: str = field(default="1GiB", metadata=_help("each worker's KV pool memory tier (0: none)"))
    kv_pool_dir: str = field(default="auto", metadata=_help("KV pool disk tier directory, shared by the workers "
                                                            "(auto: ~/.cache/disagg/kv-pool; '': none)"))
    kv_pool_disk: str = field(default="16GiB", metadata=_help("byte budget of the disk tier"))
    kv_pool_redis: str | None = field(default=None, metadata=_help("KV pool Redis tier URL shared by the workers"))
    startup_timeout: float = field(default=300.0, metadata=_help("seconds to wait for every worker's /health"))
    log_dir: str | None = field(default=None, metadata=_help("where worker logs go (default: a temporary folder)"))
    api_key: str | None = field(default=None, metadata=_help("clients of the proxy must send Authorization: Bearer "
                                                             "KEY (the workers always get a key of their own)"))
    restart: bool = field(default=True, metadata=_help("restart a worker (or the proxy) that exits, with back-off "
                                                       "(off: stop the cluster)"))

    def __post_init__(self) -> None:
        Resilience.__post_init__(self)
        WorkerWatch.__post_init__(self)
        if self.arch not in ARCHS:
            raise ConfigError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.budget < 1:
            raise ConfigError(f"budget must be at least 1 unit, got {self.budget}")
        Link.parse(self.kv_bandwidth, self.kv_latency)
        _check_transport(self.kv_transport, self.kv_codec)
        _check_kv_bind("host", self.host)  # the workers' KV ports bind it too
        _check_routing(self.routing)
        _check_pool(self.kv_pool_redis, self.kv_pool_memory, self.kv_pool_disk)
        _check_conditional(self.local_prefill_threshold, self.prefill_queue_limit)
        if self.arch != "disaggregated" and (self.prefill or self.decode):
            raise ConfigError("--prefill and --decode apply to --arch disaggregated only")
        if self.arch == "disaggregated":
            if self.budget < 2:
                raise ConfigError("disaggregated needs a budget of at least 2 units (one prefill, one decode)")
            p, d = self.split()
            if p < 1 or d < 1 or p + d > self.budget:
                raise ConfigError(f"--prefill {p} + --decode {d} must each be >= 1 and fit the budget of {self.budget}")

    def pool_dir(self) -> str | None:
        if self.kv_pool_dir == "auto":
            from disagg.paths import default_kv_pool_dir

            return str(default_kv_pool_dir())
        return self.kv_pool_dir or None

    def split(self) -> tuple[int, int]:
        """(prefill units, decode units) of a disaggregated cluster."""
        p = self.prefill if self.prefill is not None else max(1, self.budget // 2)
        d = self.decode if self.decode is not None else self.budget - p
        return p, d
