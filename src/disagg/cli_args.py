"""Typed config dataclass -> argparse flags, each with a DISAGG_* environment twin.

A field `max_num_seqs` becomes `--max-num-seqs` and `DISAGG_MAX_NUM_SEQS`; the environment sets
the default and the command line wins. Help text comes from the field's `help` metadata, so the
config class stays the one place that documents a setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

from disagg.errors import ConfigError

C = TypeVar("C")
ENV_PREFIX = "DISAGG_"


def described(text: str) -> dict[str, str]:
    """Field metadata carrying a setting's help text: `field(default=..., metadata=described("..."))`."""
    return {"help": text}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _base_type(tp: Any) -> type:
    """`int | None` -> int; plain types unchanged."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _default(f: dataclasses.Field, tp: Any) -> Any:
    """The field's default, overridden by its DISAGG_* environment variable when set."""
    env = env_name(f.name)
    if env not in os.environ:
        return f.default
    text = os.environ[env]
    try:
        if typing.get_origin(tp) is tuple:
            return tuple(x for x in text.split(",") if x)
        return _parse_bool(text) if tp is bool else tp(text)
    except ValueError as e:
        raise ConfigError(f"environment variable {env}={text!r} is not a valid {tp.__name__}: {e}") from None


def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).splitlines()[0])
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        default = _default(f, tp)
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} (default: {default}; env {env_name(f.name)})"
        if typing.get_origin(tp) is tuple:
            # argparse appends to a list default in place, so the default is filled in afterwards
            group.add_argument(flag, dest=f.name, default=None, action="append", metavar="STR",
                               help=text.replace("(default", "(repeatable; default"))
        elif tp is bool:
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag, dest=f.name, default=default, type=tp, help=text, metavar=tp.__name__.upper())


def config_from_args(cls: type[C], ns: argparse.Namespace, **overrides: Any) -> C:
    """Build `cls` from parsed flags (which already carry environment defaults)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        tp = _base_type(hints[f.name])
        if typing.get_origin(tp) is tuple:
            value = tuple(value) if value is not None else _default(f, tp)
        values[f.name] = value
    return cls(**(values | overrides))
