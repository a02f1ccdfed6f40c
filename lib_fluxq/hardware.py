"""What machine are we on: GPU backend (CUDA, ROCm, Apple MPS or none), its name and memory, system RAM, free disk.

Detection never fails: anything that cannot be read stays ``None`` and the advisor says so. Every value can be
overridden (``with_overrides``) to plan for another card; overrides are validated and bad ones raise ``FluxqError``.

Sources, in order of preference: nvidia-ml-py (``pynvml``, optional: reads free/total VRAM without creating a CUDA
context), then torch (``torch.cuda.mem_get_info`` / ``get_device_properties``; ROCm builds answer the same API and set
``torch.version.hip``), Apple's unified memory through ``torch.mps.recommended_max_memory`` when present, and psutil
for RAM and disk.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from lib_fluxq.errors import FluxqError

GIB = 1024 ** 3

# Plausible ranges for overrides: the largest single accelerator today has ~192 GB; beyond 1 TB is a typo.
MAX_VRAM_GB = 1024.0
MAX_RAM_GB = 65536.0
MIN_VRAM_GB = 0.5
MIN_RAM_GB = 1.0


@dataclass
class Hardware:
    """One machine as the advisor sees it. Sizes are bytes; ``sources`` says where each value came from."""

    backend: str                      # "cuda" | "rocm" | "mps" | "cpu"
    gpu_name: str | None = None
    vram_total: int | None = None     # bytes; for MPS the share macOS lets the GPU use
    vram_free: int | None = None      # bytes free right now (None when unknown or overridden)
    unified_memory: bool = False      # Apple: VRAM and RAM are the same pool
    ram_total: int | None = None
    ram_available: int | None = None
    cpu_cores: int | None = None      # physical cores
    disk_path: str | None = None
    disk_free: int | None = None
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def has_gpu(self) -> bool:
        return self.backend != "cpu" and bool(self.vram_total)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _detect_nvml() -> tuple[str, int, int] | None:
    """(name, total, free) of GPU 0 from NVML, or None when nvidia-ml-py or the driver is absent."""
    try:
        import pynvml  # optional: pip install nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return name, int(memory.total), int(memory.free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVIDIA driver, no device, permission: fall back to torch
        return None


def _detect_torch_gpu(hardware: Hardware) -> None:
    try:
        import torch
    except ImportError:
        hardware.notes.append("torch is not installed: GPU detection skipped")
        return
    try:
        if torch.cuda.is_available():
            hardware.backend = "rocm" if getattr(torch.version, "hip", None) else "cuda"
            nvml = _detect_nvml() if hardware.backend == "cuda" else None
            if nvml is not None:
                hardware.gpu_name, hardware.vram_total, hardware.vram_free = nvml
                hardware.sources.update(gpu_name="nvml", vram_total="nvml", vram_free="nvml")
            else:
                props = torch.cuda.get_device_properties(0)
                hardware.gpu_name = props.name
                free, total = torch.cuda.mem_get_info(0)
                hardware.vram_total, hardware.vram_free = int(total), int(free)
                hardware.sources.update(gpu_name="torch", vram_total="torch", vram_free="torch")
            if torch.cuda.device_count() > 1:
                hardware.notes.append(f"{torch.cuda.device_count()} GPUs found; planning for GPU 0 (Forge uses one)")
            return
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            hardware.backend = "mps"
            hardware.unified_memory = True
            hardware.gpu_name = "Apple GPU (MPS)"
            recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
            if recommended is not None:
                hardware.vram_total = int(recommended())
                hardware.sources["vram_total"] = "torch.mps.recommended_max_memory"
            hardware.sources["gpu_name"] = "torch"
    except Exception as exc:  # a broken driver must not stop the advice
        hardware.notes.append(f"GPU detection failed ({type(exc).__name__}: {exc}); treating this machine as CPU-only")
        hardware.backend = "cpu"


def detect(models_dir: str | os.PathLike[str] | None = None) -> Hardware:
    """Read this machine. ``models_dir`` (when given) is where free disk space is measured, else the current folder."""
    hardware = Hardware(backend="cpu")
    memory = psutil.virtual_memory()
    hardware.ram_total, hardware.ram_available = int(memory.total), int(memory.available)
    hardware.cpu_cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    hardware.sources.update(ram_total="psutil", ram_available="psutil", cpu_cores="psutil")
    _detect_torch_gpu(hardware)
    if hardware.backend == "mps" and hardware.vram_total is None and hardware.ram_total:
        # macOS lets the GPU wire about two thirds of unified memory on smaller machines, three quarters above 36 GB.
        share = 0.75 if hardware.ram_total > 36 * GIB else 2 / 3
        hardware.vram_total = int(hardware.ram_total * share)
        hardware.sources["vram_total"] = f"{share:.0%} of unified memory (macOS default GPU limit)"
    disk_path = os.fspath(models_dir) if models_dir is not None else os.getcwd()
    try:
        hardware.disk_free = int(psutil.disk_usage(disk_path).free)
        hardware.disk_path = disk_path
        hardware.sources["disk_free"] = "psutil"
    except OSError:
        hardware.disk_path = disk_path  # the models folder check reports the problem with a clear message
    return hardware


def _check_range(label: str, value: float, low: float, high: float, fix: str) -> float:
    if value != value or value < low or value > high:  # value != value: NaN
        raise FluxqError(f"{label} {value:g} GB is not plausible: expected between {low:g} and {high:g} GB ({fix})")
    return float(value)


def with_overrides(hardware: Hardware, vram_gb: float | None = None, ram_gb: float | None = None,
                   gpu_name: str | None = None, backend: str | None = None) -> Hardware:
    """A copy of ``hardware`` planned for another card/machine. GB means GiB, as nvidia-smi and Task Manager count.

    An overridden VRAM size drops the measured free VRAM (it belongs to the real card); a named GPU on a CPU-only
    machine switches the plan to CUDA.
    """
    changed = replace(hardware, sources=dict(hardware.sources), notes=list(hardware.notes))
    if vram_gb is not None:
        vram_gb = _check_range("--vram", vram_gb, MIN_VRAM_GB, MAX_VRAM_GB,
                               "give the card's memory in GB, e.g. --vram 12 for an RTX 3060 12GB")
        changed.vram_total = int(vram_gb * GIB)
        changed.vram_free = None
        changed.sources["vram_total"] = "override"
        changed.sources.pop("vram_free", None)
    if ram_gb is not None:
        ram_gb = _check_range("--ram", ram_gb, MIN_RAM_GB, MAX_RAM_GB,
                              "give the system memory in GB, e.g. --ram 32")
        changed.ram_total = int(ram_gb * GIB)
        changed.ram_available = None
        changed.sources["ram_total"] = "override"
        changed.sources.pop("ram_available", None)
        if changed.unified_memory and vram_gb is None:
            changed.vram_total = int(changed.ram_total * (0.75 if ram_gb > 36 else 2 / 3))
    if gpu_name is not None:
        gpu_name = gpu_name.strip()
        if not gpu_name:
            raise FluxqError("--gpu is empty (give a card name such as 'RTX 3060', or leave it out)")
        changed.gpu_name = gpu_name
        changed.sources["gpu_name"] = "override"
        if vram_gb is None:
            changed.vram_free = None
    if backend is not None:
        changed.backend = backend
    elif changed.backend == "cpu" and (vram_gb is not None or gpu_name is not None):
        changed.backend = "cuda"
        changed.notes.append("planning for an NVIDIA CUDA card (overridden); this machine itself has no GPU")
    return changed
