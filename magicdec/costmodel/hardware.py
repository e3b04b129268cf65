"""Hardware profiles: the machine parameters the roofline cost model reads.

A `HardwareProfile` holds peak memory bandwidth, peak FLOP/s per dtype, the interconnect used by
tensor-parallel all-reduces, fixed overheads, and the fractions of peak that are achievable in
practice. Built-in profiles carry datasheet peaks (labelled ``source="datasheet"``); a profile
fitted on a real machine (`magicdec.bench.fit`) stores effective values with efficiencies of 1
and ``source="measured on ..."``. Profiles round-trip through JSON (`save_profile` /
`load_profile`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Achievable fractions of datasheet peaks applied to every built-in GPU profile.
# Bandwidth: a device-to-device copy reaches about 90% of the datasheet rate (docs/cost-model.md).
BANDWIDTH_EFFICIENCY = 0.90
# FLOP/s: a large bf16 matmul reaches about 80% of the datasheet rate (docs/cost-model.md).
FLOPS_EFFICIENCY = 0.80
# Interconnect: NCCL ring all-reduce bus bandwidth is typically ~80% of the per-direction link
# rate (assumed; not measured here).
INTERCONNECT_EFFICIENCY = 0.80
# Latency of one small all-reduce over NVLink with a one-shot/CUDA-graph all-reduce (assumed,
# ~10 us is the usual small-message figure); PCIe cards without NVLink pay more.
NVLINK_ALLREDUCE_LATENCY_S = 10e-6
PCIE_ALLREDUCE_LATENCY_S = 30e-6
# Kernel launch/tail cost per decoder layer not captured by the roofline (~14 kernels per layer at
# a few microseconds each), chosen to fit measured GPU step times (docs/cost-model.md).
GPU_LAYER_OVERHEAD_S = 40e-6
# Per-step host cost of a CUDA-graph replay (launch, sampling hand-off); assumed.
GPU_STEP_OVERHEAD_S = 100e-6
# Per speculation round, beyond its forward passes: one host synchronisation to learn the accepted
# lengths, plus ~30-50 small bookkeeping kernels (acceptance, cache rollback, window slide) at
# ~10 us each in eager PyTorch; assumed. The engine's real figure comes from `magicdec profile`.
GPU_ROUND_OVERHEAD_S = 0.5e-3

TB = 1e12
GB = 1e9
MIB = 2**20  # device memory is given in MiB as nvidia-smi reports the total


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One device (per GPU for tensor-parallel runs) as the roofline model sees it."""

    name: str
    mem_bandwidth: float  # bytes/s, peak (datasheet) or effective (measured)
    flops_bf16: float  # FLOP/s, dense
    flops_fp16: float
    flops_fp32: float
    interconnect_bandwidth: float = 0.0  # bytes/s per GPU per direction for all-reduce; 0 = none
    allreduce_latency_s: float = 0.0  # fixed cost of one all-reduce
    step_overhead_s: float = 0.0  # fixed cost per forward step
    layer_overhead_s: float = 0.0  # fixed cost per decoder layer per forward step
    round_overhead_s: float = 0.0  # fixed cost per speculation round beyond its forward steps
    bandwidth_efficiency: float = 1.0  # achievable fraction of mem_bandwidth
    flops_efficiency: float = 1.0  # achievable fraction of the FLOP/s figures
    interconnect_efficiency: float = 1.0  # achievable fraction of interconnect_bandwidth
    memory_bytes: float = 0.0  # device memory capacity; 0 = unknown (no capacity check)
    source: str = "datasheet"

    def __post_init__(self) -> None:
        for f in ("mem_bandwidth", "flops_bf16", "flops_fp16", "flops_fp32"):
            if not getattr(self, f) > 0:
                raise ValueError(f"hardware profile {self.name!r}: {f} must be positive")
        for f in ("interconnect_bandwidth", "allreduce_latency_s", "step_overhead_s", "layer_overhead_s",
                  "round_overhead_s", "memory_bytes"):
            if getattr(self, f) < 0:
                raise ValueError(f"hardware profile {self.name!r}: {f} must be >= 0")
        for f in ("bandwidth_efficiency", "flops_efficiency", "interconnect_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"hardware profile {self.name!r}: {f} must be in (0, 1]")
        if not self.source:
            raise ValueError(f"hardware profile {self.name!r}: source must say where the figures come from")

    # ---- effective figures used by the model ---------------------------------------------------
    @property
    def effective_bandwidth(self) -> float:
        return self.mem_bandwidth * self.bandwidth_efficiency

    def peak_flops(self, dtype: str) -> float:
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
        return getattr(self, f"flops_{dtype}")

    def effective_flops(self, dtype_bytes: int) -> float:
        """Achievable FLOP/s for 2-byte (bf16) or 4-byte (fp32) math."""
        return self.peak_flops(dtype_for_bytes(dtype_bytes)) * self.flops_efficiency

    @property
    def effective_interconnect(self) -> float:
        return self.interconnect_bandwidth * self.interconnect_efficiency

    def with_(self, **changes: Any) -> HardwareProfile:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hardware profile has unknown fields {', '.join(unknown)}")
        return cls(**data)


def dtype_for_bytes(dtype_bytes: int) -> str:
    if dtype_bytes == 2:
        return "bf16"
    if dtype_bytes == 4:
        return "fp32"
    raise ValueError(f"dtype_bytes must be 2 (bf16/fp16) or 4 (fp32), got {dtype_bytes}")


def _gpu(name: str, bw: float, bf16: float, fp32: float, link: float, latency: float, mem: float,
         note: str) -> HardwareProfile:
    return HardwareProfile(
        name=name, mem_bandwidth=bw, flops_bf16=bf16, flops_fp16=bf16, flops_fp32=fp32,
        interconnect_bandwidth=link, allreduce_latency_s=latency,
        step_overhead_s=GPU_STEP_OVERHEAD_S, layer_overhead_s=GPU_LAYER_OVERHEAD_S,
        round_overhead_s=GPU_ROUND_OVERHEAD_S,
        bandwidth_efficiency=BANDWIDTH_EFFICIENCY, flops_efficiency=FLOPS_EFFICIENCY,
        interconnect_efficiency=INTERCONNECT_EFFICIENCY, memory_bytes=mem, source=f"datasheet ({note})",
    )


# Datasheet figures (NVIDIA product briefs): HBM/GDDR bandwidth, dense tensor-core bf16 (= fp16)
# FLOP/s without sparsity, non-tensor fp32 FLOP/s, NVLink per-direction bandwidth (half the quoted
# bidirectional figure; PCIe Gen4 x16 for the L40S), and total memory as nvidia-smi reports it.
BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        _gpu("a100-40gb", 1.555 * TB, 312 * TB, 19.5 * TB, 300 * GB, NVLINK_ALLREDUCE_LATENCY_S, 40960 * MIB,
             "A100 SXM4 40GB"),
        _gpu("a100-80gb", 2.039 * TB, 312 * TB, 19.5 * TB, 300 * GB, NVLINK_ALLREDUCE_LATENCY_S, 81920 * MIB,
             "A100 SXM4 80GB"),
        _gpu("h100", 3.35 * TB, 989 * TB, 67 * TB, 450 * GB, NVLINK_ALLREDUCE_LATENCY_S, 81559 * MIB,
             "H100 SXM5 80GB"),
        _gpu("h200", 4.8 * TB, 989 * TB, 67 * TB, 450 * GB, NVLINK_ALLREDUCE_LATENCY_S, 143771 * MIB,
             "H200 SXM 141GB"),
        _gpu("l40s", 0.864 * TB, 362 * TB, 91.6 * TB, 32 * GB, PCIE_ALLREDUCE_LATENCY_S, 46068 * MIB,
             "L40S, PCIe Gen4 x16"),
        # A small CPU running the eager PyTorch engine: rough guesses meant to be replaced by
        # `magicdec profile`. 20 GB/s is dual-channel DDR4 as a few cores see it; 100 GFLOP/s fp32 is
        # a few AVX2 cores; bf16 matmul on CPUs without AMX is slower than fp32. Eager dispatch costs
        # ~10 us per op, ~15 ops per layer, ~100 ops of bookkeeping per speculation round.
        HardwareProfile(
            name="cpu", mem_bandwidth=20 * GB, flops_bf16=50e9, flops_fp16=50e9, flops_fp32=100e9,
            step_overhead_s=1e-3, layer_overhead_s=150e-6, round_overhead_s=1e-3, memory_bytes=0.0,
            source="generic default (not measured; run `magicdec profile`)",
        ),
    )
}


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by (case-insensitive) name, or a profile saved as JSON."""
    key = str(name_or_path).strip().lower()
    if key in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[key]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"hardware profile file {str(path)!r} does not exist")
        with path.open() as fh:
            return HardwareProfile.from_dict(json.load(fh))
    raise ValueError(
        f"unknown hardware {str(name_or_path)!r}; known: {', '.join(BUILTIN_PROFILES)} "
        "(or a path to a profile .json)"
    )


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
    return path
