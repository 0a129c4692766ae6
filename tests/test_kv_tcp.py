"""The TCP KV port and transports on their own (tcp, shm, nixl movers): pulls from a given block,
release, authentication, connection reuse, codecs, pushes, and refusing bad input."""

from __future__ import annotations

import threading

import pytest
import torch
import xxhash

from disagg.kv import nixl
from disagg.kv.address import Address
from disagg.kv.framing import KVTransferError, read_frame, send_frame
from disagg.kv.shm import ShmMover
from disagg.kv.tcp import Inline, Sessions, TcpPort, TcpTransport
from disagg.kv.transport import Exported, tensor_bytes

SHAPE = (2, 2, 1, 3, 16, 4)  # layers, K/V, heads, blocks, block size, head dim


class Held:
    """A KV port handler serving fixed tensors, recording what it is asked."""

    def __init__(self, data: torch.Tensor | None = None, views: bool = False) -> None:
        self.data = data if data is not None else torch.randn(SHAPE)
        self.views = views
        self.held = {"r1"}
        self.released: list[str] = []
        self.sent: list[int] = []
        self.pushed: dict[str, object] = {}
        self.push_into: list[memoryview] = []

    def export(self, rid, from_block):
        if rid not in self.held:
            raise KVTransferError(f"no KV held for {rid}")
        part = self.data[:, :, :, from_block:]
        if self.views:  # straight from memory, as a CPU cache sends
            return Exported(tuple(part.shape), part.dtype, 40, "d", views=(tensor_bytes(part),))
        return Exported(tuple(part.shape), part.dtype, 40, "d", tensor=part)

    def export_done(self, rid, nbytes):
        self.sent.append(nbytes)

    def release(self, rid):
        self.released.append(rid)
        return self.held.discard(rid) is None and rid not in self.held

    def renew(self, rid):
        return 30.0 if rid in self.held else None

    def accept_push(self, header, abort):
        return self.push_into, 0

    def push_done(self, push_id, first, error=None):
        self.pushed[push_id] = error or first

    def cancel_push(self, push_id):
        self.pushed[push_id] = "cancelled"


def serve(handler, secret=None, movers=None):
    port = TcpPort(handler, movers or {"tcp": Inline(), "shm": ShmMover()}, secret).start("127.0.0.1", 0)
    return port, port.address


def pull(transport, address, rid="r1", from_block=0, into=None, expected=(2, 2, 1, -1, 16, 4)):
    got = {}

    def dest(shape, dtype):
        got["t"] = torch.empty(shape, dtype=dtype)
        return into if into is not None else [memoryview(got["t"].view(-1).view(torch.uint8).numpy())]

    pulled = transport.pull(address, rid, from_block, dest, expected)
    return pulled, got.get("t")


def test_pull_returns_the_exact_bytes_and_releases():
    data = torch.randn(SHAPE).to(torch.bfloat16)
    handler = Held(data)
    port, address = serve(handler)
    pulled, got = pull(TcpTransport(), address)
    port.close()
    assert pulled.num_tokens == 40
    assert pulled.digest == "d"
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, data)
    assert handler.released == ["r1"]
    assert handler.sent == [pulled.wire_bytes] == [data.numel() * 2]


def test_a_pull_from_a_block_on_moves_only_those_blocks():
    handler = Held(views=True)
    port, address = serve(handler)
    pulled, got = pull(TcpTransport(), address, from_block=2)
    port.close()
    assert torch.equal(got, handler.data[:, :, :, 2:])
    assert pulled.wire_bytes == handler.data.numel() * 4 // 3


def test_unknown_request_and_wrong_shape_are_errors():
    port, address = serve(Held())
    transport = TcpTransport()
    with pytest.raises(KVTransferError, match="no KV"):
        pull(transport, address, rid="nope")
    with pytest.raises(KVTransferError, match="does not fit"):
        pull(transport, address, expected=(2, 2, 1, -1, 32, 4))
    port.close()


def test_secret_is_required_and_checked():
    port, address = serve(Held(), secret="s3cret")
    with pytest.raises(KVTransferError, match="secret"):
        pull(TcpTransport(Sessions(None)), address)
    with pytest.raises(KVTransferError):
        pull(TcpTransport(Sessions("wrong")), address)
    pulled, _ = pull(TcpTransport(Sessions("s3cret")), address)
    port.close()
    assert pulled.num_tokens == 40


def test_binding_beyond_loopback_needs_a_secret():
    with pytest.raises(KVTransferError, match="DISAGG_KV_SECRET"):
        TcpPort(Held(), {"tcp": Inline()}).start("0.0.0.0", 0)


