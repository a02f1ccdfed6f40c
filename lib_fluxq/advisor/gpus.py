"""Published GPU specs the speed model reads (tensor TFLOP/s, memory bandwidth, PCIe link), and how a card name or a
VRAM size maps to one."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lib_fluxq.advisor.calibration import PCIE_GBPS_PER_LANE
from lib_fluxq.hardware import GIB


@dataclass(frozen=True)
class GpuProfile:
    """Published specs. ``tflops``: dense fp16/bf16 tensor throughput with fp32 accumulation (what PyTorch uses);
    fp32 throughput for cards without tensor cores."""

    name: str
    keys: tuple[str, ...]             # normalised name fragments that identify the card
    vram_gb: float
    tflops: float
    mem_gbps: float
    pcie_gen: int
    pcie_lanes: int
    bf16: bool
    fp8: bool
    datacenter: bool = False
    sm: int = 0                       # CUDA compute capability x 10 (NVIDIA's published list); 0: not CUDA

    @property
    def pcie_gbps(self) -> float:
        return PCIE_GBPS_PER_LANE.get(self.pcie_gen, 0.985) * self.pcie_lanes


GPU_PROFILES: list[GpuProfile] = [
    GpuProfile("GTX 1060 3GB", ("gtx10603gb",), 3, 3.9, 192, 3, 16, False, False, sm=61),
    GpuProfile("GTX 1060 6GB", ("gtx1060",), 6, 4.4, 192, 3, 16, False, False, sm=61),
    GpuProfile("GTX 1080", ("gtx1080",), 8, 8.9, 320, 3, 16, False, False, sm=61),
    GpuProfile("RTX 2060", ("rtx2060",), 6, 25.8, 336, 3, 16, False, False, sm=75),
    GpuProfile("RTX 3060", ("rtx3060",), 12, 25.5, 360, 4, 16, True, False, sm=86),
    GpuProfile("RTX 3070 Ti Laptop", ("rtx3070tilaptop",), 8, 35.0, 448, 4, 16, True, False, sm=86),
    GpuProfile("RTX 3090", ("rtx3090",), 24, 71.0, 936, 4, 16, True, False, sm=86),
    GpuProfile("RTX 4060", ("rtx4060",), 8, 30.2, 272, 4, 8, True, True, sm=89),
    GpuProfile("RTX 4060 Ti 16GB", ("rtx4060ti16gb", "rtx4060ti"), 16, 44.2, 288, 4, 8, True, True, sm=89),
    GpuProfile("RTX 4070", ("rtx4070",), 12, 58.3, 504, 4, 16, True, True, sm=89),
    GpuProfile("RTX 4080", ("rtx4080",), 16, 97.5, 717, 4, 16, True, True, sm=89),
    GpuProfile("RTX 4090", ("rtx4090",), 24, 165.2, 1008, 4, 16, True, True, sm=89),
    GpuProfile("RTX 5090", ("rtx5090",), 32, 209.5, 1792, 5, 16, True, True, sm=120),
    GpuProfile("A100 40GB", ("a10040gb", "a100pcie40gb", "a100sxm440gb"), 40, 312, 1555, 4, 16, True, False, True,
               sm=80),
    GpuProfile("A100 80GB", ("a100",), 80, 312, 2039, 4, 16, True, False, True, sm=80),
    GpuProfile("H100 PCIe", ("h100pcie",), 80, 756, 2000, 5, 16, True, True, True, sm=90),
    GpuProfile("H100", ("h100",), 80, 989, 3350, 5, 16, True, True, True, sm=90),
    GpuProfile("H200", ("h200",), 141, 989, 4800, 5, 16, True, True, True, sm=90),
    GpuProfile("Apple M-series (generic)", ("applegpu", "apple"), 16, 14.0, 200, 0, 0, True, False),
]
_PROFILES_BY_NAME = {p.name: p for p in GPU_PROFILES}
# Unknown cards: speed of a representative card of the same VRAM class (upper bound GiB -> profile).
_VRAM_CLASSES: list[tuple[float, str]] = [
    (3.5, "GTX 1060 3GB"), (6.5, "RTX 2060"), (8.5, "RTX 4060"), (12.5, "RTX 3060"), (16.5, "RTX 4060 Ti 16GB"),
    (24.5, "RTX 3090"), (32.5, "RTX 5090"), (48.5, "A100 40GB"), (96.0, "H100"), (math.inf, "H200")]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower()).replace("nvidia", "").replace("geforce", "")


def find_gpu_profile(name: str | None) -> GpuProfile | None:
    """The table entry whose longest key occurs in ``name`` ('NVIDIA GeForce RTX 3070 Ti Laptop GPU' -> 3070 Ti L)."""
    if not name:
        return None
    normalised = _normalise(name)
    best: tuple[int, GpuProfile] | None = None
    for profile in GPU_PROFILES:
        for key in profile.keys:
            if key in normalised and (best is None or len(key) > best[0]):
                best = (len(key), profile)
    return best[1] if best else None


def profile_for_vram(vram_bytes: int) -> GpuProfile:
    gib = vram_bytes / GIB
    return next(_PROFILES_BY_NAME[name] for bound, name in _VRAM_CLASSES if gib <= bound)

