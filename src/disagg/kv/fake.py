"""An in-process KV transport, for tests: KV ports are handlers in a dict, and pulls and pushes
copy bytes between them with no socket, through the same `KVPortHandler` calls as tcp.

A port can be made silent (calls to it hang until the transport's timeout, then fail: KV that
never arrives) or be closed (calls fail at once, like a refused connection).
"""

from __future__ import annotations

import threading

from disagg.kv.address import Address
from disagg.kv.framing import KVTransferError
from disagg.kv.transport import Destination, KVPortHandler, Pulled, PushSource, check_shape, copy_views


class FakeNetwork:
    def __init__(self) -> None:
        self.ports: dict[Address, KVPortHandler] = {}
        self.silent: set[Address] = set()
        self._next = 1
        self._lock = threading.Lock()

    def open_port(self, handler: KVPortHandler) -> FakePort:
        with self._lock:
            address = Address("127.0.0.1", self._next)
            self._next += 1
            self.ports[address] = handler
        return FakePort(self, address)

    def transport(self, timeout: float = 5.0) -> FakeTransport:
        return FakeTransport(self, timeout)


class FakePort:
    def __init__(self, network: FakeNetwork, address: Address) -> None:
        self.network, self.address = network, address

    def close(self) -> None:
        self.network.ports.pop(self.address, None)


class FakeTransport:
    name = "fake"

    def __init__(self, network: FakeNetwork, timeout: float) -> None:
        self.network, self.timeout = network, timeout
        self._never = threading.Event()  # what a silent port's callers wait on, until their timeout

    def reaches(self, host: str) -> bool:
        return True

    def _port(self, address: Address) -> KVPortHandler:
        if address in self.network.silent:
            self._never.wait(self.timeout)
            raise KVTransferError(f"KV transfer with {address} timed out after {self.timeout:g} s")
        handler = self.network.ports.get(address)
        if handler is None:
            raise KVTransferError(f"KV transfer with {address} failed: connection refused")
        return handler

    def pull(self, address: Address, request_id: str, from_block: int, into: Destination,
             expected_shape: tuple[int, ...]) -> Pulled:
        port = self._port(address)
        kv = port.export(request_id, from_block)
        sent = 0
        try:
            check_shape(kv.shape, expected_shape)
            sent = copy_views(kv.wire(), into(kv.shape, kv.dtype))
        finally:
            port.export_done(request_id, sent)
        port.release(request_id)
        return Pulled(kv.num_tokens, kv.digest, sent)

    def release(self, address: Address, request_id: str) -> bool:
        return self._port(address).release(request_id)

    def renew(self, address: Address, request_id: str) -> float | None:
        return self._port(address).renew(request_id)

    def push(self, address: Address, source: PushSource) -> int:
        port = self._port(address)
        header = source.header
        views, from_block = port.accept_push(header, abort=lambda: None)
        try:
            layers = [v for layer in range(header.shape[0]) for v in source.layer(layer, from_block)]
            sent = copy_views(layers, views)
            first = source.first_token_ids()
        except Exception as e:
            port.push_done(header.push_id, None, str(e))
            raise KVTransferError(f"push failed: {e}") from e
        port.push_done(header.push_id, first)
        return sent

    def cancel_push(self, address: Address, push_id: str) -> None:
        self._port(address).cancel_push(push_id)

    def close(self) -> None:
        pass