@pytest.mark.parametrize("in_arena", [False, True])
def test_shared_memory_pull_is_exact_and_leaves_no_file(in_arena):
    import os

    from disagg.kv.shm import SharedMemory

    before = set(os.listdir("/dev/shm"))
    data = torch.randn(2, 2, 2, 64, 16, 64)  # 2 MiB: more than one chunk
    arena = None
    if in_arena:  # the payload lives in shared memory already, as a shm prefill's KV cache does
        arena = SharedMemory(data.numel() * 4 + 4096)
        placed = arena.tensor()[4096:].view(torch.float32).view(data.shape)
        placed.copy_(data)
        data = placed
    handler = Held(data, views=True)
    port, address = serve(handler, movers={"tcp": Inline(), "shm": ShmMover(arena)})
    shm = TcpTransport(mover=ShmMover())
    _, got = pull(shm, address, expected=tuple(data.shape))
    port.close()
    shm.close()
    assert torch.equal(got, data)
    assert set(os.listdir("/dev/shm")) == before


def test_shared_memory_is_refused_across_hosts():
    with pytest.raises(KVTransferError, match="does not reach"):
        pull(TcpTransport(mover=ShmMover()), Address("10.0.0.1", 1))


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_codecs_on_the_wire_shrink_the_bytes_and_decode_close(codec):
    data = torch.randn(2, 2, 1, 3, 16, 64, generator=torch.Generator().manual_seed(0))
    handler = Held(data)
    port, address = serve(handler)
    expected = tuple(data.shape)
    coded, got = pull(TcpTransport(codec=codec), address, expected=expected)
    handler.held.add("r1")
    plain, exact = pull(TcpTransport(), address, expected=expected)
    port.close()
    assert torch.equal(exact, data)
    assert got.shape == data.shape
    assert got.dtype == data.dtype
    limit = {"fp16": 0.55, "int8": 0.3, "int4": 0.2}[codec]  # of the fp32 bytes, scales included
    assert coded.wire_bytes <= limit * plain.wire_bytes
    assert handler.sent == [coded.wire_bytes, plain.wire_bytes]
    rel = ((got - data).norm() / data.norm()).item()
    assert rel < {"fp16": 1e-3, "int8": 0.02, "int4": 0.2}[codec]


def test_an_unknown_codec_or_mover_is_refused():
    with pytest.raises(KVTransferError, match="codec"):
        TcpTransport(codec="zip")
    port, address = serve(Held())

    def ask(msg):
        return Sessions().run(address, lambda sock: (send_frame(sock, msg), read_frame(sock))[1])

    assert "codec" in ask({"op": "pull", "request_id": "r1", "via": "tcp", "codec": "zip"})["error"]
    assert "does not serve" in ask({"op": "pull", "request_id": "r1", "via": "carrier-pigeon"})["error"]
    assert "from_block" in ask({"op": "pull", "request_id": "r1", "via": "tcp", "from_block": -1})["error"]
    port.close()


def test_pulls_reuse_one_connection_and_survive_a_port_restart():
    handler = Held()
    port, address = serve(handler)
    sessions = Sessions()
    transport = TcpTransport(sessions)
    handler.release = lambda rid: True  # keep serving r1
    pull(transport, address)
    (first,) = sessions._idle[address]
    _, got = pull(transport, address)
    (second,) = sessions._idle[address]
    port.close()  # the kept connection is now dead
    port2 = TcpPort(handler, {"tcp": Inline()}).start("127.0.0.1", address.port)
    _, again = pull(transport, address)
    (third,) = sessions._idle[address]
    port2.close()
    sessions.close()
    assert first is second, "the second pull opened a new connection"
    assert third is not first, "a dead connection was reused"
    assert torch.equal(got, handler.data)
    assert torch.equal(again, handler.data)


def test_release_renew_and_cancel_reach_the_handler():
    handler = Held()
    port, address = serve(handler)
    transport = TcpTransport()
    assert transport.renew(address, "r1") == 30.0
    assert transport.release(address, "r1")
    assert transport.renew(address, "r1") is None
    transport.cancel_push(address, "p9")
    port.close()
    assert handler.pushed == {"p9": "cancelled"}


needs_nixl = pytest.mark.skipif(not nixl.available(), reason="NIXL is not installed (pip install --no-deps nixl-cu12)")


