"""`disagg transfer-bench`: KV transfer speed per payload size, next to a plain-socket reference
measured in the same run.

A KV server runs on its own thread and event loop; the client pulls the same payload `repeats`
times per size into preallocated memory, as a decode worker receives into its KV-cache blocks.
The reference sends the same bytes over a plain TCP socket (sendall / recv_into),
with the same threads. An emulated link applies to the KV transfer only and is labelled.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import torch

from disagg.bench.metrics import percentile
from disagg.kv.netem import Link
from disagg.kv.nixl import NixlAgent
from disagg.kv.nixl import available as nixl_available
from disagg.kv.options import TransferBenchOptions
from disagg.kv.shm import SharedMemory
from disagg.kv.tcp import KVClient, KVPayload, KVServer


def parse_size(text: str) -> int:
    from disagg.errors import ConfigError

    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 8M or 512M") from None


class _ServerThread:
    def __init__(self, payloads: dict[str, KVPayload], link: Link, nixl: NixlAgent | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.payloads = payloads

        async def export(rid: str) -> KVPayload:
            return self.payloads[rid]

        async def release(rid: str) -> bool:
            return True

        self.server = KVServer(export, release, link=link, nixl=nixl)
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.port = self.loop.run_until_complete(self.server.start("127.0.0.1", 0))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait()

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _plain_socket(nbytes: int, repeats: int) -> list[float]:
    """Seconds per transfer of `nbytes` over a plain loopback TCP socket."""
    payload = bytes(nbytes)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def sender() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(repeats):
                conn.recv(1)
                conn.sendall(payload)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    times = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.sendall(b"g")
            got = 0
            while got < nbytes:
                got += s.recv_into(view[got:], nbytes - got)
            times.append(time.perf_counter() - t0)
    t.join()
    listener.close()
    return times


def run(opts: TransferBenchOptions) -> list[dict[str, float]]:
    from disagg.errors import ConfigError

    if opts.transport not in ("tcp", "shm", "nixl"):
        raise ConfigError(f"unknown transport {opts.transport!r}; use tcp, shm or nixl")
    if opts.transport == "nixl" and not nixl_available():
        raise ConfigError("transport nixl needs NIXL: pip install --no-deps nixl-cu12 (UCX_TLS=tcp without RDMA)")
    if opts.repeats < 1:
        raise ConfigError("repeats must be >= 1")
    link = Link.parse(opts.kv_bandwidth, opts.kv_latency)
    sizes = [parse_size(s) for s in opts.sizes.split(",")]
    arena = None
    if opts.transport == "shm":  # as a shm prefill worker's KV cache, the payloads live in shared memory
        arena = SharedMemory(sum(n // 2 * 2 for n in sizes))
        flat, off, data = arena.tensor().view(torch.float16), 0, {}
        for n in sizes:
            data[n] = flat[off : off + n // 2]
            data[n].zero_()
            off += n // 2
    else:
        data = {n: torch.zeros(n // 2, dtype=torch.float16) for n in sizes}
    payloads = {str(n): KVPayload(data[n], 1) for n in sizes}  # fp16 "KV"
    # the decode side receives into KV-cache blocks: memory allocated (and touched) up front
    dests = {n: torch.ones(n // 2 * 2, dtype=torch.uint8) for n in sizes}
    nixl = opts.transport == "nixl"
    server = _ServerThread(payloads, link, NixlAgent([p.data for p in payloads.values()]) if nixl else None)
    server.server.arena = arena
    client = KVClient(secret="", timeout=3600, nixl=NixlAgent(list(dests.values())) if nixl else None)
    rows = []
    try:
        for n in sizes:
            ref = _plain_socket(n, opts.repeats)
            dest = [memoryview(dests[n].numpy())]
            times = []
            for _ in range(opts.repeats):
                t0 = time.perf_counter()
                client.pull_blocking("127.0.0.1", server.port, str(n), release=False,
                                     into=lambda shape, dtype, dest=dest: dest, via=opts.transport)
                times.append(time.perf_counter() - t0)
            n = n // 2 * 2
            rows.append({"bytes": n, "gbps": n / percentile(times, 50) / 1e9, "p50_ms": 1e3 * percentile(times, 50),
                         "p99_ms": 1e3 * percentile(times, 99), "ref_gbps": n / percentile(ref, 50) / 1e9,
                         "ref_p50_ms": 1e3 * percentile(ref, 50)})
    finally:
        server.stop()
    return rows


def main(opts: TransferBenchOptions) -> int:
    from rich.console import Console
    from rich.table import Table

    from disagg.kv.layout import format_bytes

    link = Link.parse(opts.kv_bandwidth, opts.kv_latency)
    rows = run(opts)
    table = Table(title=f"KV transfer, {opts.transport} ({link.describe()}), {opts.repeats} pulls per size; "
                        "reference: plain socket, not emulated")
    for col in ("size", "GB/s", "p50 ms", "p99 ms", "plain socket GB/s", "vs plain socket"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(format_bytes(r["bytes"]), f"{r['gbps']:.2f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['ref_gbps']:.2f}", f"{100 * r['gbps'] / r['ref_gbps']:.0f}%")
    Console(width=120).print(table)
    return 0
