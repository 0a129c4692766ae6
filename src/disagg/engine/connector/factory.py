"""A worker's KV connector, assembled from its configuration: the pool (if any), then pull, then
push, over the transports the configuration names, behind the worker's KV port.

The order matters: the pool loads first (it is nearest), and the pull connector registers a
finished prefill's held blocks before the push connector decides whether to announce its push.
A housekeeping thread ticks the connectors (leases, renewals, push deadlines).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from disagg.engine.connector.base import KVConnector, KVMetrics, NoMetrics
from disagg.engine.connector.composite import CompositeConnector
from disagg.engine.connector.held import HeldKV
from disagg.engine.connector.pool import PoolConnector
from disagg.engine.connector.pull import PullConnector
from disagg.engine.connector.push import PushConnector
from disagg.kv import nixl
from disagg.kv.netem import Link
from disagg.kv.pool import DiskTier, KVPool, MemoryTier, Tier, pool_key
from disagg.kv.redis_tier import RedisTier
from disagg.kv.shm import ShmMover
from disagg.kv.tcp import Inline, Mover, Sessions, TcpPort, TcpTransport
from disagg.kv.transport import KVPort, KVPortHandler, PushHeader, Transport

if TYPE_CHECKING:
    from disagg.engine.llm_engine import LLMEngine

TICK = 0.1  # seconds between housekeeping rounds

log = logging.getLogger("disagg.kv")


@dataclass(frozen=True)
class PoolConfig:
    memory: int = 0  # bytes of the memory tier (0: none)
    directory: str | None = None  # the disk tier's directory
    disk: int = 16 << 30
    redis: str | None = None  # the Redis tier's URL
    redis_budget: int = 4 << 30
    write: str = "through"  # or "back"

    def tiers(self, secret: str | None = None) -> list[Tier]:
        """The tiers; with the cluster's `secret`, the shared ones (disk, Redis) authenticate entries."""
        key = pool_key(secret)
        tiers: list[Tier] = []
        if self.memory > 0:
            tiers.append(MemoryTier(self.memory))
        if self.directory:
            tiers.append(DiskTier(Path(self.directory).expanduser(), self.disk, key))
        if self.redis:
            tiers.append(RedisTier(self.redis, self.redis_budget, key=key))
        return tiers


@dataclass(frozen=True)
class KVConnectorConfig:
    host: str = "127.0.0.1"  # the KV port's bind address (beyond loopback needs a secret)
    port: int = 0  # 0: any free port
    transport: str = "tcp"  # what this worker's prefill answers offer: tcp, shm or nixl
    codec: str = "none"  # what this worker asks of the ports it pulls from
    lease: float = 30.0  # how long held KV waits for a decode worker, and a decode worker for a push
    secret: str | None = None  # DISAGG_KV_SECRET
    link: Link = field(default_factory=Link)
    pool: PoolConfig = field(default_factory=PoolConfig)


class _Port:
    """What the KV port serves: held KV (pulls, releases, renewals) and pushes into this worker."""

    def __init__(self, held: HeldKV, push: PushConnector) -> None:
        self.held, self.push = held, push
        self.export, self.export_done, self.release, self.renew = held.export, held.export_done, held.release, \
            held.renew

    def accept_push(self, header: PushHeader, abort: Callable[[], None]) -> tuple[list[memoryview], int]:
        return self.push.accept_push(header, abort)

    def push_done(self, push_id: str, first_token_ids: list[int] | None, error: str | None = None) -> None:
        self.push.push_done(push_id, first_token_ids, error)

    def cancel_push(self, push_id: str) -> None:
        self.push.cancel_push(push_id)


class WorkerConnector(CompositeConnector):
    """The composite, with the KV port it serves and the thread that keeps it."""

    def __init__(self, children: list[KVConnector], port: KVPort, tiers: list[Tier],
                 on_close: Callable[[], None] = lambda: None) -> None:
        super().__init__(children)
        self.port, self.tiers, self._on_close = port, tiers, on_close
        self._stop = threading.Event()
        threading.Thread(target=self._keep, name="disagg-kv-keeper", daemon=True).start()

    def _keep(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick(time.monotonic())
            except Exception:  # one bad round must not end lease expiry and push deadlines for good
                log.exception("KV connector housekeeping failed; carrying on")

    def close(self) -> None:
        self._stop.set()
        self.port.close()
        super().close()
        self._on_close()


def transports(cfg: KVConnectorConfig, cache_layers: list, arena: object | None,
               sessions: Sessions) -> tuple[dict[str, Transport], dict[str, Mover]]:
    """(what this worker pulls with, by name; what its port serves, by name). A wire codec needs
    the bytes inline, so a worker that asks for one pulls over tcp only."""
    movers: dict[str, Mover] = {"tcp": Inline(), "shm": ShmMover(arena)}
    if cfg.transport == "nixl":
        movers["nixl"] = nixl.NixlMover(nixl.NixlAgent(cache_layers))
    pulling = movers if cfg.codec == "none" else {"tcp": movers["tcp"]}
    return ({name: TcpTransport(sessions, mover, cfg.codec if name == "tcp" else "none", cfg.link)
             for name, mover in pulling.items()}, movers)


def make_connector(engine: LLMEngine, cfg: KVConnectorConfig, metrics: KVMetrics | None = None) -> WorkerConnector:
    """The connector over TCP (and shm, nixl), behind a TCP KV port."""
    cache = engine.kv_cache
    sessions = Sessions(cfg.secret)
    pulling, movers = transports(cfg, cache.layers, cache.arena, sessions)
    return assemble(engine, cfg, pulling, TcpTransport(sessions, link=cfg.link),
                    lambda handler: TcpPort(handler, movers, cfg.secret, cfg.link).start(cfg.host, cfg.port),
                    metrics, on_close=sessions.close)


def assemble(engine: LLMEngine, cfg: KVConnectorConfig, pulling: dict[str, Transport], pushing: Transport,
             open_port: Callable[[KVPortHandler], KVPort], metrics: KVMetrics | None = None,
             on_close: Callable[[], None] = lambda: None) -> WorkerConnector:
    """The connector over the given transports ("tcp" among `pulling`: the fallback), behind the port
    `open_port` opens (tests pass kv/fake.py's)."""
    metrics = metrics or NoMetrics()
    cache = engine.kv_cache
    held = HeldKV(cache, cfg.lease, metrics)
    push = PushConnector(cache, held, pushing, cfg.lease, bool(cfg.secret), metrics)
    port = open_port(_Port(held, push))
    pull = PullConnector(cache, held, pulling, port.address, cfg.transport, engine.engine_id, bool(cfg.secret),
                         metrics)
    tiers = cfg.pool.tiers(cfg.secret)
    children: list[KVConnector] = [pull, push]
    if tiers:
        children.insert(0, PoolConnector(KVPool(tiers, policy=cfg.pool.write), cache, metrics))
    connector = WorkerConnector(children, port, tiers, on_close)
    held.notify = lambda: connector.notify()
    return connector
