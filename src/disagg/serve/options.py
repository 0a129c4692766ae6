"""Typed options of a worker process (kept light: the CLI builds its flags from it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.errors import ConfigError

ROLES = ("both", "prefill", "decode")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServeOptions:
    """the worker (each flag also reads DISAGG_<FLAG> from the environment)"""

    host: str = field(default="127.0.0.1", metadata=_help("HTTP bind address"))
    port: int = field(default=8100, metadata=_help("HTTP port"))
    role: str = field(default="both", metadata=_help("both, prefill or decode"))
    kv_host: str = field(default="127.0.0.1", metadata=_help("KV port bind address (beyond loopback needs "
                                                             "DISAGG_KV_SECRET)"))
    kv_port: int = field(default=0, metadata=_help("KV port of a prefill worker (0: any free port)"))
    kv_lease: float = field(default=30.0, metadata=_help("seconds a prefill holds KV blocks for a decode worker"))
    cpus: str | None = field(default=None, metadata=_help("pin to these CPU cores, e.g. 0,1 or 2-3 (threads default "
                                                          "to their count)"))
    served_model_name: str | None = field(default=None, metadata=_help("model name clients use (default: --model)"))
    log_level: str = field(default="warning", metadata=_help("uvicorn log level"))

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 0 < self.port < 65536 or not 0 <= self.kv_port < 65536:
            raise ConfigError("ports must be in 1-65535 (kv_port 0 picks a free one)")
        if self.kv_lease <= 0:
            raise ConfigError(f"kv_lease must be > 0 seconds, got {self.kv_lease}")
        self.cpu_list()

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
