"""Network emulation for KV transfers on one host: a token-bucket rate and a one-way delay.

`--kv-bandwidth 10gbit --kv-latency 20us` makes loopback behave like a 10 GbE link, so the
question "when does the transfer cancel the gain" can be asked on one machine. Results measured
through it are emulated, and every report that uses it says so.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

from disagg.errors import ConfigError

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "b/s": 8, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
CHUNK = 256 * 1024


def parse_rate(text: str) -> float:
    """'10gbit' -> 1e10 bits/s; '1.5GB/s' -> 1.2e10 bits/s."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z/]+)\s*", text)
    unit = m.group(2).lower().replace("bps", "bit") if m else ""
    if not m or unit not in _RATE_UNITS:
        raise ConfigError(f"cannot read {text!r} as a link rate; write e.g. 10gbit, 400gbit or 1.5GB/s")
    return float(m.group(1)) * _RATE_UNITS[unit]


def parse_duration(text: str) -> float:
    """'20us' -> 2e-05 seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", text)
    if not m or m.group(2) not in _TIME_UNITS:
        raise ConfigError(f"cannot read {text!r} as a duration; write e.g. 20us, 1ms or 0.5s")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


@dataclass(frozen=True)
class Link:
    bits_per_second: float | None = None  # None: as fast as the machine goes
    latency: float = 0.0  # one-way, seconds

    @classmethod
    def parse(cls, bandwidth: str | None, latency: str | None) -> Link:
        return cls(parse_rate(bandwidth) if bandwidth else None, parse_duration(latency) if latency else 0.0)

    @property
    def emulated(self) -> bool:
        return self.bits_per_second is not None or self.latency > 0

    def describe(self) -> str:
        if not self.emulated:
            return "loopback, not emulated"
        rate = f"{self.bits_per_second / 1e9:g} Gbit/s" if self.bits_per_second else "unlimited rate"
        return f"EMULATED {rate}, {self.latency * 1e6:g} us one-way"

    def pacer(self) -> Pacer:
        """A pacer for one transfer: its sends share one delay and one rate clock."""
        return Pacer(self)


class Pacer:
    """Sends one transfer's pieces at a link's pace: the first byte after the delay, then at the
    rate, counted from the transfer's start (so many small sends cost one delay, not one each)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.start: float | None = None
        self.sent = 0

    def send(self, sock: socket.socket, data: memoryview) -> None:
        if self.start is None:
            if self.link.latency:
                time.sleep(self.link.latency)
            self.start = time.perf_counter()
        rate = self.link.bits_per_second
        if rate is None:
            sock.sendall(data)
            self.sent += len(data)
            return
        for off in range(0, len(data), CHUNK):
            chunk = data[off : off + CHUNK]
            self.sent += len(chunk)
            # a chunk is released when its last bit would have crossed the link
            if (wait := self.start + self.sent * 8 / rate - time.perf_counter()) > 0:
                time.sleep(wait)
            sock.sendall(chunk)
