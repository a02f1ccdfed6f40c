"""The measuring half of ``compare`` (torch): quantization levels, weight sources, blocks run per level.

Kept apart from ``lib_fluxq.compare`` (the command line, the table and the plot) so that the command's argument and
file errors answer without importing torch; ``lib_fluxq.compare`` re-exports every name defined here.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from gguf import GGMLQuantizationType
from torch import nn

from lib_fluxq.compare import (
    GB,
    VRAM_RESOLUTION,
    BlockResult,
    Comparison,
    LevelResult,
)
from lib_fluxq.errors import FluxqError, FormatError
from lib_fluxq.flux import (
    CHROMA,
    FLUX1,
    FLUX2,
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
from lib_fluxq.quant import FORMATS, dequantize, quantize

# ============================================================================================ levels


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
_LAYOUT_TITLES = {CHROMA: "Chroma", FLUX2: "FLUX.2"}


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
            if config.arch != FLUX1:
                # compare's blocks are FLUX.1's (per-block modulation, GELU MLP); Chroma and FLUX.2 blocks differ
                raise FormatError(path, f"is a {_LAYOUT_TITLES.get(config.arch, config.arch)} transformer; compare "
                                        "measures FLUX.1-layout blocks (dev, schnell, Fill, Kontext, Krea)",
                                  fix="convert works for it: python -m lib_fluxq convert FILE --to TYPE")
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


def vram_estimate_gb(level: str, model_bytes: float, width: int = 1024, height: int = 1024,
                     config: FluxConfig = FLUX_DEV) -> float | None:
    """The advisor's VRAM need to run this level fully resident at ``width``x``height`` for a transformer of geometry
    ``config`` (None for unknown levels)."""
    from lib_fluxq.advisor import transformer_vram_gb

    try:
        return transformer_vram_gb(level, model_bytes, width, height, config)
    except FluxqError:
        return None


def vram_by_family(level: str, bits_per_weight: float, width: int = 1024, height: int = 1024) \
        -> dict[str, float | None]:
    """The same VRAM figure for every distinct family of the family table (FLUX.1, Chroma, FLUX.2 dev, Klein): its
    transformer with block weights at the measured ``bits_per_weight`` (the recipe as for Flux-dev)."""
    from lib_fluxq.advisor.model import distinct_families

    return {family.key: vram_estimate_gb(level, projected_flux_dev_bytes(bits_per_weight, family.geometry), width,
                                         height, family.geometry)
            for family in distinct_families()}


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
    module_weight: torch.Tensor  # what the quantized block holds: the dequantized float32 weight
    err_sq: float                # ||W_q - W||^2
    ref_sq: float                # ||W||^2
    n_bytes: int


def _sq_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) if t.numel() else 0.0


def _quantize_weight(level: Level, result: LevelResult, raw: torch.Tensor | ChunkedWeight, weight: torch.Tensor,
                     pool_cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]]) -> _Quantized:
    """Quantize one weight, through its chunk pool when it has one and the level is block-local."""
    shape = tuple(weight.shape)
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
        # every level is block-local here: the matrix's dequantized weights are its chunks' dequantized weights
        return _Quantized(restored_pool[raw.index].reshape(shape), err_sq, ref_sq, n_bytes)
    started = time.perf_counter()
    packed = level.quantize(weight)
    result.quant_seconds = (result.quant_seconds or 0.0) + time.perf_counter() - started
    restored = _timed_dequantize(level, result, packed, shape)
    return _Quantized(restored, _sq_norm(restored - weight), _sq_norm(weight), level.packed_bytes(packed))


# The dequant speed column is the best of several runs of this thread's CPU time with torch on one thread: wall time
# on a shared machine swung from 3 to 920 M weights/s between runs, CPU time of one thread hardly moves.
_DEQUANT_RUNS = 5
_timing_lock = threading.Lock()


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    with _timing_lock:
        before = torch.get_num_threads()
        if before != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if before != 1:
                torch.set_num_threads(before)


def _timed_dequantize(level: Level, result: LevelResult, packed: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """Dequantize, timing the fastest of a few single-thread runs (CPU time of this thread)."""
    runs = _DEQUANT_RUNS if math.prod(shape) < (1 << 22) else 1  # large: long enough for one run
    best = math.inf
    with _one_torch_thread():
        for _ in range(runs):
            started = time.thread_time()
            restored = level.dequantize(packed, shape)
            best = min(best, time.thread_time() - started)
    result._dequant_s += max(best, 1e-9)
    result._dequant_elements += math.prod(shape)
    return restored


def measure_level_on_block(level: Level, result: LevelResult, kind: str, index: int, config: FluxConfig,
                           raw: dict[str, torch.Tensor | ChunkedWeight], tensors: dict[str, torch.Tensor],
                           inputs: BlockInputs, ref_update: torch.Tensor, ref_output: torch.Tensor) -> None:
    """Quantize every 2-D weight of one block with ``level``, accumulate weight statistics, run the block.

    ``tensors`` are the block's dense float32 tensors, ``raw`` the same as the source gave them (chunked or not).
    The quantized block holds the dequantized weights in plain Linears: the engine's QuantLinear, which keeps the
    packed bytes and dequantizes in each forward, gives bit for bit the same output (tests/test_ops.py), and
    dequantizing once per level instead of once more in the forward halves the demo's time.
    """
    block_tensors = dict(tensors)
    pool_cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for name, weight in tensors.items():
        if not (weight.dim() == 2 and name.endswith(".weight")):
            continue
        q = _quantize_weight(level, result, raw[name], weight, pool_cache)
        result._err_sq += q.err_sq
        result._ref_sq += q.ref_sq
        result._bytes += q.n_bytes
        result._elements += weight.numel()
        block_tensors[name] = q.module_weight
    del pool_cache
    quantized = _build_block(kind, config, block_tensors)
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
    result.vram_by_family = vram_by_family(result.level, result.bits_per_weight, *VRAM_RESOLUTION)
    result.weight_rel_rmse = math.sqrt(result._err_sq / result._ref_sq)
    n = len(result.per_block)
    result.block_rel_error = sum(b.update_rel_error for b in result.per_block) / n
    result.block_cosine = sum(b.update_cosine for b in result.per_block) / n
    result.output_rel_error = sum(b.output_rel_error for b in result.per_block) / n
    result.dequant_melem_s = result._dequant_elements / result._dequant_s / 1e6 if result._dequant_s else None


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

    results = [LevelResult(level=lv.name, description=lv.description, available=True, family=lv.family)
               for lv in levels]
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
