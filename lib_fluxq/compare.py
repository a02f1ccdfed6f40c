"""``python -m lib_fluxq compare``: what each quantization level costs in accuracy, measured on real Flux blocks.

A few double- and single-stream blocks are taken from a full-precision Flux transformer (or, with no file given, a
synthetic slice at Flux's real width), every 2-D block weight is quantized with each level and dequantized again, and
the same deterministic inputs go through the reference block and the quantized one. Per level the table shows bits
per weight, the projected size of the whole Flux-dev transformer, the weight error, the error of what the block adds
to the residual stream, and dequantization speed here.

Only the sampled blocks' tensors are read (safetensors ``safe_open`` / memory-mapped GGUF), never the whole model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from torch import nn

from lib_fluxq.errors import FluxqError, FormatError
from lib_fluxq.flux import (
    FLUX_DEV,
    FluxConfig,
    flux_param_shapes,
    is_quantized_by_recipe,
)
from lib_fluxq.flux_model import (
    ROPE_AXES_DIM,
    BlockInputs,
    DoubleStreamBlock,
    FluxConditioning,
    SingleStreamBlock,
    deterministic_inputs,
    image_token_grid,
)
from lib_fluxq.ops import swap_quantized_linears
from lib_fluxq.quant import FORMATS, dequantize, quantize, resolve_qtype

GB = 1e9  # published Flux file sizes are decimal gigabytes
_FLOAT_QTYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_FLOAT_SAFETENSORS_DTYPES = ("F32", "F16", "BF16")

# Defaults: a real file gets Forge's usual portrait size and T5's full 512 tokens; the embedded synthetic slice
# gets fewer tokens so the demo finishes in about a minute on two CPU cores.
FILE_DEFAULTS = {"blocks": 3, "res": "512x768", "text_tokens": 512}
SYNTHETIC_DEFAULTS = {"blocks": 1, "res": "256x256", "text_tokens": 64}


# ============================================================================================ levels


@dataclass(frozen=True)
class PackedWeight:
    """A GGUF-quantized weight in the shape ``swap_quantized_linears`` takes (like a mapped GGUF tensor)."""

    qtype: GGMLQuantizationType
    data: torch.Tensor
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype)


@dataclass(frozen=True)
class Level:
    """One quantization level: how to quantize a float32 weight, how many bytes that takes, how to get it back."""

    name: str
    family: str                                           # "gguf" | "nf4" | "fp8"
    description: str
    quantize: Callable[[torch.Tensor], Any]
    dequantize: Callable[[Any, tuple[int, ...]], torch.Tensor]
    packed_bytes: Callable[[Any], int]
    block_local: bool = True   # each 256-element chunk quantizes on its own (False: a per-tensor scale)


def _gguf_level(qtype: GGMLQuantizationType) -> Level:
    fmt = FORMATS[qtype]
    return Level(
        name=qtype.name, family="gguf", description=f"GGUF {qtype.name} ({fmt.bits_per_weight:g} bits/weight)",
        quantize=lambda w: quantize(w, qtype),
        dequantize=lambda packed, shape: dequantize(packed, qtype, shape),
        packed_bytes=lambda packed: packed.numel(),
    )


def _nf4_level() -> Level:
    """fluxq's NF4 (lib_fluxq.formats.nf4, byte-identical with bitsandbytes' quantize_4bit: tests/test_nf4.py)."""
    from lib_fluxq.formats.nf4 import dequantize_nf4, quantize_nf4

    return Level(
        name="NF4", family="nf4",
        description="bitsandbytes NF4, blocksize 64, float32 absmax (Forge's flux1-dev-bnb-nf4-v2 layout)",
        quantize=lambda w: quantize_nf4(w, blocksize=64),
        dequantize=lambda packed, shape: dequantize_nf4(packed.packed, packed.absmax, shape,
                                                        blocksize=packed.blocksize),
        packed_bytes=lambda packed: packed.packed.numel() + packed.absmax.numel() * packed.absmax.element_size(),
    )


FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def _fp8_level(scaled: bool) -> Level:
    """FP8 e4m3fn: Forge's flux1-dev-fp8 and ComfyUI's weight_dtype=fp8_e4m3fn are a plain cast; ComfyUI's
    "scaled fp8" checkpoints divide by a per-tensor scale amax/448 first and store that scale beside the weight."""
    def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12) if scaled else torch.tensor(1.0)
        # clamp first: values past ±448 would become NaN in e4m3fn, which has no infinity
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.float()

    return Level(
        name="FP8_SCALED" if scaled else "FP8", family="fp8",
        description=("float8_e4m3fn with per-tensor scale amax/448 (ComfyUI scaled fp8)" if scaled
                     else "float8_e4m3fn plain cast (Forge flux1-dev-fp8, ComfyUI fp8_e4m3fn weight dtype)"),
        quantize=fp8_quantize,
        dequantize=lambda packed, shape: packed[0].float().reshape(shape) * packed[1],
        packed_bytes=lambda packed: packed[0].numel() + (4 if scaled else 0),
        block_local=not scaled,
    )


def all_levels() -> dict[str, Level]:
    """Every level compare knows, largest first: GGUF types from the quant table (bar F32), NF4, FP8."""
    levels = {q.name: _gguf_level(q) for q in FORMATS if q != GGMLQuantizationType.F32}
    levels["NF4"] = _nf4_level()
    levels["FP8"] = _fp8_level(scaled=False)
    levels["FP8_SCALED"] = _fp8_level(scaled=True)
    return levels


_ALIASES = {"FP8_E4M3": "FP8", "FP8_E4M3FN": "FP8", "FP8_E4M3_SCALED": "FP8_SCALED", "BNB_NF4": "NF4"}


def select_levels(spec: str | None) -> list[Level]:
    """``"Q8_0,q4_k,nf4"`` -> levels; None/empty -> all. Unknown names raise FluxqError listing the known ones."""
    levels = all_levels()
    if not spec:
        return list(levels.values())
    chosen: list[Level] = []
    for raw in spec.split(","):
        name = raw.strip().upper()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in levels:
            raise FluxqError(f"unknown level '{raw.strip()}' in --levels; known: {', '.join(levels)}")
        if levels[name] not in chosen:
            chosen.append(levels[name])
    if not chosen:
        raise FluxqError("--levels is empty; give a comma-separated list such as Q8_0,Q4_K,NF4")
    return chosen


def unavailable_reason(level: Level) -> str | None:
    """Why a level cannot run here (its quantizer is not implemented yet, a library is missing), or None."""
    probe = torch.linspace(-1.0, 1.0, 512).reshape(2, 256)
    try:
        level.dequantize(level.quantize(probe), (2, 256))
    except (NotImplementedError, ImportError) as exc:
        return f"not available: {exc}"
    return None


# ============================================================================================ sources


@dataclass(frozen=True)
class SourceInfo:
    description: str
    synthetic: bool
    config: FluxConfig


class WeightSource:
    """Where block weights come from; subclasses read only the tensors of the blocks asked for."""

    info: SourceInfo

    def block_tensors(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        """float32 tensors of ``{kind}_blocks.{index}`` with names relative to the block."""
        raise NotImplementedError

    def chunked_block(self, kind: str, index: int) -> dict[str, torch.Tensor | ChunkedWeight]:
        """The block's tensors, 2-D weights possibly as :class:`ChunkedWeight` (only the synthetic source)."""
        return dict(self.block_tensors(kind, index))

    def conditioning(self) -> FluxConditioning | None:
        return None

    def close(self) -> None:
        pass


