"""What the advisor knows about the model itself: weight levels (storage formats) and the bytes, parameters and
FLOPs they imply for a transformer of a given geometry, plus the text encoders' sizes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lib_fluxq.advisor.calibration import (
    ACT_BYTES_PER_TOKEN,
    CLIP_L_BYTES,
    FORGE_ACTIVATION_FACTOR,
    NF4_ABSMAX_BITS,
    NF4_BLOCKSIZE,
    SVDQ_FP4_GROUP,
    SVDQ_INT4_GROUP,
    SVDQ_RANK,
    TEXT_TOKENS,
    VAE_DECODE_BYTES_PER_PIXEL,
    VAE_TILE_PIXELS,
)
from lib_fluxq.errors import FluxqError
from lib_fluxq.families import COMPANIONS, FAMILIES, Family
from lib_fluxq.flux import FLUX_DEV, FluxConfig, flux_param_shapes, is_quantized_by_recipe

T = GGMLQuantizationType


# ------------------------------------------------------------------------------------------------- weight levels
@dataclass(frozen=True)
class WeightLevel:
    """One way to store the Flux transformer's weights. ``name`` is what users call the file."""

    name: str
    kind: str                         # "gguf" | "bnb" | "float" | "svdq" (Nunchaku W4A4)
    qtype: GGMLQuantizationType | None
    bits: float                       # bits per quantized weight, scales included
    fidelity_bits: float              # effective precision used to rank fidelity (== bits except FP8)
    dequant_bytes: float              # GPU memory traffic per weight per step to make it a matmul operand
    scope: str                        # "recipe" (city96: 2-D block weights) | "linear" (every 2-D weight) | "all"
    #                                   | "svdq" (Nunchaku's per-layer layout, svdq_transformer_bytes)
    lora_patch: bool                  # Forge's default LoRA mode can re-quantize it (FORGE_NOTES section 6)
    stock_forge: bool                 # stock Forge can load it
    tie_order: int                    # at equal fidelity: prefer lower (LoRA-patchable, cheaper dequant)
    candidate: bool = True            # offered as a recommendation (published files exist)
    format_key: str | None = None     # lib_fluxq.families.FORMATS row when the format limits hosts, archs or GPUs


# Block geometry from gguf-py's GGML_QUANT_SIZES, the vocabulary lib_fluxq.quant.FORMATS is built from: the kernel
# table itself imports torch, which a plan from headers and numbers never needs.
def _gguf_bits(qtype: GGMLQuantizationType) -> float:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block_size


def _packed_bytes(qtype: GGMLQuantizationType, n_elements: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return n_elements // block_size * type_size


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
    # Nunchaku SVDQuant W4A4 (Forge Neo only): 4-bit weights *and* activations, a 16-bit rank-32 branch per layer.
    # Ranked as 4 bits (activations are 4-bit too, so not above the 4.5-bit weight-only levels); sized per layer by
    # svdq_transformer_bytes; no per-step dequant (fused kernels); Neo composes LoRAs into the low-rank branch.
    WeightLevel("SVDQ_INT4", "svdq", None, 4 + 16 / SVDQ_INT4_GROUP, 4.0, 0.0, "svdq", True, False, 4,
                format_key="svdq-int4"),
    WeightLevel("SVDQ_FP4", "svdq", None, 4 + 8 / SVDQ_FP4_GROUP, 4.0, 0.0, "svdq", True, False, 4,
                format_key="svdq-fp4"),
]}


def resolve_level(text: str | None) -> WeightLevel | None:
    """A level from what a user or the inspector calls it: 'Q4_K_S', 'q8_0', 'NF4 v2', 'FP8 e4m3fn', 'F16', ..."""
    if not text:
        return None
    t = text.strip().upper().replace(" ", "_").replace("-", "_")
    if t in LEVELS:
        return LEVELS[t]
    if t.startswith("SVDQ"):   # the inspector's "SVDQuant INT4 (Nunchaku)" / "SVDQuant NVFP4 (Nunchaku)"
        return LEVELS["SVDQ_FP4" if "FP4" in t else "SVDQ_INT4"]
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


