"""Typed options of the KV commands (light: the CLI builds its flags from them at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.cli_args import described as _help


@dataclass(frozen=True)
class TransferBenchOptions:
    """what to measure (each flag also reads DISAGG_<FLAG> from the environment)"""

    transport: str = field(default="tcp", metadata=_help("tcp, shm or nixl"))
    sizes: str = field(default="1M,8M,64M,512M", metadata=_help("payload sizes, comma-separated (K, M, G: binary)"))
    repeats: int = field(default=10, metadata=_help("pulls per size"))
    kv_bandwidth: str | None = field(default=None, metadata=_help("emulated link rate, e.g. 10gbit"))
    kv_latency: str | None = field(default=None, metadata=_help("emulated one-way delay, e.g. 20us"))
