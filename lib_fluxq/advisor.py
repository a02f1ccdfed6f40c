"""``python -m lib_fluxq advise``: from this machine's VRAM and RAM to a quant level, a resolution, Forge's
"GPU Weights (MB)" value and a text-encoder plan — with the reason and the numbers behind every choice.

The answer comes from two small models, both documented here and in README.md:

Memory model (bytes, per generation at height H x width W, batch B)
  * weights(level)  = sum over the Flux transformer's tensors (lib_fluxq.flux shapes) of elements x bits / 8, where
    the quantized tensors follow the published city96 recipe (2-D block weights at the level's bits per weight, from
    lib_fluxq.quant.FORMATS; other 2-D weights F16; 1-D F32). NF4 (bitsandbytes, every Linear weight): 4 bits + one
    fp32 absmax per 64 weights = 4.5 bits. FP8: 8 bits for every 2-D weight. BF16/FP16: 16 bits.
  * activations     = Forge's own estimate 1.28 x 2B x (H/8) x (W/8) x 2 bytes x 16384 (about 1.28 GiB at 1024^2),
    or the physical working set of one block — tokens x 96 KiB with tokens = H/16 x W/16 + 512 text tokens — if
    larger (only for tiny images).
  * dequant scratch = the largest quantized layer (single_blocks.*.linear1, 21504 x 3072) materialised in the compute
    dtype at once (0.12 GiB in bf16).
  * CUDA context    = 0.375 GiB (context, cuBLAS workspace, allocator slack).
  * need(level)     = weights + activations + scratch + context. A level is *resident* when need <= budget, where
    budget = total VRAM x (1 - 15%) - memory other programs hold beyond a 0.5 GiB desktop allowance. The 15% headroom
    (desktop, browser, a LoRA, allocator fragmentation) is the one calibrated constant: it is what makes the
    community table (24 GB -> Q8_0, 16 GB -> Q6_K, 12 GB -> Q5_1 using ~10 GB) come out; tests check it.
  * VAE decode      = 2 KiB per output pixel un-tiled (the decoder's full-resolution stages hold ~4 maps of 256
    channels in bf16), or that of one 512^2 tile when tiled; VAE weights 0.16 GiB.
  * text encoders   = T5-XXL encoder (4.76 B parameters: fp16 9.5 GB, fp8 4.9 GB, GGUF levels at their bits) and
    CLIP-L 0.25 GB, in VRAM only when they fit beside the resident transformer, else in RAM.
  * Forge's "GPU Weights (MB)" = total - reserve: Forge keeps ``reserve`` free for computation. When free VRAM -
    weights - reserve < 0 it offloads: resident share = max((free - reserve) / 1.3, free - reserve - 1.25 GiB) and the
    rest of the (still quantized) weights cross PCIe every step (FORGE_NOTES section 5).
  * RAM: steady = offloaded weights + text encoders + VAE + 3 GiB (OS + WebUI); loading a checkpoint in Forge peaks at
    2.63 x the file size (measured, FORGE_NOTES section 10).

Speed model (seconds per sampling step)
  * compute  = FLOPs of one Flux step / (card's dense fp16/bf16 tensor TFLOP/s with fp32 accumulation x 0.6).
    FLOPs = 2 x tokens x (per-token matmul parameters) + 4 x tokens^2 x 3072 x 57 blocks (attention).
  * dequant  = quantized parameters x bytes of GPU memory traffic per weight to turn it into a matmul operand
    (torch GGUF dequant: ~23 B for Q8_0, ~30 for legacy 4/5-bit, ~40 for K-quants; NF4's fused bnb kernel ~3;
    FP8 upcast ~3; BF16 0) / the card's memory bandwidth.
  * offload  = non-resident bytes / PCIe (pinned "Shared" memory at 80% of the link, pageable "CPU" at 50%); "Async"
    overlaps it with compute. Offloaded FP8 is upcast by the CPU before the copy (torch converts on the source
    device) at ~1 GB/s and crosses PCIe as fp16 — the reason FP8 is so slow on small cards.
  * a cold first image adds reading the files from disk at 0.5 GB/s (SATA SSD).

All constants below are named; every figure shown is computed from them, never looked up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gguf import GGMLQuantizationType

from lib_fluxq.errors import FluxqError
from lib_fluxq.flux import FLUX_DEV, FLUX_SCHNELL, FluxConfig, flux_param_shapes, is_quantized_by_recipe
from lib_fluxq.hardware import GIB, Hardware, detect, with_overrides
from lib_fluxq.quant.table import FORMATS

MIB = 1024 ** 2
GB = 1e9
T = GGMLQuantizationType

# ---------------------------------------------------------------------------------------------------- constants
HEADROOM = 0.15                    # share of VRAM kept free beyond the modelled peak (calibrated, see module doc)
CONTEXT_BYTES = int(0.375 * GIB)   # CUDA context + cuBLAS workspace + allocator slack
DESKTOP_BYTES = int(0.3 * GIB)     # what a display/desktop typically holds on a consumer card (0 on datacenter cards)
DESKTOP_ALLOWANCE = int(0.5 * GIB)  # memory other programs may hold before it is subtracted from the budget
TEXT_TOKENS = 512                  # T5 sequence length Flux uses (dev; schnell uses 256 but Forge pads to 512)
ACT_BYTES_PER_TOKEN = 2 * (21504 + 15360 + 4 * 3072)  # bf16 live tensors of one single block per token (~96 KiB)
FORGE_ACTIVATION_FACTOR = 1.28     # backend Flux memory estimate: 1.28 x 2B x H/8 x W/8 x dtype x 16384
VAE_DECODE_BYTES_PER_PIXEL = 2048  # un-tiled decode peak per output pixel (bf16)
VAE_TILE_PIXELS = 512 * 512
VAE_WEIGHT_BYTES = int(0.16 * GIB)
VAE_DECODE_FLOPS_PER_PIXEL = 4.8e6
CLIP_L_BYTES = int(0.25 * GB)
RAM_BASE_BYTES = 3 * GIB           # OS + Python + WebUI
RAM_COMFORT = 0.85                 # share of RAM a plan may use in steady state
FORGE_LOAD_PEAK_FACTOR = 2.63      # peak RSS while Forge loads a GGUF / file size (measured, FORGE_NOTES section 10)
FORGE_SWAP_FACTOR = 1.3            # compute_model_gpu_memory_when_using_cpu_swap
FORGE_SWAP_MARGIN = 1.25 * GIB
MAX_OFFLOAD_SHARE = 0.5            # beyond this share streamed per step, a level is "too slow to recommend"
MATMUL_EFFICIENCY = 0.6            # achieved share of peak tensor throughput on Flux-sized GEMMs
PINNED_PCIE_EFFICIENCY = 0.8
PAGEABLE_PCIE_EFFICIENCY = 0.5
CPU_FP8_CAST_GBPS = 1.0            # fp8 -> fp16 on the CPU; measured 0.29 GB/s on a shared 2-core box, ~1 on 6-8 cores
CPU_GFLOPS_PER_CORE = 50.0         # sustained fp32 GEMM per core (AVX2 FMA at ~3 GHz, half of peak)
DISK_GBPS = 0.5                    # SATA SSD sequential read
SLOW_STEP_SECONDS = 15.0           # above this at the target size, suggest a small render + refine
SMALL_CARD_BYTES = int(7.5 * GIB)  # below this, plan small renders + refine (the 6 GB advice)
NF4_BLOCKSIZE = 64                 # bitsandbytes blocksize used by the Flux NF4 checkpoints (v2: fp32 absmax)
NF4_ABSMAX_BITS = 32
PCIE_GBPS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}

RESOLUTION_PRESETS: list[tuple[int, int]] = [
    (1024, 1024), (896, 1152), (832, 1216), (768, 1344), (768, 1024), (768, 768), (512, 768), (512, 512)]


# ------------------------------------------------------------------------------------------------- weight levels
@dataclass(frozen=True)
class WeightLevel:
    """One way to store the Flux transformer's weights. ``name`` is what users call the file."""

    name: str
    kind: str                         # "gguf" | "bnb" | "float"
    qtype: GGMLQuantizationType | None
    bits: float                       # bits per quantized weight, scales included
    fidelity_bits: float              # effective precision used to rank fidelity (== bits except FP8)
    dequant_bytes: float              # GPU memory traffic per weight per step to make it a matmul operand
    scope: str                        # "recipe" (city96: 2-D block weights) | "linear" (every 2-D weight) | "all"
    lora_patch: bool                  # Forge's default LoRA mode can re-quantize it (FORGE_NOTES section 6)
    stock_forge: bool                 # stock Forge can load it
    tie_order: int                    # at equal fidelity: prefer lower (LoRA-patchable, cheaper dequant)
    candidate: bool = True            # offered as a recommendation (published files exist)


