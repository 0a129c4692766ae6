"""`disagg transfer-bench`: KV transfer speed per payload size, next to a plain-socket reference
measured in the same run.

A KV port serves the payloads; the client pulls the same payload `repeats` times per size into
preallocated memory, as a decode worker receives into its KV-cache blocks.
The reference sends the same bytes over a plain TCP socket (sendall / recv_into),
with the same threads. An emulated link applies to the KV transfer only and is labelled.
"""

from __future__ import annotations

import socket
import threading
import time

import torch

from disagg.bench.options import TransferBenchOptions
from disagg.kv.framing import KVTransferError
from disagg.kv.netem import Link
from disagg.kv.nixl import NixlAgent, NixlMover
from disagg.kv.nixl import available as nixl_available
from disagg.kv.shm import SharedMemory, ShmMover
from disagg.kv.tcp import Inline, Mover, Sessions, TcpPort, TcpTransport
from disagg.kv.transport import Exported, tensor_bytes
from disagg.metrics import percentile


def parse_size(text: str) -> int:
    from disagg.errors import ConfigError

    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in "KMG" else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 8M or 512M") from None


class _Payloads:
    """A KV port handler serving fixed payloads, held for ever (the benchmark pulls each many times)."""

    def __init__(self, payloads: dict[str, torch.Tensor]) -> None:
        self.payloads = payloads

    def export(self, rid: str, from_block: int) -> Exported:
        data = self.payloads[rid]
        return Exported(tuple(data.shape), data.dtype, 1, "", views=(tensor_bytes(data),))

    def export_done(self, rid: str, nbytes: int) -> None:
        pass

    def release(self, rid: str) -> bool:
        return True

    def renew(self, rid: str) -> float | None:
        return None

    def accept_push(self, header: object, abort: object) -> tuple[list[memoryview], int]:
        raise KVTransferError("the transfer benchmark takes no pushes")

    def push_done(self, push_id: str, first_token_ids: object, error: object = None) -> None:
        pass

    def cancel_push(self, push_id: str) -> None:
        pass


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
    payloads = {str(n): data[n] for n in sizes}  # fp16 "KV"
    # the decode side receives into KV-cache blocks: memory allocated (and touched) up front
    dests = {n: torch.ones(n // 2 * 2, dtype=torch.uint8) for n in sizes}
    movers: dict[str, tuple[Mover, Mover]] = {  # (the port's, the client's)
        "tcp": (Inline(), Inline()), "shm": (ShmMover(arena), ShmMover()),
        "nixl": (NixlMover(NixlAgent(list(payloads.values()))), NixlMover(NixlAgent(list(dests.values()))))
        if opts.transport == "nixl" else (Inline(), Inline())}
    served, pulling = movers[opts.transport]
    port = TcpPort(_Payloads(payloads), {served.name: served}, link=link).start("127.0.0.1", 0)
    client = TcpTransport(Sessions(timeout=3600), pulling)
    rows = []
    try:
        for n in sizes:
            ref = _plain_socket(n, opts.repeats)
            dest = [memoryview(dests[n].numpy())]
            times = []
            for _ in range(opts.repeats):
                t0 = time.perf_counter()
                client.pull(port.address, str(n), 0, lambda shape, dtype, dest=dest: dest, (n // 2,))
                times.append(time.perf_counter() - t0)
            n = n // 2 * 2
            rows.append({"bytes": n, "gbps": n / percentile(times, 50) / 1e9, "p50_ms": 1e3 * percentile(times, 50),
                         "p99_ms": 1e3 * percentile(times, 99), "ref_gbps": n / percentile(ref, 50) / 1e9,
                         "ref_p50_ms": 1e3 * percentile(ref, 50)})
    finally:
        port.close()
        client.close()
    return rows


def main(opts: TransferBenchOptions) -> int:
    from rich.console import Console
    from rich.table import Table

    from disagg.units import format_bytes

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
