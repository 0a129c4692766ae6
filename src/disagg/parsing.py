"""Values of list- and range-valued options (`--concurrency 1,2,4`, `--input-len 128:512`), read
the same way by `disagg bench`, `disagg plan` and `disagg calibrate`, with the same error message."""

from __future__ import annotations

from disagg.errors import ConfigError


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4): positive integers separated by commas; `what` names the flag."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{what} takes positive integers separated by commas, e.g. 1,2,4,8; got {text!r}")
    return values


def parse_len(text: str, what: str) -> tuple[int, int]:
    """'256' -> (256, 256), '128:512' -> (128, 512): a positive length or a range lo:hi."""
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1]:
        raise ConfigError(f"--{what} must be a positive length or a range lo:hi, got {text!r}")
    return parts[0], parts[1]
