"""Link emulation and the transfer benchmark."""

from __future__ import annotations

import pytest

from disagg.bench.options import TransferBenchOptions
from disagg.bench.transfer import parse_size, run
from disagg.errors import ConfigError
from disagg.kv.netem import Link, parse_duration, parse_rate


def test_parsing():
    assert parse_rate("10gbit") == 10e9
    assert parse_rate("400Gbps") == 400e9
    assert parse_rate("1.5GB/s") == 12e9
    assert parse_duration("20us") == pytest.approx(20e-6)
    assert parse_duration("1ms") == pytest.approx(1e-3)
    assert parse_size("8M") == 8 * 2**20
    with pytest.raises(ConfigError, match="10gbit"):
        parse_rate("fast")
    with pytest.raises(ConfigError):
        parse_duration("20 parsecs")
    assert "EMULATED" in Link.parse("10gbit", "20us").describe()
    assert not Link.parse(None, None).emulated


def test_transfer_bench_reports_every_size_and_an_emulated_link_is_never_faster_than_its_rate():
    rows = run(TransferBenchOptions(sizes="256K,1M", repeats=2))
    assert [r["bytes"] for r in rows] == [256 * 1024, 2**20]
    assert all(r["gbps"] > 0 and r["ref_gbps"] > 0 for r in rows)
    slow = run(TransferBenchOptions(sizes="1M", repeats=2, kv_bandwidth="100mbit", kv_latency="5ms"))
    # 1 MiB at 100 Mbit/s takes at least 84 ms on the wire, plus the 5 ms delay
    assert slow[0]["p50_ms"] >= 84 + 5


def test_unknown_transports_are_a_clear_error():
    with pytest.raises(ConfigError, match="tcp, shm or nixl"):
        run(TransferBenchOptions(transport="carrier-pigeon"))


class _Clock:
    """Virtual time for the pacer: sleeping advances it, sends are free."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class _Sink:
    def __init__(self) -> None:
        self.sent = 0

    def sendall(self, data) -> None:
        self.sent += len(data)


def test_a_transfer_pays_the_delay_once_and_the_rate_over_all_its_pieces(monkeypatch):
    import disagg.kv.netem as netem

    clock = _Clock()
    monkeypatch.setattr(netem.time, "perf_counter", clock.perf_counter)
    monkeypatch.setattr(netem.time, "sleep", clock.sleep)
    pacer, sink = Link.parse("1gbit", "10ms").pacer(), _Sink()
    for _ in range(64):  # 64 pieces of 1 MiB, as the transports send them
        pacer.send(sink, memoryview(bytes(2**20)))
    assert sink.sent == 64 * 2**20
    assert clock.now == pytest.approx(0.010 + 64 * 2**20 * 8 / 1e9)