def _svdq_layers(name: str, shape: tuple[int, ...], config: FluxConfig) -> list[tuple[str, int, int]] | None:
    """How Nunchaku stores one BFL weight: [(kind, out, in)] with kind "w4a4" (attention / MLP linears; a single
    block's fused linear1 / linear2 become qkv + mlp_fc1 / out_proj + mlp_fc2) or "awq" (the AdaNorm modulation
    linears, W4A16); None for tensors kept 16-bit (embedders, final layer, norms, biases). nunchaku FluxModel.cpp."""
    if len(shape) != 2 or not name.startswith(("double_blocks.", "single_blocks.")):
        return None
    out, inp = shape
    if "mod" in name:
        return [("awq", out, inp)]
    if name.endswith("linear1.weight"):
        return [("w4a4", 3 * config.hidden, inp), ("w4a4", out - 3 * config.hidden, inp)]
    if name.endswith("linear2.weight"):
        return [("w4a4", out, config.hidden), ("w4a4", out, inp - config.hidden)]
    return [("w4a4", out, inp)]


def svdq_transformer_bytes(fp4: bool, config: FluxConfig = FLUX_DEV, rank: int = SVDQ_RANK) -> int:
    """Bytes of a Nunchaku SVDQuant file (nunchaku src/Linear.cpp): W4A4 layers hold qweight (4 bits per weight),
    wscales per group (bf16 per 64 for INT4, fp8 per 16 for FP4), smooth [in] and the rank-``rank`` lora_down /
    lora_up in bf16 (FP4 adds wcscales [out] bf16 and one f32 wtscale); AWQ layers hold 4-bit qweight with bf16
    wscales and wzeros per 64; everything else bf16 (biases included)."""
    total = 0
    for name, shape in flux_param_shapes(config).items():
        layers = _svdq_layers(name, shape, config)
        if layers is None:
            total += math.prod(shape) * 2
            continue
        for kind, out, inp in layers:
            total += out * inp // 2
            if kind == "awq":
                total += 2 * (inp // SVDQ_INT4_GROUP) * out * 2
                continue
            group, scale_bytes = (SVDQ_FP4_GROUP, 1) if fp4 else (SVDQ_INT4_GROUP, 2)
            total += (inp // group) * out * scale_bytes + inp * 2 + (inp + out) * rank * 2
            if fp4:
                total += out * 2 + 4
    return total


def transformer_bytes(level: WeightLevel, config: FluxConfig = FLUX_DEV) -> int:
    """Resident bytes of the Flux transformer stored at ``level`` (see module doc for which tensors are quantized)."""
    if level.scope == "svdq":
        return svdq_transformer_bytes(level.name == "SVDQ_FP4", config)
    total = 0.0
    for name, shape in flux_param_shapes(config).items():
        n = math.prod(shape)
        if level.scope == "all":
            total += n * level.bits / 8
        elif level.scope == "recipe" and is_quantized_by_recipe(name, shape):
            total += _packed_bytes(level.qtype, n)
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
    block_size = GGML_QUANT_SIZES[level.qtype][0]
    total = 0
    for name, shape in flux_param_shapes(config).items():
        n = math.prod(shape)
        if len(shape) == 2 and not name.startswith("img_in") and shape[1] % block_size == 0:
            total += _packed_bytes(level.qtype, n)
        else:
            total += n * (2 if len(shape) == 2 else 4)
    return total


def quantized_parameters(level: WeightLevel, config: FluxConfig = FLUX_DEV) -> int:
    """Parameters that need dequantizing every step at ``level``."""
    count = 0
    for name, shape in flux_param_shapes(config).items():
        if level.scope == "svdq" and _svdq_layers(name, shape, config) is not None or \
                level.scope == "recipe" and is_quantized_by_recipe(name, shape) or \
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


# ------------------------------------------------------------------------------------------------ FLOPs, sizes
def image_tokens(width: int, height: int) -> int:
    return (height // 16) * (width // 16)


def per_token_matmul_parameters(config: FluxConfig = FLUX_DEV) -> int:
    """Weights one token passes through in one step: one stream of each double block and every single block. The
    modulation layers act on one vector per sample (FLUX.1's per block, FLUX.2's model-wide) and are left out."""
    total = 0
    for name, shape in flux_param_shapes(config).items():
        if len(shape) != 2 or "mod" in name or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        total += math.prod(shape) // (2 if name.startswith("double_blocks.") else 1)
    return total


def flux_step_flops_parts(width: int, height: int, batch: int = 1, config: FluxConfig = FLUX_DEV,
                          text_tokens: int = TEXT_TOKENS) -> tuple[float, float]:
    """(linear, attention) FLOPs of one transformer evaluation: 2 x tokens x the per-token matmul weights, and
    4 x tokens^2 x width per block. Split because 4-bit-activation kernels (SVDQuant) speed up the first only."""
    tokens = image_tokens(width, height) + text_tokens
    linear = 2 * tokens * per_token_matmul_parameters(config)
    attention = 4 * tokens * tokens * config.hidden * (config.depth + config.depth_single)
    return float(batch * linear), float(batch * attention)


def flux_step_flops(width: int, height: int, batch: int = 1, config: FluxConfig = FLUX_DEV,
                    text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one transformer evaluation of any Flux-family geometry (FLUX.1, Chroma, FLUX.2)."""
    return sum(flux_step_flops_parts(width, height, batch, config, text_tokens))


def forge_activation_bytes(width: int, height: int, batch: int = 1, dtype_size: int = 2) -> int:
    """Forge's Flux inference-memory estimate (FORGE_NOTES section 5)."""
    return int(FORGE_ACTIVATION_FACTOR * 2 * batch * (height / 8) * (width / 8) * dtype_size * 16384)


def activation_bytes(width: int, height: int, batch: int = 1, config: FluxConfig = FLUX_DEV) -> int:
    """Forge's FLUX.1 estimate (or one block's working set), scaled by the model's width for other geometries: the
    live tensors per token grow with the hidden size (an estimate: no published peak for FLUX.2 / Chroma in Forge)."""
    physical = batch * (image_tokens(width, height) + TEXT_TOKENS) * ACT_BYTES_PER_TOKEN
    return int(max(forge_activation_bytes(width, height, batch), physical) * config.hidden / FLUX_DEV.hidden)


def vae_decode_bytes(width: int, height: int, tiled: bool = False) -> int:
    pixels = min(width * height, VAE_TILE_PIXELS) if tiled else width * height
    return int(pixels * VAE_DECODE_BYTES_PER_PIXEL)



def _full_precision_bytes(part_key: str) -> int:
    """A text encoder's 16-bit size from the family table's published downloads (bf16 / fp16 file)."""
    downloads = [d for d in COMPANIONS[part_key].downloads if d.precision in ("bf16", "fp16")]
    if not downloads:
        raise KeyError(f"no 16-bit download listed for {part_key}")
    return int(max(d.size_gb for d in downloads) * 1e9)


def text_encoder_bytes(companions: tuple[str, ...], option: str) -> int:
    """Bytes of a family's text encoders at ``option`` (a T5_OPTIONS name: 16-bit, fp8 or a GGUF level). T5-XXL is
    sized from its geometry (above); Qwen3 / Mistral from their published 16-bit files x bits / 16; CLIP-L stays 16-bit.
    """
    total = 0
    for key in companions:
        if COMPANIONS[key].kind != "text_encoder":
            continue
        if key == "clip_l":
            total += CLIP_L_BYTES
        elif key == "t5xxl":
            total += t5_bytes(option)
        else:
            total += int(_full_precision_bytes(key) * dict(T5_OPTIONS)[option] / 16)
    return total


# The names ``--model`` accepted before the family table, and short names people type.
MODEL_ALIASES = {"dev": "flux-dev", "schnell": "flux-schnell", "kontext": "flux-kontext", "krea": "flux-krea",
                 "fill": "flux-fill", "klein-4b": "flux2-klein-4b", "klein-9b": "flux2-klein-9b"}


def planned_families() -> list[Family]:
    """Every family the advisor can plan for: the family table's rows with a transformer geometry."""
    return [f for f in FAMILIES.values() if f.geometry is not None]


def distinct_families() -> list[Family]:
    """One row per distinct transformer: Kontext / Krea / Klein Base share their twin's weights, so the twin's row
    stands for them in cross-family tables (the advisor's comparison, compare's VRAM per family)."""
    return [f for f in planned_families() if f.same_weights_as is None]


def resolve_family(name: str) -> Family:
    key = MODEL_ALIASES.get(name.strip().lower(), name.strip().lower())
    family = FAMILIES.get(key)
    if family is None or family.geometry is None:
        known = ", ".join(f.key for f in planned_families())
        raise FluxqError(f"unknown model '{name}': use one of {known} (or dev / schnell)")
    return family
