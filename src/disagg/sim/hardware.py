"""The hardware catalog: devices (peak dense FLOP/s per dtype, memory bandwidth and size) and links
(bandwidth, latency), each with where its numbers come from. Users add or override entries with
a TOML file (`--catalog FILE`):

    [device.my-gpu]
    kind = "gpu"
    flops = { bf16 = 400e12, fp8 = 800e12 }
    mem_bw = 2.0e12
    mem_bytes = 96e9
    source = "vendor datasheet"

    [link.my-fabric]
    bandwidth = 25e9      # bytes/s, one direction
    latency = 3e-6        # seconds, one way
    source = "measured with ib_write_bw"

"this-machine" comes from `disagg calibrate` (a profile file), not from the catalog.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagg.errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    kind: str  # gpu or cpu
    flops: dict[str, float]  # peak dense FLOP/s by dtype
    mem_bw: float  # bytes/s
    mem_bytes: float
    source: str
    mfu: float = 0.5  # achieved share of peak FLOP/s in prefill (typical published values)
    bw_util: float = 0.7  # achieved share of memory bandwidth in decode
    step_overhead: float = 0.0  # seconds per engine step (launches, scheduling, sampling)
    decode_mfu: float | None = None  # share of peak in decode's skinny matmuls (default: mfu)
    attn_mfu: float | None = None  # share of peak in prefill attention (default: mfu)
    overlap: bool = True  # compute and memory traffic overlap (GPUs); CPUs measured here add them

    def peak(self, dtype: str) -> float:
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype in ("fp32", "float32") and "fp32" not in self.flops and "bf16" in self.flops:
            return self.flops["bf16"] / 2
        raise ConfigError(f"{self.name} has no FLOP/s for {dtype}; known: {', '.join(self.flops)}")


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds, one way
    source: str
    efficiency: float = 1.0  # share of the bandwidth a KV transfer achieves

    def transfer_time(self, nbytes: float) -> float:
        return self.latency + nbytes / (self.bandwidth * self.efficiency)


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100-sxm", "gpu", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, 3.35e12, 80e9,
           "NVIDIA H100 SXM datasheet (dense, no sparsity)", step_overhead=4e-3),
    Device("h200", "gpu", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}, 4.8e12, 141e9,
           "NVIDIA H200 SXM datasheet (dense)", step_overhead=4e-3),
    Device("a100-80g", "gpu", {"bf16": 312e12, "fp16": 312e12}, 2.039e12, 80e9,
           "NVIDIA A100 80GB SXM datasheet (dense)", step_overhead=4e-3),
    Device("l40s", "gpu", {"bf16": 362e12, "fp16": 362e12, "fp8": 733e12}, 864e9, 48e9,
           "NVIDIA L40S datasheet (dense; the sheet's 733 TFLOPS bf16 assumes sparsity)", step_overhead=4e-3),
    Device("b200", "gpu", {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12}, 8e12, 180e9,
           "NVIDIA DGX B200 datasheet, per GPU (dense = half the sparse figures)", step_overhead=4e-3),
    Device("dgx-spark", "gpu", {"bf16": 125e12, "fp16": 125e12, "fp8": 250e12}, 273e9, 128e9,
           "NVIDIA DGX Spark (GB10): 1 PFLOP FP4 sparse, halved per precision step and for density "
           "(an estimate); 273 GB/s LPDDR5x", step_overhead=5e-3),
    Device("dual-xeon", "cpu", {"bf16": 60e12, "fp32": 8e12}, 614e9, 1024e9,
           "2x Xeon Platinum 8480+ (Sapphire Rapids, AMX): 8 channels DDR5-4800 per socket = 307 GB/s "
           "each; bf16 is a sustained AMX estimate, not the theoretical peak", mfu=0.4, bw_util=0.6,
           step_overhead=2e-3),
)}

LINKS: dict[str, Link] = {link.name: link for link in (
    Link("nvlink-4", 450e9, 1e-6, "NVLink 4 (H100): 900 GB/s bidirectional per GPU"),
    Link("rdma-400g", 50e9, 2e-6, "400 Gb/s InfiniBand NDR / RoCE (ConnectX-7)", efficiency=0.9),
    Link("rdma-200g", 25e9, 2e-6, "200 Gb/s InfiniBand HDR / RoCE", efficiency=0.9),
    Link("tcp-100g", 12.5e9, 20e-6, "100 GbE, kernel TCP", efficiency=0.7),
    Link("tcp-25g", 3.125e9, 30e-6, "25 GbE, kernel TCP", efficiency=0.8),
    Link("tcp-10g", 1.25e9, 50e-6, "10 GbE, kernel TCP", efficiency=0.9),
    Link("tcp-1g", 0.125e9, 100e-6, "1 GbE, kernel TCP", efficiency=0.9),
    Link("loopback", 3e9, 10e-6, "this machine's loopback TCP as disagg's transport moves it (measured)"),
)}


def load_catalog(path: str | Path | None) -> tuple[dict[str, Device], dict[str, Link]]:
    """The built-in catalog, with a TOML file's entries added or overriding."""
    devices, links = dict(DEVICES), dict(LINKS)
    if path is None:
        return devices, links
    try:
        data: dict[str, Any] = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the catalog {path}: {e}") from None
    try:
        for name, d in data.get("device", {}).items():
            devices[name] = Device(name=name, **d)
        for name, d in data.get("link", {}).items():
            links[name] = Link(name=name, **d)
    except TypeError as e:
        raise ConfigError(f"catalog {path}: {e}") from None
    return devices, links


def find(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None
