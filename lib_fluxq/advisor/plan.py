"""The plan: one machine x one model -> a level, a size, GPU Weights, swap and text-encoder settings, each with its
reason and numbers (``Planner.advise``), and verdicts on the user's own files (``Planner.rank_files``)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lib_fluxq.advisor.calibration import (
    BAKED_GGUF_TYPES,
    CLIP_L_BYTES,
    CONTEXT_BYTES,
    CPU_FP8_CAST_GBPS,
    CPU_GFLOPS_PER_CORE,
    DESKTOP_ALLOWANCE,
    DESKTOP_BYTES,
    DISK_GBPS,
    FORGE_SWAP_FACTOR,
    FORGE_SWAP_MARGIN,
    GB,
    HEADROOM,
    HOSTS,
    MATMUL_EFFICIENCY,
    MAX_OFFLOAD_SHARE,
    MIB,
    PAGEABLE_PCIE_EFFICIENCY,
    PINNED_PCIE_EFFICIENCY,
    RAM_BASE_BYTES,
    RAM_COMFORT,
    RAM_PEAKS,
    RESOLUTION_PRESETS,
    SAFETENSORS_RAM_PEAK,
    SLOW_STEP_SECONDS,
    SMALL_CARD_BYTES,
    SVDQ_LINEAR_SPEEDUP,
    TEXT_TOKENS,
    VAE_DECODE_FLOPS_PER_PIXEL,
    VAE_WEIGHT_BYTES,
    RamPeak,
)
from lib_fluxq.advisor.gpus import _PROFILES_BY_NAME, find_gpu_profile, profile_for_vram
from lib_fluxq.advisor.model import (
    LEVELS,
    T5_OPTIONS,
    WeightLevel,
    activation_bytes,
    distinct_families,
    flux_step_flops,
    flux_step_flops_parts,
    image_tokens,
    largest_layer_elements,
    quantized_parameters,
    resolve_family,
    resolve_level,
    text_encoder_bytes,
    transformer_bytes,
    vae_decode_bytes,
)
from lib_fluxq.errors import FluxqError
from lib_fluxq.families import COMPANIONS, FAMILIES, FORMATS, runs_on
from lib_fluxq.families import HOSTS as HOST_TITLES
from lib_fluxq.flux import FLUX_DEV, FluxConfig
from lib_fluxq.hardware import GIB, Hardware, detect


# ------------------------------------------------------------------------------------------------ result types
@dataclass
class Choice:
    """One recommended setting: its value, a one-line reason and the numbers behind it."""

    value: Any
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class LevelEstimate:
    level: str
    fidelity_bits: float
    weights_gb: float
    need_gb: float            # weights + activations + scratch + context at the planned size
    fit: str                  # "resident" | "near-resident" | "offload" | "too slow" | "won't fit" | "unsupported"
    resident_gb: float
    offloaded_gb: float
    step_s: float | None
    ram_gb: float             # steady RAM with the planned text encoder
    note: str = ""


@dataclass
class FileVerdict:
    name: str
    family: str
    level: str | None
    size_gb: float
    verdict: str              # "fits" | "offloads" | "won't fit" | "component" | "skipped" | "unreadable"
    step_s: float | None
    reason: str


@dataclass
class Advice:
    """The advisor's answer. Field names are stable (documented in README.md)."""

    backend: str
    gpu: str | None
    gpu_profile: str | None
    profile_assumed: bool
    vram_gb: float | None
    ram_gb: float | None
    disk_free_gb: float | None
    model: str
    width: int
    height: int
    steps: int
    budget_gb: float | None
    cpu_only: bool
    summary: str
    recommended: Choice
    faster: Choice | None
    resolution: Choice
    resolutions: list[dict[str, Any]]
    gpu_weights_mb: Choice
    swap_method: Choice
    swap_location: Choice
    text_encoder: Choice
    vae: Choice
    refine: Choice
    levels: list[LevelEstimate]
    files: list[FileVerdict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    model_title: str = ""                 # the family's name for people, e.g. "FLUX.2 [klein] 9B"
    alternative: Choice | None = None     # another family that runs better here, when this one runs poorly
    families: list[dict[str, Any]] = field(default_factory=list)   # every family's best plan on this machine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _gb(n: float) -> float:
    return round(n / GIB, 2)


# ------------------------------------------------------------------------------------------------------ planner
class Planner:
    """Estimates for one machine (``Hardware``) and one Flux variant; ``advise()`` picks, ``rank_files()`` judges."""

    def __init__(self, hardware: Hardware, width: int = 1024, height: int = 1024, batch: int = 1,
                 model: str = "dev", steps: int | None = None, host: str = "forge", fluxq_loading: bool = True) -> None:
        if width % 16 or height % 16 or not (256 <= width <= 4096 and 256 <= height <= 4096):
            raise FluxqError(f"size {width}x{height} is not a Flux size: use multiples of 16 between 256 and 4096")
        family = resolve_family(model)
        if host not in HOSTS:
            raise FluxqError(f"unknown host '{host}': use one of {', '.join(HOSTS)}")
        hardware = replace(hardware, sources=dict(hardware.sources), notes=list(hardware.notes))
        self.hardware = hardware
        # RAM figures are what the user sees in this host with fluxq's loading active (or with the host alone)
        self.host, self.fluxq_loading = host, fluxq_loading
        self.width, self.height, self.batch = width, height, batch
        # The family table's row drives everything model-specific: geometry, text encoders, default steps, hosts.
        self.family = family
        self.model = family.key
        self.config = family.geometry
        self.steps = steps if steps is not None else (family.steps or 20)
        self.profile_assumed = False
        profile = find_gpu_profile(hardware.gpu_name)
        if hardware.backend == "mps":
            profile = _PROFILES_BY_NAME["Apple M-series (generic)"]
            self.profile_assumed = True
        if hardware.vram_total is None and profile is not None and hardware.backend != "cpu":
            hardware.vram_total = int(profile.vram_gb * GIB)
            hardware.sources["vram_total"] = f"table ({profile.name})"
        if profile is None and hardware.vram_total:
            profile = profile_for_vram(hardware.vram_total)
            self.profile_assumed = True
        self.profile = profile
        # A card named for planning (not detected) whose VRAM the table does not know: nothing to plan with.
        self.unknown_card = None
        if hardware.backend != "cpu" and not hardware.vram_total and hardware.gpu_name:
            self.unknown_card = (f"'{hardware.gpu_name}' is not a card the advisor knows, so its VRAM is unknown: "
                                 "give the card's VRAM (GB) to plan for it")
        self._weights: dict[str, int] = {name: transformer_bytes(lv, self.config) for name, lv in LEVELS.items()}

    # -- budget ---------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return int(self.hardware.vram_total or 0)

    def _others_extra(self) -> int:
        hw = self.hardware
        if hw.vram_free is None or not hw.vram_total:
            return 0
        return max(0, (hw.vram_total - hw.vram_free) - DESKTOP_ALLOWANCE)

    @property
    def budget(self) -> int:
        return int(self.total * (1 - HEADROOM)) - self._others_extra()

    @property
    def desktop(self) -> int:
        return 0 if (self.profile and self.profile.datacenter) or self.hardware.unified_memory else DESKTOP_BYTES

    @property
    def card_free(self) -> int:
        """What Forge sees free when it loads the transformer."""
        return self.total - CONTEXT_BYTES - self.desktop - self._others_extra()

    # -- memory ---------------------------------------------------------------------------------------------
    def weights(self, level: WeightLevel) -> int:
        return self._weights[level.name]

    def scratch_bytes(self, level: WeightLevel) -> int:
        if level.kind == "float" and level.name in ("BF16", "FP16") and (self.profile is None or self.profile.bf16):
            return 0
        if level.kind == "svdq":   # fused 4-bit kernels: no layer is ever dequantized whole
            return 0
        dtype_size = 2 if (self.profile is None or self.profile.tflops > 10 or self.profile.bf16) else 4
        return largest_layer_elements(self.config) * dtype_size

    def working_set(self, level: WeightLevel, width: int, height: int) -> int:
        return activation_bytes(width, height, self.batch, self.config) + self.scratch_bytes(level)

    def reserve_bytes(self, level: WeightLevel, width: int, height: int) -> int:
        """What to leave Forge for computation ("total - GPU Weights"): the working set + 10%, rounded up to 64 MB."""
        raw = self.working_set(level, width, height) * 1.1
        return int(math.ceil(raw / (64 * MIB)) * 64 * MIB)

    def forge_resident(self, weight_bytes: int, reserve: int) -> int:
        free_for_weights = self.card_free - reserve
        if weight_bytes <= free_for_weights:
            return weight_bytes
        suggestion = max(free_for_weights / FORGE_SWAP_FACTOR, free_for_weights - FORGE_SWAP_MARGIN)
        return int(max(0, min(weight_bytes, suggestion)))

    def supported(self, level: WeightLevel) -> str | None:
        """Why ``level`` cannot run on this backend, or None."""
        backend = self.hardware.backend
        if level.kind == "bnb" and backend in ("mps", "cpu"):
            return "bitsandbytes NF4 needs a CUDA GPU"
        if level.kind == "bnb" and backend == "rocm":
            return "Forge installs bitsandbytes only for CUDA"
        if level.name == "FP8" and backend == "mps":
            return "MPS has no float8 storage"
        if level.format_key is not None:
            return self._format_refusal(level.format_key)
        return None

    def _format_refusal(self, format_key: str) -> str | None:
        """Why the family table says this host / family / card cannot run files in this format (SVDQuant: Neo
        only, FLUX.1 only, Nunchaku's kernels for the card's generation), or None."""
        fmt = FORMATS[format_key]
        support = runs_on(self.family.key, format_key, self.host)
        if not support.runs:
            return f"{fmt.title}: {HOST_TITLES.get(self.host, self.host)} cannot run it ({support.note})"
        if fmt.archs and self.family.arch not in fmt.archs:
            return f"{fmt.title}: no host runs {self.family.title} in this format (Forge Neo loads it as FLUX.1 only)"
        if fmt.cuda_sm is not None:
            low, high = fmt.cuda_sm
            sm = self.profile.sm if self.profile is not None else 0
            if self.hardware.backend != "cuda" or not low <= sm <= high:
                card = f"sm_{sm}" if sm else "not an NVIDIA CUDA card"
                return (f"{fmt.title}: Nunchaku's kernels need CUDA compute capability {low / 10:g}-{high / 10:g} "
                        f"({support.note.removeprefix('needs Nunchaku: the nunchaku package, ')}); this card is "
                        f"{card}")
        return None

    def ram_peak(self, level: WeightLevel) -> RamPeak:
        """The measured load-peak factor for ``level``'s file in this host (RAM_PEAKS, calibration.py)."""
        if level.kind != "gguf":
            return SAFETENSORS_RAM_PEAK
        storage = "baked" if level.name in BAKED_GGUF_TYPES else "mapped"
        return RAM_PEAKS[(self.host, "fluxq" if self.fluxq_loading else "host", storage)]

    def _ram_peak_warning(self, level: WeightLevel, files: int) -> str:
        """The load-peak warning: the figure for this host with (or without) fluxq's loading, and how it is known."""
        peak = self.ram_peak(level)
        host = HOST_TITLES.get(self.host, self.host).split(" (")[0]
        with_what = "with fluxq" if self.fluxq_loading else "without fluxq"
        how = f"measured in a real {host} {with_what}" if peak.measured else peak.basis
        # memory-mapped files are paged back in from disk; copies (baked types, safetensors) go to the page file
        effect = ("parts of the files will be re-read from disk (a slow first image)"
                  if level.kind == "gguf" and self.fluxq_loading else "the first load will use the page file")
        webui = int(peak.factor * files)
        return (f"loading these files ({files / GB:.1f} GB) in {host} {with_what} peaks at ~{webui / GB:.0f} GB of "
                f"RAM in the WebUI ({peak.factor:g}x the files: {how}) + {RAM_BASE_BYTES / GIB:g} GB for the OS, "
                f"more than the {_gb(self.hardware.ram_total or 0)} GB here: {effect}")

    def load_peak_bytes(self, level: WeightLevel, files_bytes: int) -> int:
        """Peak RAM while the WebUI loads ``files_bytes`` of model files (transformer + text encoders + VAE)."""
        return int(self.ram_peak(level).factor * files_bytes) + RAM_BASE_BYTES

    def te_bytes(self, option: str) -> int:
        """This family's text encoders (T5-XXL + CLIP-L, Qwen3, Mistral) at ``option`` (a T5_OPTIONS precision)."""
        return text_encoder_bytes(self.family.companions, option)

    def ram_steady(self, offloaded: int, t5: str = "fp16") -> int:
        return offloaded + self.te_bytes(t5) + VAE_WEIGHT_BYTES + RAM_BASE_BYTES

    # -- speed ----------------------------------------------------------------------------------------------
    def compute_seconds(self, width: int, height: int, level: WeightLevel | None = None) -> float:
        if self.profile is None:
            return math.inf
        linear, attention = flux_step_flops_parts(width, height, self.batch, self.config)
        if level is not None and level.kind == "svdq":
            linear /= SVDQ_LINEAR_SPEEDUP   # 4-bit weights x 4-bit activations (calibration.py)
        return (linear + attention) / (self.profile.tflops * 1e12 * MATMUL_EFFICIENCY)

    def dequant_seconds(self, level: WeightLevel) -> float:
        if self.profile is None:
            return 0.0
        per_weight = level.dequant_bytes
        if level.name == "BF16" and not self.profile.bf16:
            per_weight = 4.0  # cast to fp16 every step on cards without bf16
        return quantized_parameters(level, self.config) * per_weight / (self.profile.mem_gbps * GB)

    def pcie_bytes_per_second(self, pinned: bool) -> float:
        if self.profile is None or self.profile.pcie_gbps == 0:
            return math.inf
        return self.profile.pcie_gbps * GB * (PINNED_PCIE_EFFICIENCY if pinned else PAGEABLE_PCIE_EFFICIENCY)

    def step_seconds(self, level: WeightLevel, offloaded: int, width: int, height: int,
                     pinned: bool = False, overlap: bool = False) -> float:
        """One sampling step: compute + dequant + streaming the offloaded weights (+ the CPU upcast for FP8)."""
        gpu = self.compute_seconds(width, height, level) + self.dequant_seconds(level)
        if offloaded <= 0:
            return gpu
        wire, cpu = float(offloaded), 0.0
        if level.name == "FP8":
            cpu = offloaded / (CPU_FP8_CAST_GBPS * GB)
            wire = offloaded * 2.0
        transfer = wire / self.pcie_bytes_per_second(pinned) + cpu
        return max(gpu, transfer) + 0.1 * transfer if overlap else gpu + transfer

    def image_seconds(self, level: WeightLevel, offloaded: int, width: int, height: int, steps: int,
                      file_bytes: int | None = None, t5: str = "fp8", cold: bool = True) -> float:
        """One image: steps, T5 round trip over PCIe, VAE decode; ``cold`` adds reading the files from disk."""
        total = steps * self.step_seconds(level, offloaded, width, height)
        total += self.te_bytes(t5) / self.pcie_bytes_per_second(False)
        if self.profile is not None:
            total += width * height * VAE_DECODE_FLOPS_PER_PIXEL / (self.profile.tflops * 1e12 * MATMUL_EFFICIENCY)
        if cold:
            weights = file_bytes if file_bytes is not None else self.weights(level) + self.te_bytes(t5)
            total += (weights + VAE_WEIGHT_BYTES) / (DISK_GBPS * GB)
        return total

    # -- one level ------------------------------------------------------------------------------------------
    def estimate(self, level: WeightLevel, width: int | None = None, height: int | None = None,
                 weight_bytes: int | None = None, t5: str = T5_OPTIONS[-1][0]) -> LevelEstimate:
        """Fit and speed of ``level``; RAM is checked with the smallest T5 the plan could fall back to."""
        width = width or self.width
        height = height or self.height
        weights = self.weights(level) if weight_bytes is None else int(weight_bytes)
        need = weights + self.working_set(level, width, height) + CONTEXT_BYTES
        ram_total = self.hardware.ram_total or 0
        unsupported = self.supported(level)
        if unsupported:
            return LevelEstimate(level.name, level.fidelity_bits, _gb(weights), _gb(need), "unsupported", 0, 0, None,
                                 0, unsupported)
        if self.hardware.unified_memory:
            fits = need <= self.budget
            step = self.step_seconds(level, 0, width, height) if fits else None
            return LevelEstimate(level.name, level.fidelity_bits, _gb(weights), _gb(need),
                                 "resident" if fits else "won't fit", _gb(weights) if fits else 0, 0, step,
                                 _gb(self.ram_steady(weights, t5)),
                                 "" if fits else f"needs {_gb(need)} GB of the {_gb(self.budget)} GB GPU share")
        reserve = self.reserve_bytes(level, width, height)
        resident = self.forge_resident(weights, reserve)
        offloaded = weights - resident
        ram = self.ram_steady(offloaded, t5)
        if need <= self.budget:
            fit, note = "resident", f"{_gb(need)} GB needed of a {_gb(self.budget)} GB budget"
        elif weights + CONTEXT_BYTES <= self.total - self.desktop and offloaded <= weights * MAX_OFFLOAD_SHARE:
            fit, note = "near-resident", (f"the weights fit on the card; Forge streams {_gb(offloaded)} GB per step "
                                          "to make room for the activations")
        elif resident <= 0:
            fit, note = "won't fit", f"no room for weights after a {_gb(reserve)} GB compute reserve"
        elif offloaded <= weights * MAX_OFFLOAD_SHARE:
            fit, note = "offload", f"{_gb(resident)} GB stay on the GPU, {_gb(offloaded)} GB stream per step"
        else:
            fit, note = "heavy offload", (f"only {_gb(resident)} GB of {_gb(weights)} GB stay on the GPU; "
                                          f"{_gb(offloaded)} GB cross PCIe every step")
        if ram_total and ram > ram_total:
            fit, note = "won't fit", f"needs {_gb(ram)} GB of RAM, the machine has {_gb(ram_total)} GB"
        # Forge's defaults (Queue, CPU): streaming adds to compute. The swap advice shows what Async/Shared save.
        step = None if fit == "won't fit" else self.step_seconds(level, offloaded, width, height)
        return LevelEstimate(level.name, level.fidelity_bits, _gb(weights), _gb(need), fit, _gb(resident),
                             _gb(offloaded), None if step is None else round(step, 2), _gb(ram), note)

    # -- choice ---------------------------------------------------------------------------------------------
    def pick(self, estimates: dict[str, LevelEstimate]) -> tuple[WeightLevel, LevelEstimate] | None:
        """Best fidelity, preferring (1) >= 4 bits, (2) resident, then near-resident, then modest offload."""
        candidates = [lv for lv in LEVELS.values() if lv.candidate]
        for min_bits in (4.0, 0.0):
            for tier in ("resident", "near-resident", "offload"):
                pool = [lv for lv in candidates if estimates[lv.name].fit == tier and lv.fidelity_bits >= min_bits]
                if pool:
                    best = max(pool, key=lambda lv: (lv.fidelity_bits, -lv.tie_order))
                    return best, estimates[best.name]
        return None

    def advise(self, files: Iterable[ModelFile | Sequence[Any]] | None = None) -> Advice:
        hw = self.hardware
        warnings: list[str] = []
        if self.unknown_card:
            return self._no_plan_advice(self.unknown_card, {}, files, cpu_only=False)
        if not hw.has_gpu:
            return self._cpu_only_advice(files)
        estimates = {name: self.estimate(lv) for name, lv in LEVELS.items()}
        picked = self.pick(estimates)
        width, height = self.width, self.height
        for small_size in ((512, 768), (512, 512)):
            if picked is not None or small_size[0] * small_size[1] >= width * height:
                break
            width, height = small_size
            estimates = {name: self.estimate(lv, width, height) for name, lv in LEVELS.items()}
            picked = self.pick(estimates)
        if picked is None:
            return self._nothing_fits(estimates, files)
        level, est = picked
        small = self.total < SMALL_CARD_BYTES or est.fit == "offload"
        if small and width * height > 512 * 768:
            width, height = (512, 768)
            estimates = {name: self.estimate(lv, width, height) for name, lv in LEVELS.items()}
            picked = self.pick(estimates)
            assert picked is not None  # a smaller size never makes a level fit worse
            level, est = picked
        weights = self.weights(level)
        reserve = self.reserve_bytes(level, width, height)
        slow = est.step_s is not None and est.step_s > SLOW_STEP_SECONDS
        if slow and not small and width * height > 768 * 768:
            width, height = 768, 768
            est = self.estimate(level, width, height)
            reserve = self.reserve_bytes(level, width, height)

        recommended = Choice(level.name, self._level_reason(level, est), {
            "weights_gb": est.weights_gb, "need_gb": est.need_gb, "budget_gb": _gb(self.budget), "fit": est.fit,
            "step_s": est.step_s, "image_s": None if est.step_s is None else round(est.step_s * self.steps, 1)})
        faster = self._faster(level, est, width, height)
        resolutions = self._resolutions(level)
        resolution = Choice([width, height], self._resolution_reason(level, est, width, height, small, slow),
                            {"megapixels": round(width * height / 1e6, 2), "tokens": image_tokens(width, height)
                             + TEXT_TOKENS, "activations_gb": _gb(activation_bytes(width, height, self.batch,
                                                                                   self.config))})
        gpu_weights = self._gpu_weights(level, est, reserve, weights)
        text_encoder = self._text_encoder(level, est, width, height, warnings)
        swap_method, swap_location = self._swap(est, level, width, height, text_encoder.value["t5"])
        vae = self._vae(est, width, height)
        refine = Choice(bool(small or slow), self._refine_reason(small, slow, est),
                        {"render": [width, height], "final": [width * 2, height * 2]} if (small or slow) else {})
        self._general_warnings(level, est, warnings, text_encoder.value["t5"])
        summary = (f"{level.name} at {width}x{height}, GPU Weights {gpu_weights.value} MB, "
                   f"text encoders {text_encoder.value['t5']} in {text_encoder.value['placement']}"
                   + (", then refine" if refine.value else ""))
        return Advice(
            backend=hw.backend, gpu=hw.gpu_name, gpu_profile=self.profile.name if self.profile else None,
            profile_assumed=self.profile_assumed, vram_gb=_gb(self.total), ram_gb=_gb(hw.ram_total or 0) or None,
            disk_free_gb=None if hw.disk_free is None else _gb(hw.disk_free), model=self.model,
            width=width, height=height, steps=self.steps, budget_gb=_gb(self.budget), cpu_only=False,
            summary=summary, recommended=recommended, faster=faster, resolution=resolution,
            resolutions=resolutions, gpu_weights_mb=gpu_weights, swap_method=swap_method,
            swap_location=swap_location, text_encoder=text_encoder, vae=vae, refine=refine,
            levels=[self.estimate(lv, width, height) for lv in LEVELS.values()],
            files=self.rank_files(files, width, height) if files is not None else [],
            warnings=warnings, hardware=hw.to_dict(), model_title=self.family.title,
            **self._across_families(est if est.fit in ("resident", "near-resident") and level.fidelity_bits >= 4
                                    and not small else None))

    # -- reasons --------------------------------------------------------------------------------------------
    def _level_reason(self, level: WeightLevel, est: LevelEstimate) -> str:
        head = {"resident": "best fidelity that runs fully resident",
                "near-resident": "best 4-bit-or-better level whose weights fit on the card",
                "offload": "best fidelity that runs with a modest offload"}.get(est.fit, est.fit)
        return f"{head}: {est.note}; ~{est.step_s} s/it"

    def _faster(self, level: WeightLevel, est: LevelEstimate, width: int, height: int) -> Choice | None:
        if est.step_s is None:
            return None
        best: LevelEstimate | None = None
        for lv in LEVELS.values():
            if not lv.candidate or lv.name == level.name or lv.fidelity_bits > level.fidelity_bits or \
                    lv.fidelity_bits < min(4.0, level.fidelity_bits):
                continue
            other = self.estimate(lv, width, height)
            if other.fit in ("resident", "near-resident", "offload") and other.step_s is not None and \
                    other.step_s < 0.95 * est.step_s and (best is None or other.step_s < best.step_s):
                best = other
        if best is None:
            return None
        nunchaku = "Nunchaku's 4-bit kernels (weights and activations); Forge Neo started with --nunchaku"
        why = ("NF4's fused 4-bit matmul skips the per-step dequant" if best.level == "NF4" else
               nunchaku if LEVELS[best.level].kind == "svdq" else
               "less dequantization work" if best.offloaded_gb <= est.offloaded_gb else "less data to stream")
        return Choice(best.level, f"{best.step_s} s/it vs {est.step_s} s/it for {level.name} ({why}); "
                                  f"fidelity {best.fidelity_bits:g} vs {level.fidelity_bits:g} bits/weight",
                      {"step_s": best.step_s, "weights_gb": best.weights_gb, "fit": best.fit})

    def _resolutions(self, level: WeightLevel) -> list[dict[str, Any]]:
        rows = []
        for w, h in RESOLUTION_PRESETS:
            e = self.estimate(level, w, h)
            rows.append({"width": w, "height": h, "fit": e.fit, "need_gb": e.need_gb, "step_s": e.step_s})
        return rows

    def _resolution_reason(self, level: WeightLevel, est: LevelEstimate, width: int, height: int, small: bool,
                           slow: bool) -> str:
        if small:
            return (f"a {_gb(self.total)} GB card streams {level.name} weights every step; render "
                    f"{width}x{height} (~{est.step_s} s/it) and upscale + refine rather than render large")
        if slow:
            return f"~{est.step_s} s/it at {self.width}x{self.height} is slow; render {width}x{height} and refine"
        return f"{level.name} is {est.fit} at {width}x{height} ({est.need_gb} GB of {_gb(self.budget)} GB budget)"

    def _gpu_weights(self, level: WeightLevel, est: LevelEstimate, reserve: int, weights: int) -> Choice:
        total_mb = self.total // MIB
        if self.hardware.unified_memory:
            return Choice(None, "not used on Apple unified memory (no swapping between RAM and VRAM)", {})
        value = int(total_mb - reserve // MIB)
        numbers = {"total_mb": total_mb, "reserve_mb": reserve // MIB, "weights_mb": weights // MIB,
                   "free_at_load_mb": self.card_free // MIB, "resident_mb": int(est.resident_gb * 1024),
                   "offloaded_mb": int(est.offloaded_gb * 1024)}
        if est.offloaded_gb <= 0:
            reason = (f"Forge keeps total - GPU Weights = {reserve // MIB} MB for computation (activations + the "
                      f"largest dequantized layer, +10%); {weights // MIB} MB of weights + that reserve fit in the "
                      f"{self.card_free // MIB} MB free, so nothing is swapped")
        else:
            reason = (f"keeps {reserve // MIB} MB for computation; {weights // MIB} MB of weights + reserve exceed the "
                      f"{self.card_free // MIB} MB free, so Forge keeps ~{numbers['resident_mb']} MB resident and "
                      f"streams ~{numbers['offloaded_mb']} MB per step (lower it if you see OOM)")
        return Choice(value, reason, numbers)

    def _swap(self, est: LevelEstimate, level: WeightLevel, width: int, height: int,
              t5: str) -> tuple[Choice, Choice]:
        if est.offloaded_gb <= 0:
            return (Choice("Queue", "nothing is swapped, so the default is fine", {}),
                    Choice("CPU", "nothing is swapped, so the default is fine", {}))
        ram_total = self.hardware.ram_total or 0
        offloaded = int(est.offloaded_gb * GIB)
        # pinned memory cannot be paged out: the offloaded weights are held twice while Forge pins them
        pinned_ok = ram_total == 0 or self.ram_steady(offloaded, t5) + offloaded <= ram_total * RAM_COMFORT
        pinned = self.pcie_bytes_per_second(True)
        pageable = self.pcie_bytes_per_second(False)
        numbers = {"offloaded_gb": est.offloaded_gb, "pinned_s": round(offloaded / pinned, 2),
                   "pageable_s": round(offloaded / pageable, 2), "step_s_queue_cpu": est.step_s,
                   "step_s_async_shared": round(self.step_seconds(level, offloaded, width, height, True, True), 2)}
        method = Choice("Async", f"overlaps streaming {est.offloaded_gb} GB/step with compute (Queue waits for it): "
                                 f"~{numbers['step_s_async_shared']} s/it instead of {est.step_s}", numbers)
        if pinned_ok:
            location = Choice("Shared", f"pinned memory: {numbers['pinned_s']} s vs {numbers['pageable_s']} s per "
                                        "step to stream; switch to CPU if Forge crashes", numbers)
        else:
            location = Choice("CPU", "RAM is tight: pinned (Shared) memory cannot be paged out", numbers)
            method = Choice("Queue", "RAM is tight; Async needs an extra staging buffer", numbers)
        return method, location

    def _text_encoder(self, level: WeightLevel, est: LevelEstimate, width: int, height: int,
                      warnings: list[str]) -> Choice:
        ram_total = self.hardware.ram_total or 0
        offloaded = int(est.offloaded_gb * GIB)
        chosen = T5_OPTIONS[-1][0]

        def load_peak(option: str) -> int:
            return self.load_peak_bytes(level, self.weights(level) + self.te_bytes(option) + VAE_WEIGHT_BYTES)

        for option, _bits in T5_OPTIONS:   # best first: the first that fits in use and while loading
            if ram_total == 0 or (self.ram_steady(offloaded, option) <= ram_total * RAM_COMFORT
                                  and load_peak(option) <= ram_total):
                chosen = option
                break
        t5 = self.te_bytes(chosen)       # every text encoder of the family at that precision
        clip = CLIP_L_BYTES if "clip_l" in self.family.companions else 0
        beside = int(est.need_gb * GIB) + t5
        on_gpu = est.offloaded_gb <= 0 and beside <= self.budget
        placement = "VRAM" if on_gpu else "RAM"
        swap_s = round(t5 / self.pcie_bytes_per_second(False), 1)
        numbers = {"t5_gb": round((t5 - clip) / GB, 2), "clip_l_gb": round(clip / GB, 2),
                   "ram_steady_gb": _gb(self.ram_steady(offloaded, chosen)),
                   "ram_total_gb": _gb(ram_total) if ram_total else None, "vram_with_t5_gb": _gb(beside),
                   "ram_load_peak_gb": _gb(self.load_peak_bytes(level, self.weights(level) + t5
                                                                + VAE_WEIGHT_BYTES)),
                   "prompt_swap_s": swap_s}
        precision = ("fp16: RAM has room for the full-precision encoder" if chosen == "fp16" else
                     f"{chosen}: 16-bit text encoders ({self.te_bytes('fp16') / GB:.1f} GB) would push RAM past "
                     f"{RAM_COMFORT:.0%} of {_gb(ram_total)} GB in use or past all of it while loading (peak "
                     f"~{_gb(load_peak('fp16'))} GB)")
        where = ("stays on the GPU beside the transformer" if on_gpu else
                 f"kept in RAM; Forge moves it to the GPU for each new prompt (~{swap_s} s)")
        if ram_total and self.ram_steady(offloaded, chosen) > ram_total:
            warnings.append(f"even a {chosen} T5 leaves RAM short ({_gb(self.ram_steady(offloaded, chosen))} GB "
                            f"needed of {_gb(ram_total)} GB): expect swapping to disk")
        return Choice({"t5": chosen, "placement": placement, "clip_l": placement}, f"{precision}; {where}", numbers)

    def _vae(self, est: LevelEstimate, width: int, height: int) -> Choice:
        full = vae_decode_bytes(width, height)
        tiled = vae_decode_bytes(width, height, tiled=True)
        beside = int(est.resident_gb * GIB) + CONTEXT_BYTES + VAE_WEIGHT_BYTES + full
        numbers = {"decode_gb": _gb(full), "tiled_decode_gb": _gb(tiled), "with_transformer_gb": _gb(beside)}
        if beside <= self.total - self.desktop:
            return Choice("full", f"decoding {width}x{height} needs {_gb(full)} GB beside the resident transformer",
                          numbers)
        return Choice("tiled", f"a full decode ({_gb(full)} GB) does not fit beside the transformer; tiled needs "
                               f"{_gb(tiled)} GB (else Forge unloads the transformer for every decode)", numbers)

    def _refine_reason(self, small: bool, slow: bool, est: LevelEstimate) -> str:
        if small:
            return ("small card: render small with Flux, then upscale x2 and refine with SD1.5/SDXL img2img "
                    "(denoise ~0.3) for detail")
        if slow:
            return f"~{est.step_s} s/it at full size: a small Flux render + SD upscale is faster"
        return "the card renders full size directly; refine only if you want more than ~1 MP"

    def _general_warnings(self, level: WeightLevel, est: LevelEstimate, warnings: list[str], t5: str) -> None:
        hw = self.hardware
        if not level.lora_patch and not (self.fluxq_loading and level.kind == "gguf"):  # fluxq re-quantizes GGUF
            warnings.append(f"LoRA: Forge's default mode cannot re-quantize {level.name}; pick "
                            f"'Diffusion in Low Bits' = 'Automatic (fp16 LoRA)' or use Q8_0/Q5_0/Q4_0/NF4")
        file_bytes = self.weights(level)
        files = file_bytes + self.te_bytes(t5) + VAE_WEIGHT_BYTES
        if hw.ram_total and self.load_peak_bytes(level, files) > hw.ram_total:
            warnings.append(self._ram_peak_warning(level, files))
        if hw.disk_free is not None and hw.disk_free < file_bytes:
            warnings.append(f"only {_gb(hw.disk_free)} GB free in {hw.disk_path}; the {level.name} file needs "
                            f"{file_bytes / GB:.1f} GB")
        support = self.family.hosts.get(self.host)
        if support is not None and not support.runs:
            warnings.append(f"{HOST_TITLES.get(self.host, self.host)} does not run {self.family.title}"
                            + (f" ({support.note})" if support.note else ""))
        if hw.backend == "rocm":
            warnings.append("ROCm: GGUF works; NF4 needs a ROCm build of bitsandbytes that Forge does not install")
        if self.profile_assumed and self.profile is not None:
            which = f"'{hw.gpu_name}' is not in the speed table" if hw.gpu_name else "no card name given"
            warnings.append(f"{which}; speeds assume a {self.profile.name}-class card")

    # -- other families ---------------------------------------------------------------------------------------
    def best_plan(self) -> dict[str, Any]:
        """This family's best level on this machine at the planned size (or 512x768 when nothing fits larger), with
        the time per image at the family's default steps: one row of the cross-family comparison."""
        row: dict[str, Any] = {"family": self.model, "title": self.family.title, "steps": self.steps,
                               "runs_here": True, "level": None, "fit": "won't fit", "step_s": None, "image_s": None}
        support = self.family.hosts.get(self.host)
        if support is not None and not support.runs:
            row.update(runs_here=False, note=support.note)
        for width, height in ((self.width, self.height), (512, 768)):
            picked = self.pick({name: self.estimate(lv, width, height) for name, lv in LEVELS.items()})
            if picked is not None:
                level, est = picked
                row.update(level=level.name, fit=est.fit, step_s=est.step_s, width=width, height=height,
                           fidelity_bits=level.fidelity_bits, weights_gb=est.weights_gb,
                           image_s=None if est.step_s is None else round(est.step_s * self.steps, 1))
                break
        return row

    def _across_families(self, good: LevelEstimate | None) -> dict[str, Any]:
        """Every other family's best plan here, and — when this family runs poorly (``good`` is None) — the best of
        them: it runs on this host, resident (or near) at >= 4 bits, at the planned size, then the least time per
        image at its own default steps."""
        rows = []
        for family in distinct_families():
            other = self if family.key == self.model else Planner(
                self.hardware, self.width, self.height, self.batch, model=family.key, host=self.host,
                fluxq_loading=self.fluxq_loading)
            rows.append(other.best_plan())
        if good is not None:
            return {"families": rows}

        def rank(row: dict[str, Any]) -> tuple[Any, ...]:
            tier = {"resident": 0, "near-resident": 1, "offload": 2}.get(row["fit"], 9)
            full_size = (row.get("width"), row.get("height")) == (self.width, self.height)
            return (not row["runs_here"], tier, row.get("fidelity_bits", 0) < 4, not full_size,
                    row["image_s"] if row["image_s"] is not None else math.inf)

        twin = self.family.same_weights_as or self.model   # Kontext / Krea / Klein Base: the row of their weights
        others = [r for r in rows if r["family"] != twin and r["level"] is not None and r["runs_here"]]
        best = min(others, key=rank, default=None)
        if best is None or rank(best)[1] > 1:
            return {"families": rows}
        mine = next(r for r in rows if r["family"] == twin)
        mine_text = (f"{self.family.title} runs only at {mine['level']} ({mine['fit']}, ~{mine['image_s']} s per "
                     "image)" if mine["level"] else f"{self.family.title} does not fit")
        reason = (f"{mine_text} here; {best['title']} {best['level']} is {best['fit']} at {best['width']}x"
                  f"{best['height']}: ~{best['step_s']} s/it x {best['steps']} steps = ~{best['image_s']} s per image")
        return {"families": rows, "alternative": Choice(best["family"], reason, dict(best))}

    # -- special cases ---------------------------------------------------------------------------------------
    def _empty_choice(self, reason: str) -> Choice:
        return Choice(None, reason, {})

    def _nothing_fits(self, estimates: dict[str, LevelEstimate], files: Any) -> Advice:
        smallest = min((e for e in estimates.values() if e.fit != "unsupported"), key=lambda e: e.weights_gb)
        reserve = self.reserve_bytes(LEVELS[smallest.level], 512, 512)
        why = (f"won't fit: even {smallest.level} ({smallest.weights_gb} GB) leaves no usable room on a "
               f"{_gb(self.total)} GB card — Forge needs ~{_gb(reserve)} GB for computation at 512x512 plus "
               f"{_gb(CONTEXT_BYTES)} GB for CUDA, and streaming more than half the weights every step is slower "
               "than it is worth. Use a smaller family (see the comparison of families) or SD1.5/SDXL-class models "
               "on this card")
        heavy = [self.estimate(lv, 512, 512) for lv in LEVELS.values() if lv.candidate and lv.fidelity_bits >= 4]
        heavy = [e for e in heavy if e.fit == "heavy offload" and e.step_s is not None]
        if heavy:
            fastest = min(heavy, key=lambda e: e.step_s)
            why += (f". If you must: {fastest.level} at 512x512 streams {fastest.offloaded_gb} GB per step, "
                    f"~{fastest.step_s} s/it")
        return self._no_plan_advice(why, estimates, files, cpu_only=False)

    def _cpu_only_advice(self, files: Any) -> Advice:
        cores = self.hardware.cpu_cores or 1
        gflops = cores * CPU_GFLOPS_PER_CORE
        step_small = flux_step_flops(512, 512, 1, self.config) / (gflops * 1e9)
        step_full = flux_step_flops(1024, 1024, 1, self.config) / (gflops * 1e9)
        why = (f"no CUDA, ROCm or Apple GPU found. Flux on a CPU is impractical: one step is "
               f"{flux_step_flops(1024, 1024, 1, self.config) / 1e12:.0f} TFLOP at 1024x1024; {cores} core(s) at "
               f"~{gflops:.0f} "
               f"GFLOP/s take ~{step_full / 60:.0f} min per step (~{step_small / 60:.1f} min at 512x512). "
               "Alternatives: run this advice for the GPU you can rent or borrow (e.g. --vram 16 --gpu 'RTX 4060 Ti'),"
               " use a cloud GPU, or on this machine use SD1.5/SDXL-Turbo-class models")
        estimates = {}
        for name, lv in LEVELS.items():
            weights = self.weights(lv)
            ram = weights + self.te_bytes("fp8") + VAE_WEIGHT_BYTES + RAM_BASE_BYTES
            estimates[name] = LevelEstimate(name, lv.fidelity_bits, _gb(weights), _gb(weights), "unsupported"
                                            if self.supported(lv) else "cpu", 0, 0,
                                            round(step_full, 1), _gb(ram), self.supported(lv) or "CPU only")
        return self._no_plan_advice(why, estimates, files, cpu_only=True,
                                    numbers={"cpu_cores": cores, "cpu_gflops": gflops,
                                             "step_min_1024": round(step_full / 60, 1),
                                             "step_min_512": round(step_small / 60, 1)})

    def _no_plan_advice(self, why: str, estimates: dict[str, LevelEstimate], files: Any, cpu_only: bool,
                        numbers: dict[str, Any] | None = None) -> Advice:
        hw = self.hardware
        none = self._empty_choice("no plan: see recommended.reason")
        return Advice(
            backend=hw.backend, gpu=hw.gpu_name, gpu_profile=self.profile.name if self.profile else None,
            profile_assumed=self.profile_assumed, vram_gb=_gb(self.total) if self.total else None,
            ram_gb=_gb(hw.ram_total) if hw.ram_total else None,
            disk_free_gb=None if hw.disk_free is None else _gb(hw.disk_free), model=self.model,
            width=self.width, height=self.height, steps=self.steps, budget_gb=_gb(self.budget) if self.total else None,
            cpu_only=cpu_only, summary=why.split(":")[0] if not cpu_only else "CPU only: Flux is impractical here",
            recommended=Choice(None, why, numbers or {}), faster=None, resolution=none, resolutions=[],
            gpu_weights_mb=none, swap_method=none, swap_location=none, text_encoder=none, vae=none,
            refine=Choice(True, "if you must: a small render on a borrowed GPU, refined with SD1.5 locally", {}),
            levels=list(estimates.values()),
            files=self.rank_files(files, self.width, self.height) if files is not None else [],
            warnings=[], hardware=hw.to_dict(), model_title=self.family.title,
            **(self._across_families(None) if hw.has_gpu and not self.unknown_card else {}))

    # -- user files -----------------------------------------------------------------------------------------
    def rank_files(self, files: Iterable[ModelFile | Sequence[Any]] | None, width: int | None = None,
                   height: int | None = None) -> list[FileVerdict]:
        """Judge model files given as (name, level, size_bytes, family): fits / offloads (est. s/it) / won't fit.

        Best first: fitting files by fidelity, then offloading ones by speed, then the rest.
        """
        width, height = width or self.width, height or self.height
        verdicts: list[tuple[tuple[Any, ...], FileVerdict]] = []
        for entry in files or []:
            item = entry if isinstance(entry, ModelFile) else ModelFile(*entry)
            verdict, key = self._judge(item, width, height)
            verdicts.append((key, verdict))
        return [v for _, v in sorted(verdicts, key=lambda kv: kv[0])]

    def _for_family(self, key: str) -> Planner:
        """This machine and plan for another family's file (its own geometry, steps and host support)."""
        if key == self.model:
            return self
        cache = self.__dict__.setdefault("_family_planners", {})
        if key not in cache:
            cache[key] = Planner(self.hardware, self.width, self.height, self.batch, model=key, host=self.host,
                                 fluxq_loading=self.fluxq_loading)
        return cache[key]

    def _judge(self, item: ModelFile, width: int, height: int) -> tuple[FileVerdict, tuple[Any, ...]]:
        size_gb = round(item.size_bytes / GB, 2)
        family = (item.family or "unknown").lower()
        if item.error is not None:
            return (FileVerdict(item.name, family, None, size_gb, "unreadable", None, item.error), (5, item.name))
        if family in COMPANIONS or family in ("t5xxl", "clip_l", "flux-ae", "vae"):
            where = f" (models/{COMPANIONS[family].folder})" if family in COMPANIONS else ""
            return (FileVerdict(item.name, family, item.level, size_gb, "component", None,
                                f"text encoder / VAE{where}: see text_encoder for which one the plan uses"),
                    (3, item.name))
        row = FAMILIES.get(family)
        if row is None or row.arch == "sd" or family.endswith("lora"):
            return (FileVerdict(item.name, family, item.level, size_gb, "skipped", None,
                                "not a Flux-family transformer"), (4, item.name))
        if row.geometry is None:
            return (FileVerdict(item.name, family, item.level, size_gb, "skipped", None,
                                f"{row.title}: {row.note or 'no geometry to plan with'}"), (4, item.name))
        if family != self.model:
            verdict, key = self._for_family(family)._judge(item, width, height)
            return verdict, key
        level = resolve_level(item.level)
        if level is None:
            return (FileVerdict(item.name, family, item.level, size_gb, "skipped", None,
                                f"unknown weight level '{item.level}'"), (4, item.name))
        weights = int(item.size_bytes)
        reason_extra = ""
        # the verdict is the card's; a host that does not run the family says so in the reason (the tab plans
        # without knowing its host, so the verdict itself must not depend on it)
        support = self.family.hosts.get(self.host)
        if support is not None and not support.runs:
            reason_extra += (f"; {HOST_TITLES.get(self.host, self.host)} does not run {self.family.title}"
                             + (f" ({support.note})" if support.note else ""))
        expected = self.weights(level)
        if weights > expected * 1.25:  # all-in-one checkpoint: text encoders and VAE ride along
            weights = expected
            reason_extra = f"; includes text encoders/VAE ({size_gb} GB file, ~{expected / GB:.1f} GB transformer)"
        if not self.hardware.has_gpu:
            return (FileVerdict(item.name, family, level.name, size_gb, "won't fit", None,
                                "no GPU: Flux on CPU is impractical" + reason_extra), (2, item.name))
        est = self.estimate(level, width, height, weight_bytes=weights)
        if not level.stock_forge and level.kind == "gguf":
            reason_extra += "; stock Forge cannot load IQ types"
        if est.fit in ("resident", "near-resident"):
            return (FileVerdict(item.name, family, level.name, size_gb, "fits", est.step_s,
                                f"{est.fit}: {est.note}{reason_extra}"), (0, -level.fidelity_bits, item.name))
        if est.fit in ("offload", "heavy offload"):
            return (FileVerdict(item.name, family, level.name, size_gb, "offloads", est.step_s,
                                f"{est.note}; ~{est.step_s} s/it{reason_extra}"), (1, est.step_s, item.name))
        return (FileVerdict(item.name, family, level.name, size_gb, "won't fit", None, est.note + reason_extra),
                (2, item.name))



@dataclass
class ModelFile:
    """What the advisor needs to know about a user's file (the inspector's report reduced to four facts)."""

    name: str
    level: str | None
    size_bytes: int
    family: str
    error: str | None = None          # why the inspector could not read it (the file is then listed last, unreadable)


def files_from_reports(reports: Iterable[Any]) -> list[ModelFile]:
    """Adapter from ``lib_fluxq.inspect`` FileReports (path, status, error, level, file_size, family).

    Files the inspector could not read are kept, with its reason, so a truncated download is listed as unreadable
    instead of vanishing from the ranking."""
    files = []
    for report in reports:
        name = os.path.basename(report.path)
        if getattr(report, "status", "ok") != "ok":
            reason = getattr(report, "error", None) or getattr(report, "status", "unreadable")
            files.append(ModelFile(name, None, int(getattr(report, "file_size", 0) or 0), "unreadable", reason))
            continue
        files.append(ModelFile(name, report.level, int(report.file_size), report.family))
    return files


def scan_models(models_dir: str) -> list[ModelFile]:
    """The user's files through the inspector (header reads only)."""
    if not os.path.isdir(models_dir):
        raise FluxqError(f"{models_dir}: not a folder (give the folder holding your .gguf/.safetensors files)")
    if not os.access(models_dir, os.R_OK | os.X_OK):
        raise FluxqError(f"{models_dir}: cannot read this folder (check its permissions)")
    try:
        os.listdir(models_dir)
    except OSError as exc:
        raise FluxqError(f"{models_dir}: cannot list this folder ({exc.strerror or exc})") from None
    try:
        from lib_fluxq.inspect import scan
    except ImportError as exc:
        raise FluxqError(f"--models needs lib_fluxq.inspect, which is not available in this install ({exc})") from None
    return files_from_reports(scan([models_dir]))


def advise(hardware: Hardware, width: int = 1024, height: int = 1024, model: str = "dev",
           files: Iterable[ModelFile | Sequence[Any]] | None = None, steps: int | None = None, host: str = "forge",
           fluxq_loading: bool = True) -> Advice:
    return Planner(hardware, width, height, model=model, steps=steps, host=host,
                   fluxq_loading=fluxq_loading).advise(files)


def transformer_vram_gb(level: str, model_bytes: float, width: int = 1024, height: int = 1024,
                        config: FluxConfig = FLUX_DEV) -> float:
    """VRAM to keep a transformer of ``model_bytes`` at ``level`` fully resident while sampling ``width``x``height``:
    weights + activations + the dequant scratch of the largest layer (fp16) + CUDA context, for the geometry
    ``config`` (any family's, from the family table). Card-independent; the Planner adds the per-card desktop share
    and headroom on top."""
    resolved = resolve_level(level)
    if resolved is None:
        raise FluxqError(f"unknown weight level '{level}'")
    dense = resolved.kind == "float" and resolved.name in ("BF16", "FP16") or resolved.kind == "svdq"
    scratch = 0 if dense else largest_layer_elements(config) * 2
    return _gb(model_bytes + activation_bytes(width, height, 1, config) + scratch + CONTEXT_BYTES)


def family_vram_gb(level: str, width: int = 1024, height: int = 1024) -> dict[str, float | None]:
    """``transformer_vram_gb`` for every distinct family of the table (family key -> GiB), its weights at ``level``
    from that family's geometry; None where the level cannot hold that family (SVDQuant: FLUX.1 only)."""
    resolved = resolve_level(level)
    if resolved is None:
        raise FluxqError(f"unknown weight level '{level}'")
    out: dict[str, float | None] = {}
    for family in distinct_families():
        fmt = FORMATS.get(resolved.format_key or "")
        if fmt is not None and fmt.archs and family.arch not in fmt.archs:
            out[family.key] = None
            continue
        out[family.key] = transformer_vram_gb(level, transformer_bytes(resolved, family.geometry), width, height,
                                              family.geometry)
    return out


def gpu_weights_mb_for_file(path: str, hardware: Hardware | None = None, width: int = 1024,
                            height: int = 1024) -> int | None:
    """Forge's "GPU Weights (MB)" for this very file (its level read from the header) on ``hardware``.

    None when the file is not a Flux-family transformer (a family table row with a geometry) whose level the advisor
    knows, or on Apple unified memory.
    """
    from lib_fluxq.inspect import inspect_file

    report = inspect_file(path)
    level = resolve_level(getattr(report, "level", None))
    row = FAMILIES.get(str(getattr(report, "family", "")))
    if getattr(report, "status", "ok") != "ok" or level is None or row is None or row.geometry is None:
        return None
    # the file's own family (FLUX.1, Chroma, FLUX.2): its geometry sets the weights and the compute reserve
    planner = Planner(hardware or detect(os.path.dirname(path) or "."), width, height, model=row.key)
    if not planner.hardware.has_gpu:
        return None
    estimate = planner.estimate(level, width, height)
    choice = planner._gpu_weights(level, estimate, planner.reserve_bytes(level, width, height),
                                  planner.weights(level))
    return choice.value


def gpu_weights_mb_for_loaded_model(sd_model: Any) -> int | None:
    """The Forge hook's entry point: GPU Weights for the checkpoint ``sd_model`` was loaded from (duck-typed)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    path = getattr(info, "filename", None)
    return gpu_weights_mb_for_file(path) if path else None

