"""`disagg up`: a local cluster of one architecture on a fixed budget, as separate processes.

Units of the budget are CPU cores (or GPUs on CUDA). single uses one unit, single-all one worker
on every unit, replicated one worker per unit, disaggregated splits the units between prefill and
decode workers. Each worker is pinned to its units with its thread count to match. The launcher
waits for every /health, then starts the proxy, and stops everything on Ctrl-C or SIGTERM;
children also die with the launcher (PR_SET_PDEATHSIG), so none is orphaned.

Supervision: a worker (or the proxy) that exits, for instance because its engine died, is started
again on the same port after a back-off (1 s, doubling to 30 s while it keeps dying young); the
proxy's circuit breaker takes a worker back once its /health answers. The workers get an API key
of their own (generated, given to the proxy through its environment), so nothing but the proxy
can drive them; clients of the proxy need --api-key when one is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from disagg.cli_args import env_name
from disagg.engine.config import EngineConfig
from disagg.errors import ConfigError, DisaggError
from disagg.serve.options import UpOptions


class ClusterError(DisaggError):
    """A worker or the proxy failed to start or died."""


@dataclass(frozen=True)
class ProcSpec:
    name: str
    role: str  # both, prefill, decode or proxy
    argv: list[str]
    host: str
    port: int
    env: dict[str, str]
    units: str = ""  # e.g. "cpu 0,1" or "gpu 2"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _units(opts: UpOptions, engine: EngineConfig) -> tuple[str, list[int]]:
    """The kind of unit and the ones we may use."""
    if engine.device.startswith("cuda") or (engine.device == "auto" and _cuda_count() > 0):
        count = _cuda_count()
        kind = "gpu"
        units = list(range(count))
    else:
        kind = "cpu"
        units = sorted(os.sched_getaffinity(0))
    if opts.budget > len(units):
        raise ConfigError(f"a budget of {opts.budget} {kind} units is more than the {len(units)} available")
    return kind, units[: opts.budget]


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def plan(opts: UpOptions, engine: EngineConfig) -> tuple[list[ProcSpec], ProcSpec, str]:
    """Worker specs, the proxy spec, and a line saying how the budget is used."""
    kind, units = _units(opts, engine)
    if opts.arch == "single":
        groups = [("both", units[:1])]
    elif opts.arch == "single-all":
        groups = [("both", units)]
    elif opts.arch == "replicated":
        groups = [("both", [u]) for u in units]
    else:
        p, d = opts.split()
        groups = [("prefill", [u]) for u in units[:p]] + [("decode", [u]) for u in units[p : p + d]]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("DISAGG_") or k == "DISAGG_KV_SECRET"
                or k == "DISAGG_CACHE_DIR"}
    worker_key = secrets.token_urlsafe(24)  # keys travel in the environment, not argv (ps shows argv)
    for f in dataclasses.fields(EngineConfig):
        value = getattr(engine, f.name)
        if value is not None and f.name != "threads":
            base_env[env_name(f.name)] = str(value)
    workers = []
    for i, (role, group) in enumerate(groups):
        port = free_port(opts.host)
        env = base_env | {env_name("api_key"): worker_key}
        argv = [sys.executable, "-m", "disagg.cli", "serve", "--role", role, "--host", opts.host, "--port", str(port),
                "--stall-timeout", str(opts.stall_timeout),
                "--kv-host", opts.host, "--kv-lease", str(opts.kv_lease), "--kv-transport", opts.kv_transport,
                "--kv-codec", opts.kv_codec, "--kv-pool-memory", opts.kv_pool_memory,
                "--kv-pool-disk", opts.kv_pool_disk]
        for flag, value in (("--kv-bandwidth", opts.kv_bandwidth), ("--kv-latency", opts.kv_latency),
                            ("--kv-pool-dir", opts.pool_dir()), ("--kv-pool-redis", opts.kv_pool_redis)):
            if value:
                argv += [flag, value]
        if kind == "cpu":
            argv += ["--cpus", ",".join(map(str, group))]
            env[env_name("threads")] = str(engine.threads or len(group))
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, group))
        workers.append(ProcSpec(f"{role}-{i}", role, argv, opts.host, port, env, f"{kind} {','.join(map(str, group))}"))
    proxy_argv = [sys.executable, "-m", "disagg.cli", "proxy", "--host", opts.host, "--port", str(opts.port),
                  "--routing", opts.routing, "--local-prefill-threshold", str(opts.local_prefill_threshold),
                  "--prefill-queue-limit", str(opts.prefill_queue_limit), *opts.argv()]
    if opts.arch == "disaggregated":
        proxy_argv += ["--mode", "disaggregated"]
        for w in workers:
            proxy_argv += [f"--{w.role}", w.url]
        proxy_argv += ["--stream-first-token" if opts.stream_first_token else "--no-stream-first-token"]
        proxy_argv += ["--kv-push" if opts.kv_push else "--no-kv-push"]
    else:
        proxy_argv += ["--mode", "single" if len(workers) == 1 else "replicated"]
        for w in workers:
            proxy_argv += ["--worker", w.url]
    usage = ", ".join(f"{w.name} on {w.units}" for w in workers)
    proxy_env = base_env | {env_name("worker_api_key"): worker_key} | (
        {env_name("api_key"): opts.api_key} if opts.api_key else {})
    return workers, ProcSpec("proxy", "proxy", proxy_argv, opts.host, opts.port, proxy_env), usage


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Cluster:
    """Start with `start()` (or as a context manager), stop with `stop()`."""

    def __init__(self, opts: UpOptions, engine: EngineConfig) -> None:
        self.opts, self.engine = opts, engine
        self.workers, self.proxy_spec, self.usage = plan(opts, engine)
        self.log_dir = Path(opts.log_dir or tempfile.mkdtemp(prefix="disagg-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}  # name -> times started again
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.proxy_spec.url

    @property
    def worker_headers(self) -> dict[str, str]:
        """What a client that talks to the workers directly (a test, an operator) must send."""
        return {"Authorization": f"Bearer {self.workers[0].env[env_name('api_key')]}"}

    def worker_urls(self) -> dict[str, str]:
        return {w.name: w.url for w in self.workers}

    def _spawn(self, spec: ProcSpec) -> None:
        log = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - owned by the child for its life
        self.procs[spec.name] = subprocess.Popen(spec.argv, env=spec.env, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()

    def _wait_healthy(self, specs: list[ProcSpec], deadline: float) -> None:
        pending = {s.name: s.url + "/health" for s in specs}
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name, url in list(pending.items()):
                    if self.procs[name].poll() is not None:
                        raise ClusterError(f"{name} exited with status {self.procs[name].returncode}: "
                                           f"{self.log_tail(name)}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(url).status_code == 200:
                            del pending[name]
                if time.monotonic() > deadline:
                    raise ClusterError(f"{', '.join(pending)} not healthy after {self.opts.startup_timeout:.0f} s; "
                                       f"logs in {self.log_dir}")
                time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join((self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-lines:])
        return "(no log)"

    def start(self) -> Cluster:
        if self.procs:  # already started
            return self
        try:
            deadline = time.monotonic() + self.opts.startup_timeout
            for spec in self.workers:
                self._spawn(spec)
            self._wait_healthy(self.workers, deadline)
            self._spawn(self.proxy_spec)
            self._wait_healthy([self.proxy_spec], deadline)
        except BaseException:
            self.stop()
            raise
        if self.opts.restart:
            self._supervisor = threading.Thread(target=self._supervise, name="disagg-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _supervise(self) -> None:
        """Start again whatever exits, after a back-off that doubles while it keeps dying young."""
        specs = {s.name: s for s in (*self.workers, self.proxy_spec)}
        backoff = dict.fromkeys(specs, 1.0)
        due: dict[str, float] = {}
        started = dict.fromkeys(specs, time.monotonic())
        while not self._stopping.wait(0.2):
            for name in self.dead():
                if name not in due:
                    if time.monotonic() - started[name] > 60:
                        backoff[name] = 1.0  # it had been up a while: not a crash loop
                    due[name] = time.monotonic() + backoff[name]
                    print(f"disagg up: {name} exited with status {self.procs[name].returncode} "
                          f"({self.log_tail(name, 2)}); restarting in {backoff[name]:.0f} s", file=sys.stderr,
                          flush=True)
                elif time.monotonic() >= due[name]:
                    del due[name]
                    self._spawn(specs[name])
                    started[name] = time.monotonic()
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    backoff[name] = min(30.0, backoff[name] * 2)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def up(opts: UpOptions, engine: EngineConfig) -> int:
    """Run a cluster in the foreground until a signal or a death (the CLI's `disagg up`)."""
    cluster = Cluster(opts, engine)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"disagg up: starting {opts.arch} on a budget of {opts.budget} ({cluster.usage}); logs in "
          f"{cluster.log_dir}", flush=True)
    cluster.start()
    print(f"disagg up: ready at {cluster.url}/v1 (model {engine.model}); Ctrl-C stops it", flush=True)
    try:
        while not stopping:
            if not opts.restart and (dead := cluster.dead()):
                print(f"disagg up: {dead[0]} died: {cluster.log_tail(dead[0])}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        cluster.stop()
        print("disagg up: stopped", flush=True)