def _gguf_bits(qtype: GGMLQuantizationType) -> float:
    return FORMATS[qtype].bits_per_weight


NF4_BITS = 4 + NF4_ABSMAX_BITS / NF4_BLOCKSIZE  # 4.5

# Dequant traffic per weight (bytes): torch GGUF dequant runs several unfused element-wise passes in fp32 before
# the cast; K-quants add the sub-block scale unpacking. Order-of-magnitude constants, see module doc.
_DQ_Q8, _DQ_LEGACY, _DQ_K, _DQ_IQ, _DQ_NF4, _DQ_FP8 = 23.0, 30.0, 40.0, 35.0, 3.0, 3.0

LEVELS: dict[str, WeightLevel] = {lv.name: lv for lv in [
    WeightLevel("BF16", "float", T.BF16, 16, 16, 0, "all", True, True, 0),
    WeightLevel("FP16", "float", T.F16, 16, 16, 0, "all", True, True, 1, candidate=False),
    WeightLevel("F32", "float", T.F32, 32, 32, 0, "all", True, True, 2, candidate=False),
    WeightLevel("Q8_0", "gguf", T.Q8_0, _gguf_bits(T.Q8_0), _gguf_bits(T.Q8_0), _DQ_Q8, "recipe", True, True, 0),
    WeightLevel("Q6_K", "gguf", T.Q6_K, _gguf_bits(T.Q6_K), _gguf_bits(T.Q6_K), _DQ_K, "recipe", False, True, 2),
    # FP8 e4m3fn: 3 mantissa bits and no per-block scale: on Gaussian weights its error sits between Q5 and Q6.
    WeightLevel("FP8", "float", None, 8, 6.0, _DQ_FP8, "linear", False, True, 3),
    WeightLevel("Q5_1", "gguf", T.Q5_1, _gguf_bits(T.Q5_1), _gguf_bits(T.Q5_1), _DQ_LEGACY, "recipe", False, True, 1),
    WeightLevel("Q5_K_S", "gguf", T.Q5_K, _gguf_bits(T.Q5_K), _gguf_bits(T.Q5_K), _DQ_K, "recipe", False, True, 2),
    WeightLevel("Q5_0", "gguf", T.Q5_0, _gguf_bits(T.Q5_0), _gguf_bits(T.Q5_0), _DQ_LEGACY, "recipe", True, True, 0),
    WeightLevel("Q4_1", "gguf", T.Q4_1, _gguf_bits(T.Q4_1), _gguf_bits(T.Q4_1), _DQ_LEGACY, "recipe", False, True, 1),
    WeightLevel("Q4_0", "gguf", T.Q4_0, _gguf_bits(T.Q4_0), _gguf_bits(T.Q4_0), _DQ_LEGACY, "recipe", True, True, 0),
    WeightLevel("NF4", "bnb", None, NF4_BITS, NF4_BITS, _DQ_NF4, "linear", True, True, 1),
    WeightLevel("Q4_K_S", "gguf", T.Q4_K, _gguf_bits(T.Q4_K), _gguf_bits(T.Q4_K), _DQ_K, "recipe", False, True, 2),
    WeightLevel("IQ4_XS", "gguf", T.IQ4_XS, _gguf_bits(T.IQ4_XS), _gguf_bits(T.IQ4_XS), _DQ_IQ, "recipe", False,
                False, 3, candidate=False),
    WeightLevel("IQ4_NL", "gguf", T.IQ4_NL, _gguf_bits(T.IQ4_NL), _gguf_bits(T.IQ4_NL), _DQ_IQ, "recipe", False,
                False, 3, candidate=False),
    WeightLevel("Q3_K_S", "gguf", T.Q3_K, _gguf_bits(T.Q3_K), _gguf_bits(T.Q3_K), _DQ_K, "recipe", False, True, 2),
    WeightLevel("Q2_K", "gguf", T.Q2_K, _gguf_bits(T.Q2_K), _gguf_bits(T.Q2_K), _DQ_K, "recipe", False, True, 2),
]}