@needs_nixl
def test_nixl_reads_the_exact_bytes_into_registered_and_unregistered_memory():
    data = torch.randn(SHAPE)
    handler = Held(data, views=True)
    port, address = serve(handler)
    handler.release = lambda rid: True
    with pytest.raises(KVTransferError, match="does not serve"):  # this port has no NIXL agent
        pull(TcpTransport(mover=nixl.NixlMover(nixl.NixlAgent())), address)
    port.close()
    port, address = serve(handler, movers={"nixl": nixl.NixlMover(nixl.NixlAgent([data]))})
    cache = torch.zeros_like(data)  # registered up front, as a decode worker's KV cache is
    transport = TcpTransport(mover=nixl.NixlMover(nixl.NixlAgent([cache])))
    pull(transport, address, into=[memoryview(cache.view(-1).view(torch.uint8).numpy())])
    _, fresh = pull(transport, address)  # memory registered for the one read
    port.close()
    assert torch.equal(cache, data)
    assert torch.equal(fresh, data)


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_pushed_kv_lands_in_the_given_memory_and_a_bad_checksum_fails_the_push(corrupt):
    data = torch.randn(SHAPE)
    raw = data.view(-1).view(torch.uint8).numpy().tobytes()
    handler = Held()
    cache = torch.zeros_like(data)
    handler.push_into = [memoryview(cache.view(-1).view(torch.uint8).numpy())]
    port, address = serve(handler)

    def push(sock):
        head = {"push_id": "p1", "num_tokens": 40, "digest": "", "shape": list(data.shape), "dtype": "float32"}
        send_frame(sock, {"op": "push", "request_id": "p1", **head})
        assert read_frame(sock) == {"ok": True, "from_block": 0}
        sock.sendall(raw)
        send_frame(sock, {"xxh3": xxhash.xxh3_64_intdigest(raw) ^ corrupt, "first_token_ids": [7]})
        return read_frame(sock)

    reply = Sessions().run(address, push)
    port.close()
    if corrupt:
        assert not reply["ok"]
        assert "checksum" in handler.pushed["p1"]
    else:
        assert reply["ok"]
        assert handler.pushed["p1"] == [7]
        assert torch.equal(cache, data)


def test_a_malformed_push_header_is_refused_before_any_byte():
    handler = Held()
    port, address = serve(handler)
    reply = Sessions().run(address, lambda sock: (send_frame(sock, {
        "op": "push", "request_id": "p1", "push_id": "p1", "num_tokens": -1, "digest": "", "shape": [1, 2],
        "dtype": "float64"}), read_frame(sock))[1])
    port.close()
    assert not reply["ok"]
    assert "malformed" in reply["error"]
    assert not handler.pushed


def test_the_port_serves_connections_side_by_side():
    handler = Held(torch.randn(2, 2, 1, 64, 16, 64))
    handler.release = lambda rid: True
    port, address = serve(handler)
    results = []

    def one():
        results.append(pull(TcpTransport(), address, expected=(2, 2, 1, -1, 16, 64))[1])

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    port.close()
    assert len(results) == 4
    assert all(torch.equal(r, handler.data) for r in results)


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_a_silent_connection_is_closed_after_its_timeout(secret):
    """Before the handshake completes (with a secret) or between requests (without): a peer that
    says nothing is let go, not served by a thread for ever."""
    import socket
    import time

    port = TcpPort(Held(), {"tcp": Inline()}, secret, handshake_timeout=0.3, idle_timeout=0.3).start("127.0.0.1", 0)
    try:
        with socket.create_connection((port.address.host, port.address.port), timeout=10) as sock:
            assert "challenge" in read_frame(sock)
            t0 = time.monotonic()
            assert sock.recv(1) == b""  # the port closed it
            assert time.monotonic() - t0 < 5
    finally:
        port.close()


def test_a_flood_of_connections_is_capped():
    """Idle connections beyond the cap are closed on arrival: a KV port never serves more than
    max_connections threads, however many a peer opens; those it serves still work."""
    import socket

    before = threading.active_count()
    port = TcpPort(Held(), {"tcp": Inline()}, max_connections=8).start("127.0.0.1", 0)
    socks = []
    try:
        for _ in range(100):
            socks.append(socket.create_connection((port.address.host, port.address.port), timeout=10))
        for sock in socks[:8]:
            assert "challenge" in read_frame(sock)  # served
        for sock in socks[8:]:
            assert sock.recv(1) == b""  # closed at once
        assert threading.active_count() <= before + 8 + 1  # the connections' threads and the accept loop
        assert port.refused == 92
        for sock in socks[:8]:
            sock.close()
        import time

        deadline = time.monotonic() + 10  # their threads see the end of the stream and leave
        while len(port._conns) >= 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        t = TcpTransport(Sessions())
        assert t.renew(port.address, "r1") == 30.0  # a slot is free again once they have gone
        t.close()
    finally:
        for sock in socks:
            sock.close()
        port.close()
