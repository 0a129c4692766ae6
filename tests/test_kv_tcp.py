"""The TCP KV port on its own: pull, release, authentication, and refusing bad input."""

from __future__ import annotations

import asyncio

import pytest
import torch
import xxhash

from disagg.kv import nixl
from disagg.kv.tcp import KVClient, KVPayload, KVServer, KVTransferError


def run(coro):
    return asyncio.run(coro)


async def _serve(secret=None, data=None):
    held = {"r1": KVPayload(data if data is not None else torch.randn(2, 2, 1, 3, 16, 4), 40)}
    released = []

    async def export(rid):
        if rid not in held:
            raise KeyError(f"no KV for {rid}")
        return held[rid]

    async def release(rid):
        released.append(rid)
        return held.pop(rid, None) is not None

    server = KVServer(export, release, secret=secret)
    port = await server.start("127.0.0.1", 0)
    return server, port, held, released


def test_pull_returns_the_exact_tensor_and_releases():
    async def main():
        data = torch.randn(2, 2, 1, 3, 16, 4).to(torch.bfloat16)
        server, port, held, released = await _serve(data=data)
        got = await KVClient(secret="").pull("127.0.0.1", port, "r1", expected_shape=(2, 2, 1, -1, 16, 4))
        await server.close()
        return data, got, held, released

    data, got, held, released = run(main())
    assert got.num_tokens == 40
    assert got.data.dtype == torch.bfloat16
    assert torch.equal(got.data, data)
    assert released == ["r1"]
    assert not held


def test_unknown_request_and_wrong_shape_are_errors():
    async def main():
        server, port, _, _ = await _serve()
        client = KVClient(secret="")
        with pytest.raises(KVTransferError, match="no KV"):
            await client.pull("127.0.0.1", port, "nope")
        with pytest.raises(KVTransferError, match="does not fit"):
            await client.pull("127.0.0.1", port, "r1", expected_shape=(2, 2, 1, -1, 32, 4))
        await server.close()

    run(main())


def test_secret_is_required_and_checked():
    async def main():
        server, port, _, _ = await _serve(secret="s3cret")
        with pytest.raises(KVTransferError, match="secret"):
            await KVClient(secret="").pull("127.0.0.1", port, "r1")
        with pytest.raises(KVTransferError):
            await KVClient(secret="wrong").pull("127.0.0.1", port, "r1")
        got = await KVClient(secret="s3cret").pull("127.0.0.1", port, "r1")
        await server.close()
        return got

    assert run(main()).num_tokens == 40


def test_binding_beyond_loopback_needs_a_secret():
    async def main():
        server = KVServer(None, None)
        with pytest.raises(KVTransferError, match="DISAGG_KV_SECRET"):
            await server.start("0.0.0.0", 0)

    run(main())


@pytest.mark.parametrize("in_arena", [False, True])
def test_shared_memory_pull_is_exact_and_leaves_no_file(in_arena):
    import os

    from disagg.kv.shm import SharedMemory

    async def main():
        data = torch.randn(2, 2, 2, 64, 16, 64)  # 2 MiB: more than one chunk
        arena = None
        if in_arena:  # the payload lives in shared memory already, as a shm prefill's KV cache does
            arena = SharedMemory(data.numel() * 4 + 4096)
            placed = arena.tensor()[4096:].view(torch.float32).view(data.shape)
            placed.copy_(data)
            data = placed
        server, port, _, _ = await _serve(data=data)
        server.arena = arena
        client = KVClient(secret="")
        got = await client.pull("127.0.0.1", port, "r1", via="shm", release=False)
        dest = [memoryview(bytearray(data.numel() * 4))]
        again = await client.pull("127.0.0.1", port, "r1", via="shm", into=lambda shape, dtype: dest)
        await server.close()
        return data.clone(), got, again, dest

    before = set(os.listdir("/dev/shm"))
    data, got, again, dest = run(main())
    assert torch.equal(got.data, data)
    assert again.data is None
    assert torch.equal(torch.frombuffer(dest[0], dtype=torch.float32).reshape(data.shape), data)
    assert set(os.listdir("/dev/shm")) == before


def test_shared_memory_is_refused_across_hosts():
    with pytest.raises(KVTransferError, match="one host"):
        KVClient(secret="").pull_blocking("10.0.0.1", 1, "r1", via="shm")


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_codecs_on_the_wire_shrink_the_bytes_and_decode_close(codec):
    sent = []

    async def main():
        data = torch.randn(2, 2, 1, 3, 16, 64, generator=torch.Generator().manual_seed(0))
        held = {"r1": KVPayload(data, 40)}

        async def export(rid):
            return held[rid]

        async def release(rid):
            return True

        server = KVServer(export, release, on_sent=sent.append)
        port = await server.start("127.0.0.1", 0)
        got = await KVClient(secret="").pull("127.0.0.1", port, "r1", codec=codec, release=False)
        plain = await KVClient(secret="").pull("127.0.0.1", port, "r1", release=False)
        await server.close()
        return data, got, plain

    data, got, plain = run(main())
    assert torch.equal(plain.data, data)
    assert got.data.shape == data.shape
    assert got.data.dtype == data.dtype
    limit = {"fp16": 0.55, "int8": 0.3, "int4": 0.2}[codec]  # of the fp32 bytes, scales included
    assert sent[0] <= limit * sent[1]
    rel = ((got.data - data).norm() / data.norm()).item()
    assert rel < {"fp16": 1e-3, "int8": 0.02, "int4": 0.2}[codec]