def resolve_level(text: str | None) -> WeightLevel | None:
    """A level from what a user or the inspector calls it: 'Q4_K_S', 'q8_0', 'NF4 v2', 'FP8 e4m3fn', 'F16', ..."""
    if not text:
        return None
    t = text.strip().upper().replace(" ", "_").replace("-", "_")
    if t in LEVELS:
        return LEVELS[t]
    if t.startswith(("NF4", "BNB_NF4", "FP4", "BNB_FP4")):
        return LEVELS["NF4"]
    if t.startswith(("FP8", "F8", "FLOAT8")):
        return LEVELS["FP8"]
    for prefix, name in (("BF16", "BF16"), ("FP16", "FP16"), ("F16", "FP16"), ("FP32", "F32"), ("F32", "F32")):
        if t.startswith(prefix):
            return LEVELS[name]
    match = re.search(r"IQ4_(XS|NL)|Q(\d)_K(?:_[SML])?|Q(\d)_(\d)", t)
    if match is None:
        return None
    if match.group(1):
        return LEVELS[f"IQ4_{match.group(1)}"]
    if match.group(2):  # K-quant: the _S/_M/_L mixes are sized by their main type
        return LEVELS.get(f"Q{match.group(2)}_K_S") or LEVELS.get(f"Q{match.group(2)}_K")
    return LEVELS.get(f"Q{match.group(3)}_{match.group(4)}")


def _is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight")


def transformer_bytes(level: WeightLevel, config: FluxConfig = FLUX_DEV) -> int:
    """Resident bytes of the Flux transformer stored at ``level`` (see module doc for which tensors are quantized)."""
    total = 0.0
    for name, shape in flux_param_shapes(config).items():
        n = math.prod(shape)
        if level.scope == "all":
            total += n * level.bits / 8
        elif level.scope == "recipe" and is_quantized_by_recipe(name, shape):
            total += FORMATS[level.qtype].packed_bytes(n)
        elif level.scope == "linear" and _is_linear_weight(name, shape):
            total += n * level.bits / 8
        else:
            total += n * (2 if len(shape) == 2 else 4)
    return int(total)


