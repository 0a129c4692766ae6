"""The package's layers point down: every import of `disagg.*` under src/disagg, read with `ast`
(top-level, inside functions, under `if TYPE_CHECKING:`), must be allowed by ALLOWED below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# A layer is a top-level package or module of disagg. Each may import itself and what its entry
# names: a layer ("kv": any module of it) or one module of a layer ("serve.launcher": that module
# only, for exceptions). "*": anything.
SHARED = ("errors", "paths", "cli_args", "metrics", "parsing", "units")
ALLOWED: dict[str, tuple[str, ...]] = {
    # shared modules, at the bottom: nothing of disagg but each other
    "errors": (),
    "paths": (),
    "units": (),
    "metrics": (),
    "parsing": ("errors",),
    "cli_args": ("errors",),
    # the layers
    "model": SHARED,
    "kv": SHARED,
    "engine": ("model", "kv", *SHARED),
    "serve": ("engine", "kv", "model", *SHARED),
    "sim": ("kv", "model", *SHARED),  # and no torch: tests/test_sim.py
    # bench measures servers over HTTP; calibrate also runs an engine in-process (engine, model) and the
    # transfer benchmark drives the KV transports (kv). Of serve it may start clusters through the
    # launcher (with its options) and name routing policies, never import the worker or proxy.
    "bench": ("sim", "kv", "engine", "model", "serve.launcher", "serve.options", "serve.routing", *SHARED),
    "cli": ("*",),
}

SRC = Path(__file__).resolve().parents[1] / "src" / "disagg"


def module_name(path: Path, root: Path = SRC) -> str:
    """src/disagg/kv/tcp.py -> 'disagg.kv.tcp'; a package's __init__.py -> the package."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """'disagg.kv.tcp' -> 'kv'; the root package 'disagg' itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str, str]]:
    """(line, the import statement, the disagg module it reaches) for each disagg import in `source`;
    `from disagg.pkg import sub` reaches disagg.pkg.sub when that is a module in `known`."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target == "disagg" or target.startswith("disagg."):
                found.append((node.lineno, ast.unparse(node), target))
    return found


def allowed(layer: str, target: str) -> bool:
    """May `layer` import the module `target`? (`from disagg import __version__` reaches the root package,
    which every layer may.)"""
    rules = ALLOWED[layer]
    target_layer = layer_of(target)
    if "*" in rules or target_layer in (None, layer) or target_layer in rules:
        return True
    rel = target.removeprefix("disagg.")
    return any("." in rule and (rel == rule or rel.startswith(rule + ".")) for rule in rules)


def violations(files: dict[Path, str], root: Path = SRC) -> list[str]:
    """One line per import the table does not allow, and per file of a layer the table lacks."""
    known = {module_name(p, root) for p in files}
    out = []
    for path, source in sorted(files.items()):
        where = path.relative_to(root.parents[1])  # src/disagg/...
        module = module_name(path, root)
        layer = layer_of(module)
        if layer is not None and layer not in ALLOWED:
            out.append(f"{where}: layer {layer!r} is missing from ALLOWED in tests/test_layers.py; add it with "
                       "the layers it may import")
            continue
        for line, statement, target in imports(source, module, path.name == "__init__.py", known):
            if layer is None:  # disagg/__init__.py stays light: `import disagg.x` runs it first
                out.append(f"{where}:{line}: `{statement}`: the root package must not import {target}")
            elif not allowed(layer, target):
                rules = ", ".join(ALLOWED[layer]) or "nothing of disagg"
                out.append(f"{where}:{line}: `{statement}`: {layer} must not import {target} "
                           f"({layer} may import: {rules})")
    return out


def test_every_disagg_import_points_down():
    files = {p: p.read_text() for p in SRC.rglob("*.py")}
    assert len(files) > 20, f"found only {len(files)} modules under {SRC}"
    if bad := violations(files):
        pytest.fail(f"{len(bad)} import(s) against the layering (the table: ALLOWED in tests/test_layers.py; "
                    "DESIGN.md, 'Layers'):\n  " + "\n  ".join(bad), pytrace=False)


def test_the_table_names_only_real_layers():
    layers = {layer_of(module_name(p)) for p in SRC.rglob("*.py")} - {None}
    assert set(ALLOWED) == layers, (f"in the table, not in src: {set(ALLOWED) - layers}; "
                                    f"in src, not in the table: {layers - set(ALLOWED)}")
    for layer, rules in ALLOWED.items():
        for rule in rules:
            if rule != "*":
                head = rule.split(".")[0]
                assert head in ALLOWED, f"{layer}: {rule!r} names no layer"
                if "." in rule:
                    assert (SRC / (rule.replace(".", "/") + ".py")).exists(), f"{layer}: {rule!r} names no module"


@pytest.mark.parametrize(("source", "expect"), [
    ("from disagg.bench.metrics import summarize\n", "sim must not import disagg.bench.metrics"),
    ("def f():\n    import disagg.serve.worker\n", "sim must not import disagg.serve.worker"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from disagg.engine import config\n",
     "sim must not import disagg.engine.config"),
    ("from ..serve import proxy\n", "sim must not import disagg.serve.proxy"),
])
def test_the_check_catches_upward_imports_wherever_they_hide(tmp_path, source, expect):
    root = tmp_path / "src" / "disagg"
    files = {root / "sim" / "x.py": source, root / "sim" / "__init__.py": "",
             root / "serve" / "proxy.py": "", root / "engine" / "config.py": ""}
    (bad,) = [v for v in violations(files, root) if "sim/x.py" in v]
    assert expect in bad
    assert bad.startswith("src/disagg/sim/x.py:")


def test_module_exceptions_allow_that_module_only(tmp_path):
    root = tmp_path / "src" / "disagg"
    files = {root / "bench" / "x.py": "from disagg.serve import launcher, worker\nfrom disagg.serve.options import A\n",
             root / "serve" / "launcher.py": "", root / "serve" / "worker.py": "", root / "serve" / "options.py": ""}
    bad = [v for v in violations(files, root) if "bench/x.py" in v]
    assert len(bad) == 1
    assert "must not import disagg.serve.worker" in bad[0]