CHUNK = 256  # a K-quant superblock; a multiple of every level's block (32, 64, 256)


@dataclass(frozen=True)
class ChunkedWeight:
    """A weight built from a pool of 256-wide row chunks: ``dense == pool[index].reshape(rows, cols)``.

    Every level here quantizes each 256-element chunk on its own (blocks never cross a chunk), so quantizing the
    pool once and gathering gives exactly the quantization of the dense matrix — the synthetic demo measures a
    real-width block whose every weight is truly quantized, at the cost of quantizing a few thousand chunks.
    """

    pool: torch.Tensor    # (n_distinct, CHUNK) float32
    index: torch.Tensor   # (rows, cols // CHUNK) long

    def dense(self) -> torch.Tensor:
        return self.pool[self.index].reshape(self.index.shape[0], -1)


def _synthetic_pool(fan_in: int, n_chunks: int, gen: torch.Generator) -> torch.Tensor:
    """Chunks like trained transformer weights: N(0, 1/fan_in), a few heavy-tailed outlier columns (the same
    positions in every chunk, so they are columns of the matrix; log-normal gains ~4.5x, tails past 15x — the
    channels that make low-bit quantization hard), a ±30 % spread of chunk scales, rounded to BF16 like
    Flux-dev's release."""
    column_gain = torch.ones(CHUNK)
    outliers = torch.randperm(CHUNK, generator=gen)[:3]
    column_gain[outliers] = torch.exp(1.5 + 0.6 * torch.randn(3, generator=gen))
    pool = torch.randn(n_chunks, CHUNK, generator=gen) * column_gain * fan_in ** -0.5
    pool *= torch.exp(0.3 * torch.randn(n_chunks, 1, generator=gen))
    return pool.bfloat16().float()