def sdcpp_params_bytes(level: WeightLevel, config: FluxConfig = FLUX_DEV) -> int:
    """What stable-diffusion.cpp's log reports as the diffusion model's parameter memory for ``--type level``.

    sd.cpp converts every weight whose row length is a multiple of the block size except ``img_in`` (its
    ``tensor_should_be_converted``); the rest stay BF16 as in flux1-dev.sft, and biases/norm scales are F32.
    """
    fmt = FORMATS[level.qtype]
    total = 0
    for name, shape in flux_param_shapes(config).items():
        n = math.prod(shape)
        if len(shape) == 2 and not name.startswith("img_in") and shape[1] % fmt.block_size == 0:
            total += fmt.packed_bytes(n)
        else:
            total += n * (2 if len(shape) == 2 else 4)
    return total


def quantized_parameters(level: WeightLevel, config: FluxConfig = FLUX_DEV) -> int:
    """Parameters that need dequantizing every step at ``level``."""
    count = 0
    for name, shape in flux_param_shapes(config).items():
        if level.scope == "recipe" and is_quantized_by_recipe(name, shape) or \
                level.scope in ("linear", "all") and _is_linear_weight(name, shape):
            count += math.prod(shape)
    return count


def largest_layer_elements(config: FluxConfig = FLUX_DEV) -> int:
    return max(math.prod(s) for n, s in flux_param_shapes(config).items() if _is_linear_weight(n, s))


# T5-XXL encoder (google/t5-v1_1-xxl as shipped for Flux): 24 layers, d_model 4096, d_ff 10240 (gated GELU).
T5_LAYERS, T5_D_MODEL, T5_D_FF, T5_VOCAB = 24, 4096, 10240, 32128
T5_MATRIX_PARAMS = T5_LAYERS * (4 * T5_D_MODEL ** 2 + 3 * T5_D_MODEL * T5_D_FF)
T5_OTHER_PARAMS = T5_VOCAB * T5_D_MODEL + T5_LAYERS * 2 * T5_D_MODEL + T5_D_MODEL + 32 * 64

# T5 options best first: (name, bits per matrix weight); non-matrix parameters stay 16-bit (8-bit for fp8 files).
T5_OPTIONS: list[tuple[str, float]] = [
    ("fp16", 16.0), ("fp8", 8.0), ("Q8_0", _gguf_bits(T.Q8_0)), ("Q5_K_M", _gguf_bits(T.Q5_K)),
    ("Q4_K_M", _gguf_bits(T.Q4_K))]


def t5_bytes(option: str) -> int:
    bits = dict(T5_OPTIONS)[option]
    other_bits = 8.0 if option == "fp8" else 16.0
    return int(T5_MATRIX_PARAMS * bits / 8 + T5_OTHER_PARAMS * other_bits / 8)


# ------------------------------------------------------------------------------------------------------ GPUs
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

    @property
    def pcie_gbps(self) -> float:
        return PCIE_GBPS_PER_LANE.get(self.pcie_gen, 0.985) * self.pcie_lanes


