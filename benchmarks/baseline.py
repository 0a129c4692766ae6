"""Measure another checkout in the same run: the workers and proxy a benchmark starts import the
`src/` directory named here (e.g. of `git worktree add /tmp/base <commit>`), so a change is
compared with its reference on the same machine, at the same moment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def use_src(src: str | None) -> Iterator[None]:
    """Processes started inside import disagg from `src` (None: this checkout)."""
    saved = os.environ.get("PYTHONPATH")
    if src:
        os.environ["PYTHONPATH"] = src
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