def test_an_unknown_codec_is_refused():
    async def main():
        server, port, _, _ = await _serve()
        with pytest.raises(KVTransferError, match="codec"):
            await KVClient(secret="").pull("127.0.0.1", port, "r1", codec="zip")
        await server.close()

    run(main())


def test_pulls_reuse_one_connection_and_survive_a_server_restart():
    async def main():
        data = torch.randn(2, 2, 1, 3, 16, 4)
        server, port, _, _ = await _serve(data=data)
        client = KVClient(secret="")
        await client.pull("127.0.0.1", port, "r1", release=False)
        (first,) = client._idle[("127.0.0.1", port)]
        got = await client.pull("127.0.0.1", port, "r1", release=False)
        (second,) = client._idle[("127.0.0.1", port)]
        await server.close()  # the kept connection is now dead
        server2 = KVServer(server._export, server._release)
        assert await server2.start("127.0.0.1", port) == port
        again = await client.pull("127.0.0.1", port, "r1")
        (third,) = client._idle[("127.0.0.1", port)]
        await server2.close()
        client.close()
        return first, second, third, got, again, data

    first, second, third, got, again, data = run(main())
    assert first is second, "the second pull opened a new connection"
    assert third is not first, "a dead connection was reused"
    assert torch.equal(got.data, data)
    assert torch.equal(again.data, data)


needs_nixl = pytest.mark.skipif(not nixl.available(), reason="NIXL is not installed (pip install --no-deps nixl-cu12)")


@needs_nixl
def test_nixl_reads_the_exact_bytes_into_registered_and_unregistered_memory():
    async def main():
        data = torch.randn(2, 2, 1, 3, 16, 4)
        server, port, _, _ = await _serve(data=data)
        plain = KVClient(secret="", nixl=nixl.NixlAgent())
        with pytest.raises(KVTransferError, match="does not serve NIXL"):
            await plain.pull("127.0.0.1", port, "r1", release=False, via="nixl")
        server.nixl = nixl.NixlAgent([data])
        cache = torch.zeros_like(data)  # registered up front, as a decode worker's KV cache is
        client = KVClient(secret="", nixl=nixl.NixlAgent([cache]))
        dest = [memoryview(cache.view(-1).view(torch.uint8).numpy())]
        into = await client.pull("127.0.0.1", port, "r1", release=False, via="nixl", into=lambda s, d: dest)
        fresh = await client.pull("127.0.0.1", port, "r1", via="nixl")  # a tensor registered for the one read
        await server.close()
        return data, cache, into, fresh

    data, cache, into, fresh = run(main())
    assert into.data is None
    assert torch.equal(cache, data)
    assert torch.equal(fresh.data, data)


@pytest.mark.parametrize("corrupt", [False, True])
def test_a_pushed_kv_lands_in_the_reserved_memory_and_a_bad_checksum_fails_the_wait(corrupt):
    from disagg.kv.framing import read_frame, send_frame
    from disagg.kv.push import PushSlots

    data = torch.randn(2, 2, 1, 3, 16, 4)
    raw = data.view(-1).view(torch.uint8).numpy().tobytes()

    async def main():
        server = KVServer(None, None, push_slots=PushSlots(wait=5), push_check=lambda expected, meta: None)
        port = await server.start("127.0.0.1", 0)
        cache = torch.zeros_like(data)
        waiting = asyncio.create_task(server.push_slots.expect(
            "p1", None, [memoryview(cache.view(-1).view(torch.uint8).numpy())]))

        def push(sock):
            head = {"push_id": "p1", "num_tokens": 40, "digest": "", "shape": list(data.shape),
                    "dtype": "float32", "nbytes": len(raw)}
            send_frame(sock, {"op": "push", "request_id": "p1", **head})
            assert read_frame(sock)["ok"]
            sock.sendall(raw)
            send_frame(sock, {"xxh3": xxhash.xxh3_64_intdigest(raw) ^ corrupt, "first_token_ids": [7]})
            return read_frame(sock)

        reply = await asyncio.to_thread(KVClient(secret="").session, "127.0.0.1", port, push)
        try:
            first = await waiting
        except KVTransferError as e:
            first = e
        await server.close()
        return reply, first, cache

    reply, first, cache = run(main())
    if corrupt:
        assert not reply["ok"]
        assert isinstance(first, KVTransferError)
        assert "checksum" in str(first)
    else:
        assert reply["ok"]
        assert first == [7]
        assert torch.equal(cache, data)