class SyntheticSource(WeightSource):
    """Deterministic synthetic weights at Flux's real shapes (hidden 3072, MLP 12288, 24 heads by default).

    2-D weights are :class:`ChunkedWeight` s over one pool per (block, fan-in); ``pool_chunks`` distinct chunks
    each. 1-D tensors (biases, norm gains) are plain Gaussians around their usual values.
    """

    def __init__(self, config: FluxConfig = FLUX_DEV, seed: int = 0, pool_chunks: int = 2048) -> None:
        self.seed = seed
        self.pool_chunks = pool_chunks
        self.shapes = flux_param_shapes(config)
        self.info = SourceInfo(
            description=(f"SYNTHETIC weights at Flux-dev's real shapes (hidden {config.hidden}, MLP "
                         f"{config.mlp_hidden}, {config.heads} heads): Gaussian with heavy-tailed outlier columns"),
            synthetic=True, config=config)

    def chunked_block(self, kind: str, index: int) -> dict[str, torch.Tensor | ChunkedWeight]:
        prefix = f"{kind}_blocks.{index}."
        gen = torch.Generator().manual_seed(self.seed * 1000 + index * 2 + (kind == "single"))
        pools: dict[int, torch.Tensor] = {}
        tensors: dict[str, torch.Tensor | ChunkedWeight] = {}
        for name, shape in self.shapes.items():
            if not name.startswith(prefix):
                continue
            if name.endswith(".scale"):          # QK-RMSNorm gains
                tensors[name[len(prefix):]] = (1.0 + 0.2 * torch.randn(shape, generator=gen)).bfloat16().float()
            elif len(shape) == 1:                # biases
                tensors[name[len(prefix):]] = (0.02 * torch.randn(shape, generator=gen)).bfloat16().float()
            else:
                rows, cols = shape
                if cols not in pools:
                    pools[cols] = _synthetic_pool(cols, self.pool_chunks, gen)
                index_map = torch.randint(0, self.pool_chunks, (rows, cols // CHUNK), generator=gen)
                tensors[name[len(prefix):]] = ChunkedWeight(pools[cols], index_map)
        return tensors

    def block_tensors(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        return {name: t.dense() if isinstance(t, ChunkedWeight) else t
                for name, t in self.chunked_block(kind, index).items()}


_CONDITIONING_PREFIXES = ("time_in.", "vector_in.", "guidance_in.")
_FLOAT_STORAGE = ("F32", "F16", "BF16")


class FileSource(WeightSource):
    """A full-precision Flux transformer on disk, opened by the converter's reader (safetensors with BFL, ComfyUI,
    all-in-one or diffusers names; GGUF F16/BF16/F32): tensors are read lazily, block by block."""

    def __init__(self, path: str) -> None:
        from lib_fluxq.convert import AlreadyQuantizedError
        from lib_fluxq.convert import open_source as open_flux_source

        try:
            self._source = open_flux_source(path)
        except AlreadyQuantizedError as exc:
            raise FormatError(path, f"is already quantized ({exc.found}); compare needs full-precision weights as "
                                    "its reference", tensor=exc.tensor,
                              fix=_FULL_PRECISION_FIX) from None
        self.path = path
        try:
            self.tensors = self._source.tensors
            below_f16 = [t for n, t in self.tensors.items()
                         if n.startswith(("double_blocks.", "single_blocks.")) and t.dtype not in _FLOAT_STORAGE]
            if below_f16:
                raise FormatError(path, f"stores its block weights as {below_f16[0].dtype}, below F16; compare "
                                        "needs full-precision weights as its reference", tensor=below_f16[0].name,
                                  fix=_FULL_PRECISION_FIX)
            config = self._source.config
            head_dim = config.hidden // config.heads
            if head_dim != sum(ROPE_AXES_DIM):
                raise FormatError(path, f"head dim {head_dim}, FLUX.1 has {sum(ROPE_AXES_DIM)}",
                                  fix="only FLUX.1 dev/schnell transformers are supported")
        except BaseException:
            self._source.close()
            raise
        self.info = SourceInfo(description=f"{path} ({self._source.layout} layout, {config.depth} double + "
                                           f"{config.depth_single} single blocks, "
                                           f"{'dev' if config.guidance else 'schnell'}-style)",
                               synthetic=False, config=config)

    def block_tensors(self, kind: str, index: int) -> dict[str, torch.Tensor]:
        prefix = f"{kind}_blocks.{index}."
        return {name[len(prefix):]: t.load().float() for name, t in self.tensors.items() if name.startswith(prefix)}

    def conditioning(self) -> FluxConditioning | None:
        module = FluxConditioning(self.info.config)
        expected = set(module.state_dict())
        if not expected <= set(self.tensors):
            return None   # a transformer without its embedders: fall back to a synthetic vec
        module.load_state_dict({k: self.tensors[k].load().float() for k in expected})
        return module

    def close(self) -> None:
        self._source.close()


_FULL_PRECISION_FIX = ("run it on the F16/BF16/F32 transformer (e.g. flux1-dev.safetensors or a F16/BF16 GGUF); the "
                       "table then shows what each level would lose")


def open_source(path: str | None, seed: int = 0) -> WeightSource:
    """The synthetic slice (``path`` None) or a full-precision Flux transformer file."""
    return SyntheticSource(seed=seed) if path is None else FileSource(path)


def sample_blocks(depth: int, count: int, kind: str, path: str) -> list[int]:
    """``count`` block indices spread over ``depth``, each at the centre of its share (1 of 19 -> block 9)."""
    if count < 1:
        raise FluxqError(f"--blocks must be at least 1 (got {count})")
    if count > depth:
        raise FluxqError(f"{path}: has only {depth} {kind}-stream blocks, cannot sample {count}; use --blocks "
                         f"{depth} or fewer")
    return sorted({int((i + 0.5) * depth / count) for i in range(count)})


# ============================================================================================ measurement


@dataclass
class BlockResult:
    block: str
    update_rel_error: float    # ||Δq - Δref|| / ||Δref||, Δ = what the block adds to the residual stream
    update_cosine: float
    output_rel_error: float    # ||yq - yref|| / ||yref||, residual included


@dataclass
class LevelResult:
    level: str
    description: str
    available: bool
    reason: str | None = None
    bits_per_weight: float | None = None
    flux_dev_gb: float | None = None
    vram_gb: float | None = None
    weight_rel_rmse: float | None = None
    block_rel_error: float | None = None
    block_cosine: float | None = None
    output_rel_error: float | None = None
    dequant_melem_s: float | None = None
    quant_seconds: float | None = None
    per_block: list[BlockResult] = field(default_factory=list)
    # running sums over every weight of every sampled block
    _err_sq: float = 0.0
    _ref_sq: float = 0.0
    _bytes: int = 0
    _elements: int = 0
    _dequant_s: float = 0.0
    _dequant_elements: int = 0


def projected_flux_dev_bytes(bits_per_weight: float, config: FluxConfig = FLUX_DEV) -> float:
    """Whole Flux-dev transformer with the published recipe: 2-D block weights at ``bits_per_weight``, other 2-D
    tensors F16, 1-D tensors F32 (as city96's GGUFs store them)."""
    total = 0.0
    for name, shape in flux_param_shapes(config).items():
        n = math.prod(shape)
        if is_quantized_by_recipe(name, shape):
            total += n * bits_per_weight / 8
        else:
            total += n * (2 if len(shape) == 2 else 4)
    return total


# VRAM is quoted for Flux's native image size, whatever --res the error measurement uses.
VRAM_RESOLUTION = (1024, 1024)


def vram_estimate_gb(level: str, model_bytes: float, width: int = 1024, height: int = 1024) -> float | None:
    """The advisor's VRAM need to run this level fully resident at ``width``x``height`` (None for unknown levels)."""
    from lib_fluxq.advisor import transformer_vram_gb

    try:
        return transformer_vram_gb(level, model_bytes, width, height)
    except FluxqError:
        return None


def _block_update(kind: str, block: nn.Module, inputs: BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(update, output) of a block on ``inputs``, both flattened; update = output - input."""
    with torch.no_grad():
        if kind == "double":
            img, txt = block(inputs.img, inputs.txt, inputs.vec, inputs.pe)
            output = torch.cat((img.reshape(-1), txt.reshape(-1)))
            start = torch.cat((inputs.img.reshape(-1), inputs.txt.reshape(-1)))
        else:
            x = inputs.joint
            output = block(x, inputs.vec, inputs.pe).reshape(-1)
            start = x.reshape(-1)
    return output - start, output


def _build_block(kind: str, config: FluxConfig, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A block holding ``tensors`` themselves (built on the meta device, then assigned: no init, no copy)."""
    cls = DoubleStreamBlock if kind == "double" else SingleStreamBlock
    with torch.device("meta"):
        block = cls(config.hidden, config.heads, config.mlp_ratio)
    block.load_state_dict(tensors, strict=True, assign=True)
    return block.eval()


@dataclass
class _Quantized:
    module_weight: Any           # what the quantized block gets: PackedWeight (GGUF -> QuantLinear) or float tensor
    err_sq: float                # ||W_q - W||^2
    ref_sq: float                # ||W||^2
    n_bytes: int


def _sq_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) if t.numel() else 0.0


def _quantize_weight(level: Level, result: LevelResult, raw: torch.Tensor | ChunkedWeight, weight: torch.Tensor,
                     pool_cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]]) -> _Quantized:
    """Quantize one weight, through its chunk pool when it has one and the level is block-local."""
    shape = tuple(weight.shape)
    quantized_qtype = resolve_qtype(level.name) if level.family == "gguf" else None
    if quantized_qtype in _FLOAT_QTYPES:
        quantized_qtype = None   # F16/BF16 rows: a plain Linear holding the rounded weights
    if isinstance(raw, ChunkedWeight) and level.block_local:
        key = id(raw.pool)
        if key not in pool_cache:
            started = time.perf_counter()
            packed_pool = level.quantize(raw.pool)
            result.quant_seconds = (result.quant_seconds or 0.0) + time.perf_counter() - started
            restored_pool = _timed_dequantize(level, result, packed_pool, tuple(raw.pool.shape))
            pool_cache[key] = (packed_pool, restored_pool, restored_pool - raw.pool)
        packed_pool, restored_pool, error_pool = pool_cache[key]
        # errors per distinct chunk, weighted by how often each chunk occurs in this matrix
        counts = torch.bincount(raw.index.reshape(-1), minlength=raw.pool.shape[0]).double()
        err_sq = float((error_pool.double().square().sum(dim=1) * counts).sum())
        ref_sq = float((raw.pool.double().square().sum(dim=1) * counts).sum())
        n_bytes = level.packed_bytes(packed_pool) * weight.numel() // raw.pool.numel()
        if quantized_qtype is not None:   # the matrix's GGUF bytes are its chunks' bytes, row after row
            module_weight: Any = PackedWeight(quantized_qtype, packed_pool[raw.index].reshape(-1), shape)
        else:
            module_weight = restored_pool[raw.index].reshape(shape)
        return _Quantized(module_weight, err_sq, ref_sq, n_bytes)
    started = time.perf_counter()
    packed = level.quantize(weight)
    result.quant_seconds = (result.quant_seconds or 0.0) + time.perf_counter() - started
    restored = _timed_dequantize(level, result, packed, shape)
    module_weight = (PackedWeight(quantized_qtype, packed.reshape(-1), shape) if quantized_qtype is not None
                     else restored)
    return _Quantized(module_weight, _sq_norm(restored - weight), _sq_norm(weight), level.packed_bytes(packed))


def _timed_dequantize(level: Level, result: LevelResult, packed: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize, timing the fastest of a few runs when the input is small (call overhead would dominate)."""
    runs = 3 if math.prod(shape) < (1 << 22) else 1
    best = math.inf
    for _ in range(runs):
        started = time.perf_counter()
        restored = level.dequantize(packed, shape)
        best = min(best, time.perf_counter() - started)
    result._dequant_s += best
    result._dequant_elements += math.prod(shape)
    return restored


def measure_level_on_block(level: Level, result: LevelResult, kind: str, index: int, config: FluxConfig,
                           raw: dict[str, torch.Tensor | ChunkedWeight], tensors: dict[str, torch.Tensor],
                           inputs: BlockInputs, ref_update: torch.Tensor, ref_output: torch.Tensor) -> None:
    """Quantize every 2-D weight of one block with ``level``, accumulate weight statistics, run the block.

    ``tensors`` are the block's dense float32 tensors, ``raw`` the same as the source gave them (chunked or not).
    GGUF types run through the engine's QuantLinear (packed bytes, dequantized in every forward), installed by the
    same swap helper the loader uses; NF4 / FP8 / F16 / BF16 blocks hold their dequantized weights.
    """
    block_tensors = dict(tensors)
    packed_entries: dict[str, Any] = {}
    pool_cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for name, weight in tensors.items():
        if not (weight.dim() == 2 and name.endswith(".weight")):
            continue
        q = _quantize_weight(level, result, raw[name], weight, pool_cache)
        result._err_sq += q.err_sq
        result._ref_sq += q.ref_sq
        result._bytes += q.n_bytes
        result._elements += weight.numel()
        if isinstance(q.module_weight, PackedWeight):
            bias_name = name[:-len("weight")] + "bias"
            packed_entries[name] = q.module_weight
            if bias_name in tensors:
                packed_entries[bias_name] = tensors[bias_name]
        else:
            block_tensors[name] = q.module_weight
    del pool_cache
    # Linears about to be swapped keep the reference tensors meanwhile: swap replaces the modules, never writes them.
    quantized = _build_block(kind, config, block_tensors)
    if packed_entries:
        swap_quantized_linears(quantized, packed_entries, strict=False)
    update, output = _block_update(kind, quantized, inputs)
    result.per_block.append(BlockResult(
        block=f"{kind}_blocks.{index}",
        update_rel_error=float((update - ref_update).norm() / ref_update.norm()),
        update_cosine=float(torch.nn.functional.cosine_similarity(update.double(), ref_update.double(), dim=0)),
        output_rel_error=float((output - ref_output).norm() / ref_output.norm()),
    ))


def _finish(result: LevelResult) -> None:
    if not result.available or not result._elements:
        return
    result.bits_per_weight = 8.0 * result._bytes / result._elements
    model_bytes = projected_flux_dev_bytes(result.bits_per_weight)
    result.flux_dev_gb = model_bytes / GB
    result.vram_gb = vram_estimate_gb(result.level, model_bytes, *VRAM_RESOLUTION)
    result.weight_rel_rmse = math.sqrt(result._err_sq / result._ref_sq)
    n = len(result.per_block)
    result.block_rel_error = sum(b.update_rel_error for b in result.per_block) / n
    result.block_cosine = sum(b.update_cosine for b in result.per_block) / n
    result.output_rel_error = sum(b.output_rel_error for b in result.per_block) / n
    result.dequant_melem_s = result._dequant_elements / result._dequant_s / 1e6 if result._dequant_s else None


@dataclass
class Comparison:
    source: str
    synthetic: bool
    resolution: str
    image_tokens: int
    text_tokens: int
    double_blocks: list[int]
    single_blocks: list[int]
    levels: list[LevelResult]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        def level_json(r: LevelResult) -> dict[str, Any]:
            data = {k: v for k, v in asdict(r).items() if not k.startswith("_")}
            return data
        return {"source": self.source, "synthetic": self.synthetic, "resolution": self.resolution,
                "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                "double_blocks": self.double_blocks, "single_blocks": self.single_blocks,
                "seconds": round(self.seconds, 2), "levels": [level_json(r) for r in self.levels]}


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x768"`` (width x height, as the WebUI writes it) -> (width, height) on Flux's 16-pixel grid."""
    try:
        width, height = (int(part) for part in text.lower().replace("*", "x").split("x"))
        image_token_grid(height, width)
    except ValueError:
        raise FluxqError(f"--res '{text}': give WIDTHxHEIGHT in pixels, each a positive multiple of 16 "
                         f"(e.g. 512x768)") from None
    return width, height


def run_comparison(source: WeightSource, levels: Sequence[Level], blocks: int, width: int, height: int,
                   text_tokens: int, seed: int = 0, progress: bool = True) -> Comparison:
    """Measure every level on ``blocks`` double and ``blocks`` single blocks of ``source``."""
    started = time.perf_counter()
    config = source.info.config
    label = getattr(source, "path", "the synthetic slice")
    plan = [("double", i) for i in sample_blocks(config.depth, blocks, "double", label)]
    plan += [("single", i) for i in sample_blocks(config.depth_single, blocks, "single", label)]
    if text_tokens < 1:
        raise FluxqError(f"--text-tokens must be at least 1 (got {text_tokens})")

    results = [LevelResult(level=lv.name, description=lv.description, available=True) for lv in levels]
    runnable = []
    for level, result in zip(levels, results, strict=True):
        reason = unavailable_reason(level)
        if reason:
            result.available, result.reason = False, reason
        else:
            runnable.append((level, result))

    inputs = deterministic_inputs(config.hidden, height, width, text_tokens, seed=seed,
                                  conditioning=source.conditioning(), vec_in=config.vec_in)
    from tqdm import tqdm
    bar = tqdm(total=len(plan) * len(runnable), disable=not progress, unit="level", file=sys.stderr,
               desc="compare")
    try:
        for kind, index in plan:
            bar.set_postfix_str(f"loading {kind}_blocks.{index}")
            raw = source.chunked_block(kind, index)
            tensors = {name: t.dense() if isinstance(t, ChunkedWeight) else t for name, t in raw.items()}
            reference = _build_block(kind, config, tensors)
            ref_update, ref_output = _block_update(kind, reference, inputs)
            for level, result in runnable:
                bar.set_postfix_str(f"{kind}_blocks.{index} {level.name}")
                measure_level_on_block(level, result, kind, index, config, raw, tensors, inputs, ref_update,
                                       ref_output)
                bar.update(1)
            del raw, tensors, reference
    finally:
        bar.close()
    for result in results:
        _finish(result)
    rows, cols = image_token_grid(height, width)
    return Comparison(
        source=source.info.description, synthetic=source.info.synthetic, resolution=f"{width}x{height}",
        image_tokens=rows * cols, text_tokens=text_tokens,
        double_blocks=[i for k, i in plan if k == "double"], single_blocks=[i for k, i in plan if k == "single"],
        levels=sorted(results, key=lambda r: (not r.available, -(r.flux_dev_gb or 0.0))),
        seconds=time.perf_counter() - started)


# ============================================================================================ output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(comparison: Comparison) -> str:
    lines = []
    if comparison.synthetic:
        lines += ["NOTE: the weights are SYNTHETIC (no model file given). The ladder and the sizes are real; the "
                  "error values",
                  "      are those of Gaussian weights with outlier columns, not of trained Flux weights. For real",
                  "      figures run:  python -m lib_fluxq compare /path/to/flux1-dev.safetensors  (or a F16/BF16 "
                  "GGUF)", ""]
    lines.append(f"source: {comparison.source}")
    lines.append(f"blocks: double {comparison.double_blocks}, single {comparison.single_blocks}; inputs: "
                 f"{comparison.resolution} ({comparison.image_tokens} image tokens) + {comparison.text_tokens} text "
                 f"tokens, fixed seed")
    lines.append("")
    header = (f"{'level':<11} {'bits/w':>6} {'Flux-dev GB':>11} {'VRAM GiB':>8} {'weight rRMSE':>12} "
              f"{'block rel.err':>13} {'block cos':>9} {'dequant M/s':>11}")
    lines += [header, "-" * len(header)]
    for r in comparison.levels:
        if not r.available:
            lines.append(f"{r.level:<11} {r.reason}")
            continue
        lines.append(f"{r.level:<11} {_fmt(r.bits_per_weight, '6.3f')} {_fmt(r.flux_dev_gb, '11.2f')} "
                     f"{_fmt(r.vram_gb, '8.1f')} {_fmt(r.weight_rel_rmse, '12.3e')} "
                     f"{_fmt(r.block_rel_error, '13.3e')} {_fmt(r.block_cosine, '9.6f')} "
                     f"{_fmt(r.dequant_melem_s, '11.0f')}")
    lines += ["",
              "bits/w: measured packed bytes incl. scales. Flux-dev GB: whole 11.9 B-parameter transformer, block "
              "weights at this level,",
              "  the rest F16/F32 (city96 recipe). VRAM GiB: the advisor's need to sample 1024x1024 with the "
              "transformer fully resident",
              "  (weights + activations + dequant scratch + CUDA context). weight rRMSE: ||W_q - W|| / ||W|| over all",
              "  sampled block weights.",
              "  block rel.err / cos: error of what each block adds to the residual stream (output - input) vs the "
              "full-precision",
              "  block, mean over the sampled blocks. dequant M/s: million weights/s to float32 on this CPU "
              "(shared machine: noisy).",
              f"  {comparison.seconds:.0f} s in all."]
    return "\n".join(lines)


_FAMILY_COLOURS = {"gguf": "tab:blue", "nf4": "tab:red", "fp8": "tab:green"}
_PLOT_DPI = 110
_LABEL_POINTS = 9


def _place_labels(ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Label each point beside it; where labels would overlap (levels of equal size), step them up or down and
    draw a leader line, so every name stays readable. Works in screen pixels after the layout is fixed."""
    to_pixels = ax.transData.transform
    px_per_pt = _PLOT_DPI / 72
    height = _LABEL_POINTS * 1.35 * px_per_pt
    boxes: list[tuple[float, float, float, float]] = []
    dots = [tuple(to_pixels((x, y))) for _, x, y in points]
    for label, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = to_pixels((x, y))
        width = len(label) * _LABEL_POINTS * 0.62 * px_per_pt
        chosen = None
        for step in range(0, 16):
            for dy in ((0,) if step == 0 else (-step * height, step * height)):
                for dx in (6 * px_per_pt, -6 * px_per_pt - width):
                    box = (px + dx, px + dx + width, py + dy - height / 2, py + dy + height / 2)
                    clashes = any(box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3]
                                  for b in boxes)
                    covers_dot = any(box[0] - 6 < dx_ < box[1] + 6 and box[2] - 4 < dy_ < box[3] + 4
                                     for dx_, dy_ in dots)
                    if not clashes and not covers_dot:
                        chosen = (dx, dy, box)
                        break
                if chosen:
                    break
            if chosen:
                break
        if chosen is None:
            chosen = (6 * px_per_pt, 0.0, (px, px + width, py - height / 2, py + height / 2))
        dx, dy, box = chosen
        boxes.append(box)
        leader = {"arrowstyle": "-", "color": "0.5", "lw": 0.6} if dy else None
        ax.annotate(label, (x, y), xytext=(dx / px_per_pt, dy / px_per_pt), textcoords="offset points",
                    fontsize=_LABEL_POINTS, va="center", ha="left", arrowprops=leader)


def write_plot(comparison: Comparison, path: str) -> None:
    """PNG: block error and weight error against projected Flux-dev size, one labelled point per level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = {lv.name: lv.family for lv in all_levels().values()}
    # 16-bit levels sit orders of magnitude below the rest: drawing them would squash the quantized ones together.
    rows = [r for r in comparison.levels if r.available and r.block_rel_error and (r.bits_per_weight or 16) < 15]
    lossless = [r.level for r in comparison.levels if r.available and (r.bits_per_weight or 0) >= 15]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), dpi=_PLOT_DPI, constrained_layout=True)
    panels = ((axes[0], "block_rel_error", "block output error (relative, of the block's update)"),
              (axes[1], "weight_rel_rmse", "weight error (relative RMSE)"))
    for ax, key, ylabel in panels:
        for r in rows:
            colour = _FAMILY_COLOURS.get(families.get(r.level, "gguf"), "tab:gray")
            ax.scatter(r.flux_dev_gb, getattr(r, key), color=colour, s=36, zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("projected Flux-dev transformer size (GB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.12, y=0.12)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=f)
               for f, c in (("GGUF", "tab:blue"), ("bitsandbytes NF4", "tab:red"), ("FP8 e4m3fn", "tab:green"))]
    axes[0].legend(handles=handles, loc="upper right")
    if lossless:
        axes[1].text(0.99, 0.01, f"not drawn: {', '.join(lossless)} (error ~0, 23.8 GB)", transform=axes[1].transAxes,
                     ha="right", va="bottom", fontsize=8, color="0.35")
    title = (f"Flux quantization levels: error vs size — blocks double {comparison.double_blocks}, single "
             f"{comparison.single_blocks}, {comparison.resolution}")
    if comparison.synthetic:
        title += "\nSYNTHETIC weights (no model file given): run `python -m lib_fluxq compare FLUX.safetensors` " \
                 "for trained weights"
    fig.suptitle(title, fontsize=11)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout so the label positions computed in pixels stay valid
    for ax, key, _ in panels:
        _place_labels(ax, [(r.level, r.flux_dev_gb, getattr(r, key)) for r in rows])
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # write beside the target, then rename: an interrupted run never leaves a half-written PNG
    handle, temp = tempfile.mkstemp(suffix=".png", dir=target.parent)
    os.close(handle)
    try:
        fig.savefig(temp, dpi=_PLOT_DPI)
        os.replace(temp, target)
    finally:
        plt.close(fig)
        if os.path.exists(temp):
            os.remove(temp)


# ============================================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", default=None,
                        help="full-precision Flux transformer (.safetensors with BFL names, optionally prefixed "
                             "model.diffusion_model., or a F16/BF16 .gguf); omitted: a synthetic slice at real width")
    parser.add_argument("--levels", default=None,
                        help="comma-separated levels (default: all): GGUF types such as Q8_0,Q6_K,Q4_K,Q4_0, "
                             "plus NF4, FP8, FP8_SCALED")
    parser.add_argument("--blocks", type=int, default=None,
                        help=f"double and single blocks to sample each, spread over depth (default "
                             f"{FILE_DEFAULTS['blocks']} for a file, {SYNTHETIC_DEFAULTS['blocks']} synthetic)")
    parser.add_argument("--res", default=None,
                        help=f"WIDTHxHEIGHT whose image tokens feed the blocks (default {FILE_DEFAULTS['res']} for a "
                             f"file, {SYNTHETIC_DEFAULTS['res']} synthetic)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"T5 tokens (default {FILE_DEFAULTS['text_tokens']} for a file, "
                             f"{SYNTHETIC_DEFAULTS['text_tokens']} synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (and synthetic weights)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE", default=None, help="write a PNG of error vs size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    levels = select_levels(args.levels)
    source = open_source(args.src, seed=args.seed)
    defaults = SYNTHETIC_DEFAULTS if source.info.synthetic else FILE_DEFAULTS
    width, height = parse_resolution(args.res or defaults["res"])
    try:
        comparison = run_comparison(
            source, levels, blocks=args.blocks if args.blocks is not None else defaults["blocks"], width=width,
            height=height, text_tokens=args.text_tokens if args.text_tokens is not None else defaults["text_tokens"],
            seed=args.seed, progress=not args.no_progress)
    finally:
        source.close()
    if args.plot:
        write_plot(comparison, args.plot)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        print(format_table(comparison))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