GPU_PROFILES: list[GpuProfile] = [
    GpuProfile("GTX 1060 3GB", ("gtx10603gb",), 3, 3.9, 192, 3, 16, False, False),
    GpuProfile("GTX 1060 6GB", ("gtx1060",), 6, 4.4, 192, 3, 16, False, False),
    GpuProfile("GTX 1080", ("gtx1080",), 8, 8.9, 320, 3, 16, False, False),
    GpuProfile("RTX 2060", ("rtx2060",), 6, 25.8, 336, 3, 16, False, False),
    GpuProfile("RTX 3060", ("rtx3060",), 12, 25.5, 360, 4, 16, True, False),
    GpuProfile("RTX 3070 Ti Laptop", ("rtx3070tilaptop",), 8, 35.0, 448, 4, 16, True, False),
    GpuProfile("RTX 3090", ("rtx3090",), 24, 71.0, 936, 4, 16, True, False),
    GpuProfile("RTX 4060", ("rtx4060",), 8, 30.2, 272, 4, 8, True, True),
    GpuProfile("RTX 4060 Ti 16GB", ("rtx4060ti16gb", "rtx4060ti"), 16, 44.2, 288, 4, 8, True, True),
    GpuProfile("RTX 4070", ("rtx4070",), 12, 58.3, 504, 4, 16, True, True),
    GpuProfile("RTX 4080", ("rtx4080",), 16, 97.5, 717, 4, 16, True, True),
    GpuProfile("RTX 4090", ("rtx4090",), 24, 165.2, 1008, 4, 16, True, True),
    GpuProfile("RTX 5090", ("rtx5090",), 32, 209.5, 1792, 5, 16, True, True),
    GpuProfile("A100 40GB", ("a10040gb", "a100pcie40gb", "a100sxm440gb"), 40, 312, 1555, 4, 16, True, False, True),
    GpuProfile("A100 80GB", ("a100",), 80, 312, 2039, 4, 16, True, False, True),
    GpuProfile("H100 PCIe", ("h100pcie",), 80, 756, 2000, 5, 16, True, True, True),
    GpuProfile("H100", ("h100",), 80, 989, 3350, 5, 16, True, True, True),
    GpuProfile("H200", ("h200",), 141, 989, 4800, 5, 16, True, True, True),
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


# ------------------------------------------------------------------------------------------------ FLOPs, sizes
def image_tokens(width: int, height: int) -> int:
    return (height // 16) * (width // 16)


def flux_step_flops(width: int, height: int, batch: int = 1, config: FluxConfig = FLUX_DEV,
                    text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one transformer evaluation. Modulation layers act on one vector per sample and are negligible."""
    h, m = config.hidden, config.mlp_hidden
    img, txt = image_tokens(width, height), text_tokens
    tokens = img + txt
    double_per_token = 4 * h * h + 2 * h * m              # qkv 3h^2 + proj h^2 + mlp 2hm, per stream
    single_per_token = (3 * h + m) * h + (h + m) * h      # linear1 + linear2
    linear = 2 * (config.depth * tokens * double_per_token + config.depth_single * tokens * single_per_token)
    attention = 4 * tokens * tokens * h * (config.depth + config.depth_single)
    return float(batch * (linear + attention))


def forge_activation_bytes(width: int, height: int, batch: int = 1, dtype_size: int = 2) -> int:
    """Forge's Flux inference-memory estimate (FORGE_NOTES section 5)."""
    return int(FORGE_ACTIVATION_FACTOR * 2 * batch * (height / 8) * (width / 8) * dtype_size * 16384)


def activation_bytes(width: int, height: int, batch: int = 1) -> int:
    physical = batch * (image_tokens(width, height) + TEXT_TOKENS) * ACT_BYTES_PER_TOKEN
    return max(forge_activation_bytes(width, height, batch), physical)


def vae_decode_bytes(width: int, height: int, tiled: bool = False) -> int:
    pixels = min(width * height, VAE_TILE_PIXELS) if tiled else width * height
    return int(pixels * VAE_DECODE_BYTES_PER_PIXEL)


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
    verdict: str              # "fits" | "offloads" | "won't fit" | "component" | "skipped"
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
                 model: str = "dev", steps: int | None = None) -> None:
        if width % 16 or height % 16 or not (256 <= width <= 4096 and 256 <= height <= 4096):
            raise FluxqError(f"size {width}x{height} is not a Flux size: use multiples of 16 between 256 and 4096")
        if model not in ("dev", "schnell"):
            raise FluxqError(f"unknown Flux variant '{model}': use dev or schnell")
        hardware = replace(hardware, sources=dict(hardware.sources), notes=list(hardware.notes))
        self.hardware = hardware
        self.width, self.height, self.batch = width, height, batch
        self.model = model
        self.config = FLUX_DEV if model == "dev" else FLUX_SCHNELL
        self.steps = steps if steps is not None else (20 if model == "dev" else 4)
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
        dtype_size = 2 if (self.profile is None or self.profile.tflops > 10 or self.profile.bf16) else 4
        return largest_layer_elements(self.config) * dtype_size

    def working_set(self, level: WeightLevel, width: int, height: int) -> int:
        return activation_bytes(width, height, self.batch) + self.scratch_bytes(level)

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
        return None

    def ram_steady(self, offloaded: int, t5: str = "fp16") -> int:
        return offloaded + t5_bytes(t5) + CLIP_L_BYTES + VAE_WEIGHT_BYTES + RAM_BASE_BYTES

    # -- speed ----------------------------------------------------------------------------------------------
    def compute_seconds(self, width: int, height: int) -> float:
        if self.profile is None:
            return math.inf
        return flux_step_flops(width, height, self.batch, self.config) / (self.profile.tflops * 1e12 *
                                                                           MATMUL_EFFICIENCY)

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
        gpu = self.compute_seconds(width, height) + self.dequant_seconds(level)
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
        total += t5_bytes(t5) / self.pcie_bytes_per_second(False)
        if self.profile is not None:
            total += width * height * VAE_DECODE_FLOPS_PER_PIXEL / (self.profile.tflops * 1e12 * MATMUL_EFFICIENCY)
        if cold:
            weights = file_bytes if file_bytes is not None else self.weights(level) + t5_bytes(t5)
            total += (weights + CLIP_L_BYTES + VAE_WEIGHT_BYTES) / (DISK_GBPS * GB)
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
                             + TEXT_TOKENS, "activations_gb": _gb(activation_bytes(width, height, self.batch))})
        gpu_weights = self._gpu_weights(level, est, reserve, weights)
        text_encoder = self._text_encoder(level, est, width, height, warnings)
        swap_method, swap_location = self._swap(est, level, width, height, text_encoder.value["t5"])
        vae = self._vae(est, width, height)
        refine = Choice(bool(small or slow), self._refine_reason(small, slow, est),
                        {"render": [width, height], "final": [width * 2, height * 2]} if (small or slow) else {})
        self._general_warnings(level, est, warnings)
        summary = (f"{level.name} at {width}x{height}, GPU Weights {gpu_weights.value} MB, "
                   f"T5 {text_encoder.value['t5']} in {text_encoder.value['placement']}"
                   + (", then refine" if refine.value else ""))
        return Advice(
            backend=hw.backend, gpu=hw.gpu_name, gpu_profile=self.profile.name if self.profile else None,
            profile_assumed=self.profile_assumed, vram_gb=_gb(self.total), ram_gb=_gb(hw.ram_total or 0) or None,
            disk_free_gb=None if hw.disk_free is None else _gb(hw.disk_free), model=f"flux-{self.model}",
            width=width, height=height, steps=self.steps, budget_gb=_gb(self.budget), cpu_only=False,
            summary=summary, recommended=recommended, faster=faster, resolution=resolution,
            resolutions=resolutions, gpu_weights_mb=gpu_weights, swap_method=swap_method,
            swap_location=swap_location, text_encoder=text_encoder, vae=vae, refine=refine,
            levels=[self.estimate(lv, width, height) for lv in LEVELS.values()],
            files=self.rank_files(files, width, height) if files is not None else [],
            warnings=warnings, hardware=hw.to_dict())

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
        why = "NF4's fused 4-bit matmul skips the per-step dequant" if best.level == "NF4" else \
            "less dequantization work" if best.offloaded_gb <= est.offloaded_gb else "less data to stream"
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
        for option, _bits in T5_OPTIONS:
            if ram_total == 0 or self.ram_steady(offloaded, option) <= ram_total * RAM_COMFORT:
                chosen = option
                break
        t5 = t5_bytes(chosen)
        beside = int(est.need_gb * GIB) + t5 + CLIP_L_BYTES
        on_gpu = est.offloaded_gb <= 0 and beside <= self.budget
        placement = "VRAM" if on_gpu else "RAM"
        swap_s = round((t5 + CLIP_L_BYTES) / self.pcie_bytes_per_second(False), 1)
        numbers = {"t5_gb": round(t5 / GB, 2), "clip_l_gb": round(CLIP_L_BYTES / GB, 2),
                   "ram_steady_gb": _gb(self.ram_steady(offloaded, chosen)),
                   "ram_total_gb": _gb(ram_total) if ram_total else None, "vram_with_t5_gb": _gb(beside),
                   "prompt_swap_s": swap_s}
        precision = ("fp16: RAM has room for the full-precision encoder" if chosen == "fp16" else
                     f"{chosen}: fp16 T5 ({t5_bytes('fp16') / GB:.1f} GB) would push RAM past "
                     f"{RAM_COMFORT:.0%} of {_gb(ram_total)} GB")
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

    def _general_warnings(self, level: WeightLevel, est: LevelEstimate, warnings: list[str]) -> None:
        hw = self.hardware
        if not level.lora_patch:
            warnings.append(f"LoRA: Forge's default mode cannot re-quantize {level.name}; pick "
                            f"'Diffusion in Low Bits' = 'Automatic (fp16 LoRA)' or use Q8_0/Q5_0/Q4_0/NF4")
        file_bytes = self.weights(level)
        if hw.ram_total and FORGE_LOAD_PEAK_FACTOR * file_bytes + RAM_BASE_BYTES > hw.ram_total:
            warnings.append(f"loading a {file_bytes / GB:.1f} GB file in Forge peaks at "
                            f"~{FORGE_LOAD_PEAK_FACTOR * file_bytes / GB:.0f} GB of RAM (2.63x, measured): the first "
                            "load will use the page file")
        if hw.disk_free is not None and hw.disk_free < file_bytes:
            warnings.append(f"only {_gb(hw.disk_free)} GB free in {hw.disk_path}; the {level.name} file needs "
                            f"{file_bytes / GB:.1f} GB")
        if hw.backend == "rocm":
            warnings.append("ROCm: GGUF works; NF4 needs a ROCm build of bitsandbytes that Forge does not install")
        if self.profile_assumed and self.profile is not None:
            which = f"'{hw.gpu_name}' is not in the speed table" if hw.gpu_name else "no card name given (--gpu)"
            warnings.append(f"{which}; speeds assume a {self.profile.name}-class card")

    # -- special cases ---------------------------------------------------------------------------------------
    def _empty_choice(self, reason: str) -> Choice:
        return Choice(None, reason, {})

    def _nothing_fits(self, estimates: dict[str, LevelEstimate], files: Any) -> Advice:
        smallest = min((e for e in estimates.values() if e.fit != "unsupported"), key=lambda e: e.weights_gb)
        reserve = self.reserve_bytes(LEVELS[smallest.level], 512, 512)
        why = (f"won't fit: even {smallest.level} ({smallest.weights_gb} GB) leaves no usable room on a "
               f"{_gb(self.total)} GB card — Forge needs ~{_gb(reserve)} GB for computation at 512x512 plus "
               f"{_gb(CONTEXT_BYTES)} GB for CUDA, and streaming more than half the weights every step is slower "
               "than it is worth. Use stable-diffusion.cpp (Q2_K needs 3.7 GB of parameters, no offload) or "
               "SD1.5/SDXL-class models on this card")
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
               f"{flux_step_flops(1024, 1024) / 1e12:.0f} TFLOP at 1024x1024; {cores} core(s) at ~{gflops:.0f} "
               f"GFLOP/s take ~{step_full / 60:.0f} min per step (~{step_small / 60:.1f} min at 512x512). "
               "Alternatives: run this advice for the GPU you can rent or borrow (e.g. --vram 16 --gpu 'RTX 4060 Ti'),"
               " use a cloud GPU, or on this machine use SD1.5/SDXL-Turbo-class models")
        estimates = {}
        for name, lv in LEVELS.items():
            weights = self.weights(lv)
            ram = weights + t5_bytes("fp8") + CLIP_L_BYTES + VAE_WEIGHT_BYTES + RAM_BASE_BYTES
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
            disk_free_gb=None if hw.disk_free is None else _gb(hw.disk_free), model=f"flux-{self.model}",
            width=self.width, height=self.height, steps=self.steps, budget_gb=_gb(self.budget) if self.total else None,
            cpu_only=cpu_only, summary=why.split(":")[0] if not cpu_only else "CPU only: Flux is impractical here",
            recommended=Choice(None, why, numbers or {}), faster=None, resolution=none, resolutions=[],
            gpu_weights_mb=none, swap_method=none, swap_location=none, text_encoder=none, vae=none,
            refine=Choice(True, "if you must: a small render on a borrowed GPU, refined with SD1.5 locally", {}),
            levels=list(estimates.values()),
            files=self.rank_files(files, self.width, self.height) if files is not None else [],
            warnings=[], hardware=hw.to_dict())

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

    def _judge(self, item: ModelFile, width: int, height: int) -> tuple[FileVerdict, tuple[Any, ...]]:
        size_gb = round(item.size_bytes / GB, 2)
        family = (item.family or "unknown").lower()
        if family in ("t5xxl", "clip_l", "flux-ae", "vae"):
            return (FileVerdict(item.name, family, item.level, size_gb, "component", None,
                                "text encoder / VAE: see text_encoder for where it goes"), (3, item.name))
        if not family.startswith("flux") or family.endswith("lora"):
            return (FileVerdict(item.name, family, item.level, size_gb, "skipped", None,
                                "not a Flux transformer"), (4, item.name))
        level = resolve_level(item.level)
        if level is None:
            return (FileVerdict(item.name, family, item.level, size_gb, "skipped", None,
                                f"unknown weight level '{item.level}'"), (4, item.name))
        weights = int(item.size_bytes)
        reason_extra = ""
        expected = self.weights(level)
        if weights > expected * 1.25:  # all-in-one checkpoint: text encoders and VAE ride along
            weights = expected
            reason_extra = f"; includes text encoders/VAE ({size_gb} GB file, ~{expected / GB:.1f} GB transformer)"
        if not self.hardware.has_gpu:
            return (FileVerdict(item.name, family, level.name, size_gb, "won't fit", None,
                                "no GPU: Flux on CPU is impractical" + reason_extra), (2, item.name))
        est = self.estimate(level, width, height, weight_bytes=weights)
        if not level.stock_forge:
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


