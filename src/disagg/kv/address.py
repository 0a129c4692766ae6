"""Where a KV port is, and whether an address is this host's loopback (what may be reached, or
bound, without a shared secret). No torch: options and proxies import it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """`host` is a loopback address (or `localhost`); a name that merely starts like one is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
