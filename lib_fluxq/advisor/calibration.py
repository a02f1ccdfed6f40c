"""The advisor's memory and speed models and every constant they use (one place, each with its source).

Memory model (bytes, per generation at height H x width W, batch B)
  * Every figure is for the planned family's geometry (lib_fluxq.families row -> lib_fluxq.flux shapes); the FLUX.1
    dev sizes quoted below are examples.
  * weights(level)  = sum over the Flux transformer's tensors (lib_fluxq.flux shapes) of elements x bits / 8, where
    the quantized tensors follow the published city96 recipe (2-D block weights at the level's bits per weight, from
    lib_fluxq.quant.FORMATS; other 2-D weights F16; 1-D F32). NF4 (bitsandbytes, every Linear weight): 4 bits + one
    fp32 absmax per 64 weights = 4.5 bits. FP8: 8 bits for every 2-D weight. BF16/FP16: 16 bits. SVDQuant (Nunchaku,
    FLUX.1 in Forge Neo only): its per-layer layout (model.svdq_transformer_bytes).
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
  * RAM: steady = offloaded weights + text encoders + VAE + 3 GiB (OS + WebUI). Loading peaks at a measured multiple
    of the files loaded (transformer + text encoders + VAE) that depends on the host, on whether fluxq's loading is
    active and on whether the host "bakes" the GGUF type (``RAM_PEAKS`` below, each with its measurement).

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

from dataclasses import dataclass

from lib_fluxq.hardware import GIB

MIB = 1024 ** 2
GB = 1e9

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
# Nunchaku SVDQuant layout (nunchaku src/Linear.cpp GEMM_W4A4; quantization_config "group_size" 64 / 16, "r32" files)
SVDQ_INT4_GROUP = 64
SVDQ_FP4_GROUP = 16
SVDQ_RANK = 32
# How much faster Nunchaku's fused W4A4 kernels run the linear layers than the card's bf16 tensor rate (attention
# stays 16-bit). Calibrated on the one published ratio: "3.0x speedups over the NF4 W4A16 baseline on both the
# desktop and laptop NVIDIA RTX 4090" (nunchaku README, stored copy @1ecaa4e; SVDQuant paper, arXiv 2411.05007):
# the value that makes this model's NF4 / SVDQ_INT4 step ratio 3.0 on an RTX 4090 at 1024x1024 (tests check it).
# FP4 on RTX 50 is given the same factor (no published ratio found).
SVDQ_LINEAR_SPEEDUP = 5.4

RESOLUTION_PRESETS: list[tuple[int, int]] = [
    (1024, 1024), (896, 1152), (832, 1216), (768, 1344), (768, 1024), (768, 768), (512, 768), (512, 512)]



# ---------------------------------------------------------------------------------------- RAM while a model loads
# Peak RSS of the WebUI process from the request to the end of the first image, divided by the bytes of the files
# loaded (Flux transformer GGUF + T5 + CLIP-L + VAE). Measured in real WebUIs, CPU-only, on full-size random
# FLUX.1-dev GGUFs with a city96-style T5-XXL GGUF, clip_l and ae, one small txt2img. The factor is unit-free.
# Re-measure a Forge row (it prints peak_rss_gb and peak_over_files for Forge alone and with fluxq, one run each):
#   flock /tmp/fluxq-bigmem.lock env FORGE_DIR=/tmp/forge FLUXQ_FORGE_Q4_DATA=/tmp/fluxq-models/forge_q4_0 \
#     .venv-test/bin/python -m pytest -q -s tests/test_forge_real.py -k baked_q4_0
# Update a row here when a new measurement lands; nothing else in the advisor holds a RAM factor.
# "baked": GGUF types whose class defines ``bake_inner`` in Forge's gguf copy (packages_3rdparty/gguf/quants.py:
# Q4_0, Q4_1, Q8_0, Q4_K): Forge copies every weight of these into anonymous memory at the first placement.
BAKED_GGUF_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K_S"})


@dataclass(frozen=True)
class RamPeak:
    factor: float       # peak RSS / bytes of the files loaded
    source: str         # the measurement: what, figures, where, when (or, when not measured, what the figure is)
    measured: bool = True   # measured for exactly this host, loading and storage
    basis: str = "measured"  # how the warning names the figure when it is not a measurement of this very case


# Forge dfdcbab6, 2026-11-30, this project's 2-core / 24 GB CPU-only machine, the command above: FLUX.1-dev Q4_0
# 6.80 GB + T5-XXL Q4_0 2.68 GB + clip_l 0.25 GB + ae 0.34 GB = 10.06 GB (9.37 GiB); peak RSS 16.18 GiB for Forge
# alone, 11.39 GiB with fluxq (report: /tmp/fluxq-models/forge_q4_0/report_q4_0.json, figures in GiB).
_FORGE_Q4_FILES_GIB = 9.37
# (host, loading, storage) -> RamPeak. host: "forge" | "neo"; loading: "fluxq" (installed, memory-mapped GGUF,
# no double residency at bake) | "host" (the WebUI alone); storage: "baked" | "mapped" (GGUF types never baked).
RAM_PEAKS: dict[tuple[str, str, str], RamPeak] = {
    ("forge", "fluxq", "baked"): RamPeak(round(11.39 / _FORGE_Q4_FILES_GIB, 2),
                                         "fluxq in Forge dfdcbab6, Q4_0 + T5/CLIP/VAE: 11.4 GiB peak for 9.37 GiB of "
                                         "files (tests/test_forge_real.py -k baked_q4_0, 2026-11-30)"),
    ("forge", "host", "baked"): RamPeak(round(16.18 / _FORGE_Q4_FILES_GIB, 2),
                                        "Forge dfdcbab6 alone, Q4_0 + T5/CLIP/VAE: 16.2 GiB peak for 9.37 GiB of "
                                        "files (same run)"),
    ("forge", "fluxq", "mapped"): RamPeak(1.26, "fluxq in Forge, Q5_1 + modules + LoRA: 14.8 GB peak for 11.8 GB of "
                                                "files (issue 16, when it was filed)"),
    ("forge", "host", "mapped"): RamPeak(1.81, "Forge alone, Q5_1 + modules + LoRA: 21.3 GB peak for 11.8 GB of files "
                                               "(issue 16)"),
    ("neo", "host", "baked"): RamPeak(1.91, "Neo alone, Q4_0 + modules: 18.2 GB peak for 9.55 GB of files "
                                            "(NEO_NOTES section 2, real Neo 2.26)"),
    ("neo", "host", "mapped"): RamPeak(1.42, "Neo alone, Q5_1 + modules: 16.7 GB peak for 11.8 GB of files "
                                             "(real Neo 2.26, 2026-11-30)"),
    # Neo memory-maps GGUFs itself: with fluxq the mapped types load as in Neo alone, and the baked types are given
    # Neo alone's measured figure (an upper bound) until fluxq's own loading is measured inside Neo.
    ("neo", "fluxq", "mapped"): RamPeak(1.42, "Neo alone's figure: Neo maps GGUFs itself (16.7 GB for 11.8 GB of "
                                              "files)", measured=False,
                                        basis="Neo alone's measured figure; fluxq in Neo not measured"),
    ("neo", "fluxq", "baked"): RamPeak(1.91, "Neo alone's figure (18.2 GB for 9.55 GB of files): fluxq's loading in "
                                             "Neo is not measured yet", measured=False,
                                       basis="Neo alone's measured figure; fluxq in Neo not measured"),
}
# Non-GGUF checkpoints (safetensors BF16 / FP8 / NF4 / SVDQuant) are read by the WebUI's loader with or without fluxq.
SAFETENSORS_RAM_PEAK = RamPeak(2.0, "safetensors through the WebUI's loader: the file is read into RAM, then copied "
                                    "into the model once (two copies at the peak); not measured here", measured=False,
                               basis="an estimate for safetensors files, not measured")
HOSTS = ("forge", "neo")