def files_from_reports(reports: Iterable[Any]) -> list[ModelFile]:
    """Adapter from ``lib_fluxq.inspect`` FileReports (path, status, level, file_size, family)."""
    files = []
    for report in reports:
        if getattr(report, "status", "ok") != "ok":
            continue
        files.append(ModelFile(os.path.basename(report.path), report.level, int(report.file_size), report.family))
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
           files: Iterable[ModelFile | Sequence[Any]] | None = None, steps: int | None = None) -> Advice:
    return Planner(hardware, width, height, model=model, steps=steps).advise(files)


def transformer_vram_gb(level: str, model_bytes: float, width: int = 1024, height: int = 1024) -> float:
    """VRAM to keep a transformer of ``model_bytes`` at ``level`` fully resident while sampling ``width``x``height``:
    weights + activations + the dequant scratch of the largest layer (fp16) + CUDA context. Card-independent; the
    Planner adds the per-card desktop share and headroom on top."""
    resolved = resolve_level(level)
    if resolved is None:
        raise FluxqError(f"unknown weight level '{level}'")
    scratch = 0 if resolved.kind == "float" and resolved.name in ("BF16", "FP16") else largest_layer_elements() * 2
    return _gb(model_bytes + activation_bytes(width, height) + scratch + CONTEXT_BYTES)


