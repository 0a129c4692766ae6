"""Where disagg keeps files between runs: converted models and the KV pool's disk tier."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$DISAGG_CACHE_DIR, else $XDG_CACHE_HOME/disagg, else ~/.cache/disagg."""
    if d := os.environ.get("DISAGG_CACHE_DIR"):
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disagg"


def default_kv_pool_dir() -> Path:
    return cache_root() / "kv-pool"