def gpu_weights_mb_for_file(path: str, hardware: Hardware | None = None, width: int = 1024,
                            height: int = 1024) -> int | None:
    """Forge's "GPU Weights (MB)" for this very file (its level read from the header) on ``hardware``.

    None when the file is not a Flux transformer whose level the advisor knows, or on Apple unified memory.
    """
    from lib_fluxq.inspect import inspect_file

    report = inspect_file(path)
    level = resolve_level(getattr(report, "level", None))
    if getattr(report, "status", "ok") != "ok" or level is None or not str(report.family).startswith("flux"):
        return None
    planner = Planner(hardware or detect(os.path.dirname(path) or "."), width, height)
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


# -------------------------------------------------------------------------------------------------- rendering
def render_text(advice: Advice) -> str:
    lines: list[str] = []
    hw = advice.hardware
    gpu = advice.gpu or "no GPU"
    vram = f"{advice.vram_gb:g} GB" if advice.vram_gb else "-"
    lines.append(f"Machine: {advice.backend.upper()} · {gpu} · VRAM {vram} · "
                 f"RAM {advice.ram_gb or 0:g} GB" + (f" · {advice.disk_free_gb:g} GB free on disk"
                                                     if advice.disk_free_gb is not None else ""))
    if advice.profile_assumed and advice.gpu_profile:
        lines.append(f"  (speeds assume a {advice.gpu_profile}-class card)")
    for note in hw.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append("")
    if advice.recommended.value is None:
        lines.append(advice.recommended.reason)
    else:
        lines.append(f"Plan for FLUX.1-{advice.model.split('-')[-1]}: {advice.summary}")
        lines.append("")
        rows = [("Quant level", advice.recommended), ("Faster alternative", advice.faster),
                ("Resolution", advice.resolution), ("GPU Weights (MB)", advice.gpu_weights_mb),
                ("Swap method", advice.swap_method), ("Swap location", advice.swap_location),
                ("Text encoders", advice.text_encoder), ("VAE decode", advice.vae), ("Refine", advice.refine)]
        for label, choice in rows:
            if choice is None:
                lines.append(f"  {label:<19} none faster at similar fidelity")
                continue
            value = choice.value
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "x".join(str(v) for v in value)
            lines.append(f"  {label:<19} {value}")
            lines.append(f"  {'':<19} └ {choice.reason}")
    if advice.levels and not advice.cpu_only:
        lines.append("")
        lines.append(f"All levels at {advice.width}x{advice.height} (budget {advice.budget_gb} GB):")
        lines.append(f"  {'level':<8}{'weights':>9}{'needs':>8}  {'fit':<14}{'s/it':>7}")
        for e in advice.levels:
            if not LEVELS[e.level].candidate:
                continue
            step = "-" if e.step_s is None else f"{e.step_s:g}"
            lines.append(f"  {e.level:<8}{e.weights_gb:>8.2f}G{e.need_gb:>7.2f}G  {e.fit:<14}{step:>7}")
    if advice.files:
        lines.append("")
        lines.append("Your files:")
        for f in advice.files:
            step = f" ~{f.step_s:g} s/it" if f.step_s is not None else ""
            lines.append(f"  {f.verdict:<10} {f.name} ({f.level or '?'}, {f.size_gb:g} GB){step} — {f.reason}")
    for warning in advice.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT (e.g. 1024x1024)")
    return int(match.group(1)), int(match.group(2))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of GB") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vram", type=_number, metavar="GB", help="plan for a card with this much VRAM (GiB)")
    parser.add_argument("--ram", type=_number, metavar="GB", help="plan for this much system RAM (GiB)")
    parser.add_argument("--gpu", metavar="NAME", help="plan for this card, e.g. 'RTX 3060' (speed table lookup)")
    parser.add_argument("--models", metavar="DIR", help="also rank the model files in this folder")
    parser.add_argument("--size", type=_size, default=(1024, 1024), metavar="WxH",
                        help="target image size (default 1024x1024)")
    parser.add_argument("--model", choices=("dev", "schnell"), default="dev", help="Flux variant (default dev)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps for time per image")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")


def run(args: argparse.Namespace) -> int:
    models_dir = getattr(args, "models", None)
    if models_dir is not None and not os.path.isdir(models_dir):
        raise FluxqError(f"{models_dir}: no such folder (give the folder holding your .gguf/.safetensors files)")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise FluxqError(f"--steps {args.steps} is not plausible (use 1..1000)")
    hardware = with_overrides(detect(models_dir), vram_gb=args.vram, ram_gb=args.ram, gpu_name=args.gpu)
    files = scan_models(models_dir) if models_dir is not None else None
    width, height = args.size
    advice = advise(hardware, width, height, model=args.model, files=files, steps=args.steps)
    print(advice.to_json() if args.json else render_text(advice))
    return 0
