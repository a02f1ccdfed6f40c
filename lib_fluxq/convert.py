"""Convert a Flux-family transformer — FLUX.1 dev / schnell / Kontext / Krea / Fill, Chroma, FLUX.2 dev / Klein —
(safetensors FP32/FP16/BF16/FP8, BFL or diffusers names, or a GGUF F16/BF16/F32) to a GGUF type or to bitsandbytes
NF4 — streaming, tensor by tensor, atomically.

The GGUF is laid out as community loaders read it (city96 ComfyUI-GGUF ``loader.py``, Forge / Neo): BFL tensor
names, ``general.architecture = "flux"`` for every family (city96 ``tools/convert.py`` writes "flux" for anything
with ``double_blocks.0.img_attn.proj.weight``; loaders tell the families apart by the tensors), ``ne`` in ggml's
reversed order, no ``comfy.gguf.orig_shape`` keys (city96 reshapes only SD UNets; Flux tensors keep their shapes).
Which tensors are quantized follows city96's published files: the 2-D weights inside ``double_blocks`` /
``single_blocks``; everything else (img_in, txt_in, time/guidance/vector embedders, Chroma's distilled_guidance_layer,
FLUX.2's model-wide modulations, final_layer) stays F16 and 1-D tensors F32. For FLUX.2 dev this reproduces the
published city96/FLUX.2-dev-gguf sizes (Q4_K_S 19.3 GB, Q5_K_S 23.2 GB); quantizing the modulations would not.

CLI: ``python -m lib_fluxq convert SRC --to TYPE [-o OUT] [--recipe default|all] [--force]``
API: ``convert_file(src, dst, qtype, recipe="default", progress=callback, cancel=threading.Event())``

Memory: one source tensor (in its stored dtype) plus a bounded float32 chunk is alive at a time; the output is laid
out from the source header before any data is read, then each tensor is quantized and written and freed.
Safety: the output goes to a hidden temp file in the target folder and is renamed over ``dst`` only when complete;
any error, Ctrl-C or cancel removes it. The source is only ever opened for reading.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gguf import GGMLQuantizationType

from lib_fluxq import __version__
from lib_fluxq.errors import FluxqError, FormatError, UnsupportedTypeError
from lib_fluxq.flux import (
    CHROMA,
    FLUX1,
    FLUX2,
    FLUX_MARKER_KEY,
    FORGE_PREFIX,
    FluxConfig,
    flux_param_shapes,
    is_quantized_by_recipe,
)
from lib_fluxq.formats import detect

if TYPE_CHECKING:
    import torch

    from lib_fluxq.formats.safetensors_read import SafetensorsReader

# torch, the quantizers and the writers are imported where the work starts (``from lib_fluxq.quant import ...`` in
# the functions below): an argument or file error answers at once instead of after torch's multi-second import.

NF4 = "nf4"
RECIPES = ("default", "all")
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
CHUNK_ELEMENTS = 1 << 22  # float32 elements per quantization step (16 MB; quantizer temporaries scale with it)


def _gguf_torch_dtypes() -> dict[GGMLQuantizationType, torch.dtype]:
    import torch

    return {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
            GGMLQuantizationType.BF16: torch.bfloat16}

Target = GGMLQuantizationType | str   # a GGML type, or NF4
ProgressCallback = Callable[[int, int, str], None]  # (tensors done, tensors total, name of the tensor just written)


class ConvertError(FluxqError):
    """The conversion cannot run or could not finish; the message names the file and what to do."""


class AlreadyQuantizedError(ConvertError):
    """The source holds quantized weights: quantizing them again compounds the error. ``found`` names the format,
    ``tensor`` the first quantized tensor (callers such as compare word their own advice from these)."""

    def __init__(self, path: str, found: str, tensor: str | None = None) -> None:
        self.path, self.found, self.tensor = path, found, tensor
        where = f" in '{tensor}'" if tensor else ""
        super().__init__(f"{path}: already quantized ({found}{where}); convert from the original BF16/FP16/FP8 "
                         "checkpoint or an F16/BF16 GGUF — quantizing a quantized model compounds the error")


class ConversionCancelled(FluxqError):
    """Stopped by the caller's cancel event; no output was left behind."""


# --------------------------------------------------------------------------------------------------------------------
# diffusers -> BFL names. Each row: BFL module, then the diffusers module(s) whose weights (and biases) are
# concatenated along dim 0 in that order to make it. ``{i}`` is the block index. From diffusers'
# convert_flux_to_diffusers.py / single_file_utils (read in reverse): q, k, v are fused into one qkv in BFL, and the
# single blocks fuse q, k, v and the MLP input projection into linear1.
DIFFUSERS_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",)),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",)),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",)),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",)),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_q",
                                   "single_transformer_blocks.{i}.attn.to_k",
                                   "single_transformer_blocks.{i}.attn.to_v",
                                   "single_transformer_blocks.{i}.proj_mlp")),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",)),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",)),
    ("final_layer.linear", ("proj_out",)),
    # diffusers' AdaLayerNormContinuous splits (scale, shift); BFL splits (shift, scale): halves are swapped
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
)
# RMSNorm scales: BFL ``.scale`` <- diffusers ``.weight``
DIFFUSERS_NORMS: tuple[tuple[str, str], ...] = (
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
)
DIFFUSERS_SWAPPED_HALVES = frozenset({"final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"})

# FLUX.2 (Flux2Transformer2DModel) -> BFL, read in reverse from diffusers' FLUX2_TRANSFORMER_KEYS_RENAME_DICT,
# ..._DOUBLE_BLOCK_KEY_MAP and ..._SINGLE_BLOCK_KEY_MAP (scripts/convert_flux2_to_diffusers.py): no biases anywhere;
# the double blocks' fused qkv is split into to_q/k/v (image) and add_q/k/v_proj (text); the single blocks keep
# linear1 fused (to_qkv_mlp_proj); the three model-wide modulations keep their names with ``.lin`` -> ``.linear``.
DIFFUSERS_FLUX2_LINEARS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    ("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    ("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    ("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    ("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    ("double_blocks.{i}.img_attn.qkv", ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
                                        "transformer_blocks.{i}.attn.to_v")),
    ("double_blocks.{i}.txt_attn.qkv", ("transformer_blocks.{i}.attn.add_q_proj",
                                        "transformer_blocks.{i}.attn.add_k_proj",
                                        "transformer_blocks.{i}.attn.add_v_proj")),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.linear_in",)),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.linear_out",)),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.linear_in",)),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.linear_out",)),
    ("single_blocks.{i}.linear1", ("single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",)),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.attn.to_out",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),     # halves swapped, as for FLUX.1
)
DIFFUSERS_FLUX2_NORMS: tuple[tuple[str, str], ...] = (
    ("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    ("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    ("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    ("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    ("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    ("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
)
# The diffusers key that only FLUX.2 has (its model-wide double-stream modulation).
DIFFUSERS_FLUX2_MARKER = "double_stream_modulation_img.linear.weight"


def diffusers_to_bfl_names(depth: int, depth_single: int, layout: str = FLUX1) -> dict[str, tuple[str, ...]]:
    """BFL parameter name -> the diffusers parameter names it is made of (in concatenation order).

    ``layout``: FLUX1 (FluxTransformer2DModel) or FLUX2 (Flux2Transformer2DModel)."""
    linears, norms = (DIFFUSERS_FLUX2_LINEARS, DIFFUSERS_FLUX2_NORMS) if layout == FLUX2 else \
        (DIFFUSERS_LINEARS, DIFFUSERS_NORMS)
    mapping: dict[str, tuple[str, ...]] = {}

    def blocks(template: str) -> range:
        if "{i}" not in template:
            return range(1)
        return range(depth_single) if template.startswith("single_blocks.") else range(depth)

    suffixes = ("weight",) if layout == FLUX2 else ("weight", "bias")   # FLUX.2 has no biases
    for bfl, parts in linears:
        for i in blocks(bfl):
            for suffix in suffixes:
                mapping[f"{bfl.format(i=i)}.{suffix}"] = tuple(f"{p.format(i=i)}.{suffix}" for p in parts)
    for bfl, part in norms:
        for i in blocks(bfl):
            mapping[bfl.format(i=i)] = (part.format(i=i),)
    return mapping


# --------------------------------------------------------------------------------------------------------------------
# Reading the source

@dataclass(frozen=True)
class SourceTensor:
    """One BFL-named transformer parameter of the source, read on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str                          # as stored, e.g. "BF16", "F8_E4M3", "F16"
    load: Callable[[], torch.Tensor]    # the values in a float dtype (fresh tensor or read-only view)


@dataclass
class FluxSource:
    path: str
    layout: str                                   # "bfl", "bfl (all-in-one)", "diffusers", "gguf"
    tensors: dict[str, SourceTensor]
    skipped: list[str] = field(default_factory=list)   # keys outside the transformer (VAE, text encoders...)
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def config(self) -> FluxConfig:
        return infer_config(self.path, {n: t.shape for n, t in self.tensors.items()})

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers.clear()


def open_source(path: str | os.PathLike[str]) -> FluxSource:
    """Open ``path`` as a Flux transformer source, or raise a FluxqError that names what it is instead."""
    path = os.fspath(path)
    # by content, not extension: missing, unreadable, pickle, empty or foreign files get their own one-line message
    if detect.require_model(path).kind == detect.GGUF:
        return _open_gguf_source(path)
    return _open_safetensors_source(path)


def _open_safetensors_source(path: str) -> FluxSource:
    try:
        from lib_fluxq.formats.safetensors_read import SafetensorsReader

        reader = SafetensorsReader(path)
    except FormatError as exc:
        if os.path.splitext(path)[1].lower() in (".ckpt", ".pt", ".pth", ".bin"):
            raise FormatError(path, "pickle checkpoints are not read (they can run code)",
                              fix="convert it to .safetensors first") from exc
        raise
    try:
        source = _safetensors_source(path, reader)
    except BaseException:
        reader.close()
        raise
    source._closers.append(reader.close)
    return source


def _safetensors_source(path: str, reader: SafetensorsReader) -> FluxSource:
    from lib_fluxq.formats import nf4

    names = list(reader.entries)
    if any(nf4.is_nf4_key(n) for n in names):
        raise AlreadyQuantizedError(path, "bitsandbytes NF4/FP4 weights")
    skipped: list[str] = []
    if any(n.startswith(FORGE_PREFIX) for n in names):  # all-in-one checkpoint: keep only the transformer
        skipped = [n for n in names if not n.startswith(FORGE_PREFIX)]
        local = {n[len(FORGE_PREFIX):]: n for n in names if n.startswith(FORGE_PREFIX)}
        layout = "bfl (all-in-one)" if skipped else "bfl"
    else:
        local = {n: n for n in names}
        layout = "bfl"
    if FLUX_MARKER_KEY not in local and _looks_like_diffusers(local):
        tensors, unused = _diffusers_tensors(path, reader, local)
        return FluxSource(path, "diffusers", tensors, skipped + unused)
    _require_flux(path, local)
    tensors: dict[str, SourceTensor] = {}
    for name, key in local.items():
        entry = reader.entries[key]
        if not entry.is_float:
            raise AlreadyQuantizedError(path, entry.dtype, key)
        tensors[name] = SourceTensor(name, entry.shape, entry.dtype, lambda key=key: reader.read(key))
    return FluxSource(path, layout, _ordered(path, tensors), skipped)


def _looks_like_diffusers(names: dict[str, str]) -> bool:
    return any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names) \
        and "x_embedder.weight" in names


def _diffusers_tensors(path: str, reader: SafetensorsReader,
                       local: dict[str, str]) -> tuple[dict[str, SourceTensor], list[str]]:
    depth = _count_blocks(local, "transformer_blocks.")
    depth_single = _count_blocks(local, "single_transformer_blocks.")
    layout = FLUX2 if DIFFUSERS_FLUX2_MARKER in local else FLUX1
    used: set[str] = set()
    tensors: dict[str, SourceTensor] = {}
    for bfl, parts in diffusers_to_bfl_names(depth, depth_single, layout).items():
        present = [p for p in parts if p in local]
        if not present:
            continue  # e.g. guidance_in on schnell; completeness is checked against the inferred config
        if len(present) != len(parts):
            missing = next(p for p in parts if p not in local)
            raise FormatError(path, f"diffusers Flux checkpoint lacks '{missing}' (needed for {bfl})",
                              fix="the file is incomplete; a sharded diffusers model must be merged into one file")
        entries = [reader.entries[local[p]] for p in parts]
        for entry in entries:
            if not entry.is_float:
                raise AlreadyQuantizedError(path, entry.dtype, entry.name)
        rows = sum(e.shape[0] for e in entries)
        shape = (rows, *entries[0].shape[1:])
        used.update(parts)
        keys = tuple(local[p] for p in parts)
        tensors[bfl] = SourceTensor(bfl, shape, entries[0].dtype,
                                    lambda keys=keys, bfl=bfl: _load_diffusers(reader, keys, bfl))
    _require_flux(path, tensors)
    unused = [local[n] for n in local if n not in used]
    return _ordered(path, tensors), unused


def _load_diffusers(reader: SafetensorsReader, keys: tuple[str, ...], bfl: str) -> torch.Tensor:
    import torch

    parts = [reader.read(k) for k in keys]
    value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if bfl in DIFFUSERS_SWAPPED_HALVES:
        scale, shift = value.chunk(2, dim=0)
        value = torch.cat([shift, scale], dim=0)
    return value


def _open_gguf_source(path: str) -> FluxSource:
    from lib_fluxq.formats.gguf import open_gguf

    gguf_file = open_gguf(path)
    try:
        arch = gguf_file.architecture
        local = {t.name[len(FORGE_PREFIX):] if t.name.startswith(FORGE_PREFIX) else t.name: t for t in gguf_file}
        if arch not in (None, "flux"):
            raise FormatError(path, f"GGUF architecture is '{arch}', not a Flux transformer",
                              fix="give the Flux transformer file (general.architecture = flux)")
        _require_flux(path, {n: None for n in local})
        float_dtypes = _gguf_torch_dtypes()
        quantized = [t for t in local.values() if t.qtype not in float_dtypes]
        if quantized:
            raise AlreadyQuantizedError(path, quantized[0].qtype.name, quantized[0].name)
        tensors = {
            name: SourceTensor(name, t.shape, t.qtype.name,
                               lambda t=t: t.data.view(float_dtypes[t.qtype]).view(t.shape))
            for name, t in local.items()
        }
        source = FluxSource(path, "gguf", _ordered(path, tensors))
    except BaseException:
        gguf_file.close()
        raise
    source._closers.append(gguf_file.close)
    return source


def _count_blocks(names, prefix: str) -> int:
    indices = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
    return max(indices) + 1 if indices else 0


# Key families that are common mistakes for "the Flux transformer", with the advice for each.
_KNOWN_FAMILIES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("an SDXL / SD1.x UNet (Stable Diffusion, not Flux)", ("input_blocks.", "model.diffusion_model.input_blocks.",
                                                          "down_blocks.", "conditioner.embedders."),
     "use a Flux checkpoint; SD models need no conversion"),
    ("a T5 text encoder", ("encoder.block.", "shared.weight", "enc.blk."), "convert the Flux transformer, not T5"),
    ("a CLIP text encoder", ("text_model.", "transformer.text_model."), "convert the Flux transformer, not CLIP"),
    ("a VAE", ("decoder.conv_in.", "encoder.conv_in.", "first_stage_model."), "convert the Flux transformer"),
    ("an SD3 / MMDiT transformer", ("joint_blocks.",), "only Flux-family transformers are converted"),
    ("a LoRA", ("lora_unet_", "lora_te", "lora_A", "lora_down", ".alpha"), "LoRAs are applied, not converted"),
)


def _require_flux(path: str, names) -> None:
    if FLUX_MARKER_KEY in names:
        return
    for label, markers, fix in _KNOWN_FAMILIES:
        if any(any(m in n for m in markers) for n in names):
            raise FormatError(path, f"not a Flux transformer: the tensor names look like {label}", fix=fix)
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise FormatError(path, f"not a Flux transformer: '{FLUX_MARKER_KEY}' is missing (first names: {sample})",
                      fix="give a Flux-family transformer (FLUX.1, Chroma, FLUX.2) in BFL, ComfyUI or diffusers layout")


def infer_config(path: str, shapes: dict[str, tuple[int, ...]]) -> FluxConfig:
    """The FluxConfig that the tensor shapes describe: the layout (FLUX.1, Chroma or FLUX.2, told apart by the keys
    only each has, as in ComfyUI's model_detection) and every size read from the shapes, so FLUX.1 dev / schnell /
    Fill / Kontext / Krea, Chroma, FLUX.2 dev / Klein and test-sized models all convert."""
    if "double_stream_modulation_img.lin.weight" in shapes:
        arch = FLUX2
    elif "distilled_guidance_layer.in_proj.weight" in shapes:
        arch = CHROMA
    else:
        arch = FLUX1
    try:
        hidden, in_channels = shapes["img_in.weight"]
        context_in = shapes["txt_in.weight"][1]
        out_channels = shapes["final_layer.linear.weight"][0]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp_hidden = shapes["double_blocks.0.img_mlp.2.weight"][1]   # the MLP's inner width (SwiGLU or GELU)
        extra: dict[str, object] = {}
        if arch == FLUX1:
            extra["vec_in"] = shapes["vector_in.in_layer.weight"][1]
        elif arch == CHROMA:
            extra["approximator_hidden"], extra["approximator_in"] = shapes["distilled_guidance_layer.in_proj.weight"]
            extra["approximator_layers"] = _count_blocks(shapes, "distilled_guidance_layer.layers.")
        else:
            extra["vec_in"] = 0
    except KeyError as exc:
        raise FormatError(path, f"Flux transformer without {exc}", fix="the checkpoint is incomplete") from None
    except ValueError:
        raise FormatError(path, "img_in.weight / txt_in.weight are not 2-D") from None
    if head_dim <= 0 or hidden % head_dim or mlp_hidden % hidden:
        raise FormatError(path, f"inconsistent Flux shapes: width {hidden}, head size {head_dim}, MLP {mlp_hidden}",
                          fix="the checkpoint is damaged or not a Flux-family transformer")
    return FluxConfig(hidden=hidden, mlp_ratio=mlp_hidden // hidden, heads=hidden // head_dim,
                      depth=_count_blocks(shapes, "double_blocks."),
                      depth_single=_count_blocks(shapes, "single_blocks."), in_channels=in_channels,
                      context_in=context_in, out_channels=out_channels, arch=arch,
                      guidance="guidance_in.in_layer.weight" in shapes, **extra)


def _ordered(path: str, tensors: dict[str, SourceTensor]) -> dict[str, SourceTensor]:
    """Check every parameter of the inferred Flux is there with its shape; return them in BFL order, extras last."""
    expected = flux_param_shapes(infer_config(path, {n: t.shape for n, t in tensors.items()}))
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise FormatError(path, f"incomplete Flux transformer: {len(missing)} tensors missing "
                                f"(e.g. {', '.join(missing[:3])})",
                          fix="the file is truncated or a partial export; use the complete checkpoint")
    wrong = [(n, tensors[n].shape, s) for n, s in expected.items() if tuple(tensors[n].shape) != s]
    if wrong:
        name, got, want = wrong[0]
        raise FormatError(path, f"shape {list(got)} where a Flux transformer has {list(want)}", tensor=name)
    ordered = {n: tensors[n] for n in expected}
    ordered.update({n: t for n, t in tensors.items() if n not in ordered})
    return ordered


# --------------------------------------------------------------------------------------------------------------------
# Planning: what each tensor becomes

def parse_target(text: str | GGMLQuantizationType) -> Target:
    """``nf4`` or a GGML type fluxq can quantize to; accepts city96 names with ``_S`` (Q4_K_S -> Q4_K)."""
    from lib_fluxq.quant import FORMATS, resolve_qtype

    if isinstance(text, GGMLQuantizationType):
        qtype = text
    else:
        name = str(text).strip()
        if name.lower() in (NF4, "bnb-nf4", "bnb_nf4"):
            return NF4
        name = re.sub(r"(?i)^(Q\d_K)_S$", r"\1", name)
        try:
            qtype = resolve_qtype(name)
        except UnsupportedTypeError:
            raise UnsupportedTypeError(f"unknown target type '{text}'; choose one of: {', '.join(target_names())}") \
                from None
    if qtype not in FORMATS:
        raise UnsupportedTypeError(f"cannot convert to {qtype.name}; choose one of: {', '.join(target_names())}")
    return qtype


def _check_quantizer_available(target: Target) -> None:
    """Fail before any work when this build has no quantizer for ``target`` (kernels land type by type)."""
    if target == NF4:
        return
    import torch

    from lib_fluxq.quant import get_format, quantize

    try:
        quantize(torch.zeros(1, get_format(target).block_size), target)
    except NotImplementedError:
        raise UnsupportedTypeError(f"quantizing to {target.name} is not available in this fluxq version; "
                                   f"choose another type") from None


def target_names() -> list[str]:
    from lib_fluxq.quant import FORMATS

    return [t.name for t in FORMATS] + [NF4]


@dataclass(frozen=True)
class PlannedTensor:
    source: SourceTensor
    out_name: str
    qtype: GGMLQuantizationType | None    # GGUF type, or None for an NF4-quantized weight
    store_dtype: torch.dtype | None = None  # NF4 file: dtype of a tensor kept unquantized
    note: str = ""


def _wants_quantized(name: str, shape: tuple[int, ...], recipe: str) -> bool:
    if recipe == "all":
        return len(shape) == 2 and name.endswith(".weight")
    return is_quantized_by_recipe(name, shape)


def plan_conversion(source: FluxSource, target: Target, recipe: str = "default") -> list[PlannedTensor]:
    """Per tensor: quantize to the target or keep at high precision (1-D -> F32, the rest F16, as published)."""
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES)}")
    import torch

    from lib_fluxq.quant import get_format

    plan: list[PlannedTensor] = []
    for name, tensor in source.tensors.items():
        shape = tuple(tensor.shape)
        quantized = _wants_quantized(name, shape, recipe)
        if target == NF4:
            if quantized:
                plan.append(PlannedTensor(tensor, FORGE_PREFIX + name, None))
            else:
                keep = torch.float32 if len(shape) <= 1 else torch.bfloat16
                plan.append(PlannedTensor(tensor, FORGE_PREFIX + name, None, store_dtype=keep))
            continue
        if target in FLOAT_TYPES:
            # float targets: everything in that type except 1-D tensors, which stay F32 like in every GGUF
            qtype = GGMLQuantizationType.F32 if len(shape) <= 1 else target
            plan.append(PlannedTensor(tensor, name, qtype))
            continue
        high = GGMLQuantizationType.F32 if len(shape) <= 1 else GGMLQuantizationType.F16
        note = ""
        if quantized and shape[-1] % get_format(target).block_size:
            quantized, note = False, f"row {shape[-1]} not a multiple of {get_format(target).block_size}: F16"
        plan.append(PlannedTensor(tensor, name, target if quantized else high, note=note))
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Converting

@dataclass(frozen=True)
class ConvertResult:
    path: str
    target: str
    recipe: str
    layout: str
    n_tensors: int
    n_quantized: int
    n_bytes: int
    source_bytes: int
    seconds: float
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def default_output(src: str | os.PathLike[str], target: Target) -> Path:
    src = Path(src)
    stem = src.stem
    for suffix in ("-bf16", "-fp16", "-fp32", "-fp8", "_bf16", "_fp16", "_fp8", "-f16", "-F16", "-BF16"):
        stem = stem.removesuffix(suffix)
    if target == NF4:
        return src.with_name(f"{stem}-nf4.safetensors")
    return src.with_name(f"{stem}-{target.name}.gguf")


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str] | None, qtype: Target | str,
                 recipe: str = "default", progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, force: bool = False) -> ConvertResult:
    """Convert ``src`` to ``qtype`` (GGML type or ``"nf4"``) at ``dst`` (default: next to ``src``).

    ``progress(done, total, name)`` is called after each tensor; setting ``cancel`` stops between chunks and raises
    ConversionCancelled. Raises a FluxqError for any bad input; never leaves a partial file; never touches ``src``.
    """
    started = time.monotonic()
    detect.require_model(src)  # a missing or foreign source is named first, before torch and the output are touched
    target = parse_target(qtype)
    _check_quantizer_available(target)
    if recipe not in RECIPES:
        raise ConvertError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPES)}")
    src_path = os.path.abspath(os.fspath(src))
    dst_path = os.path.abspath(os.fspath(dst)) if dst is not None else str(default_output(src_path, target))
    _check_destination(src_path, dst_path, force)
    source = open_source(src_path)
    try:
        plan = plan_conversion(source, target, recipe)
        writer_kind = _NF4Output if target == NF4 else _GGUFOutput
        output = writer_kind(plan, target, recipe, src_path)
        n_bytes = _write_atomically(dst_path, output, plan, progress, cancel)
    finally:
        source.close()
    return ConvertResult(
        path=dst_path, target=target if target == NF4 else target.name, recipe=recipe, layout=source.layout,
        n_tensors=len(plan), n_quantized=sum(1 for p in plan if _is_quantized(p)), n_bytes=n_bytes,
        source_bytes=os.path.getsize(src_path), seconds=time.monotonic() - started,
        skipped=tuple(source.skipped), notes=tuple(f"{p.source.name}: {p.note}" for p in plan if p.note))


def _is_quantized(p: PlannedTensor) -> bool:
    return (p.qtype is None and p.store_dtype is None) or (p.qtype is not None and p.qtype not in FLOAT_TYPES)


def _check_destination(src: str, dst: str, force: bool) -> None:
    if os.path.exists(dst):
        if os.path.exists(src) and os.path.samefile(src, dst):
            raise ConvertError(f"{dst}: the output would overwrite the source; choose another name with -o")
        if os.path.isdir(dst):
            raise ConvertError(f"{dst}: is a folder; give the output file name with -o")
        if not force:
            raise ConvertError(f"{dst}: already exists; pass --force to overwrite it or choose another name with -o")
    folder = os.path.dirname(dst) or "."
    if not os.path.isdir(folder):
        raise ConvertError(f"{dst}: the target folder {folder} does not exist; create it or choose another with -o")


class _GGUFOutput:
    def __init__(self, plan: list[PlannedTensor], target: GGMLQuantizationType, recipe: str, src: str) -> None:
        self.plan, self.target, self.recipe, self.src = plan, target, recipe, src

    def estimated_bytes(self) -> int:
        from lib_fluxq.quant import get_format

        total = 0
        for p in self.plan:
            total += -(-get_format(p.qtype).packed_bytes(math.prod(p.source.shape)) // 32) * 32
        return total + 64 * 1024 + 256 * len(self.plan)  # header, KV and tensor infos

    def write(self, path: str, step: Callable[[str], None], cancel: threading.Event | None) -> None:
        from lib_fluxq.formats.gguf_write import StreamingGGUFWriter

        writer = StreamingGGUFWriter(path, arch="flux")
        try:
            writer.add_standard_metadata(self.target)
            # general.name: the source's name, which alone tells Kontext / Krea from dev (their tensors are dev's)
            writer.add_string("general.name", os.path.splitext(os.path.basename(self.src))[0])
            writer.add_string("fluxq.source", os.path.basename(self.src))
            writer.add_string("fluxq.recipe", self.recipe)
            writer.add_string("fluxq.version", __version__)
            for p in self.plan:
                writer.declare(p.out_name, p.qtype, p.source.shape)
            writer.begin()
            for p in self.plan:
                writer.write(p.out_name, _quantize_gguf(p.source.load(), p.qtype, cancel))
                step(p.out_name)
            writer.finish()
        finally:
            writer.close()


def _quantize_gguf(values: torch.Tensor, qtype: GGMLQuantizationType, cancel: threading.Event | None) -> torch.Tensor:
    """Quantize row chunks so the float32 working set stays near CHUNK_ELEMENTS whatever the tensor size."""
    import torch

    from lib_fluxq.quant import get_format, quantize

    fmt = get_format(qtype)
    row = values.shape[-1] if values.dim() else 1
    rows = values.numel() // max(row, 1)
    flat_rows = values.reshape(rows, row)
    out = torch.empty((rows, fmt.row_bytes(row)), dtype=torch.uint8)
    step = max(1, CHUNK_ELEMENTS // max(row, 1))
    for start in range(0, rows, step):
        _check_cancel(cancel)
        out[start:start + step] = quantize(flat_rows[start:start + step].float(), qtype)
    return out


class _NF4Output:
    def __init__(self, plan: list[PlannedTensor], target: str, recipe: str, src: str) -> None:
        self.plan, self.recipe, self.src = plan, recipe, src

    def _layout(self, p: PlannedTensor) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        if p.store_dtype is not None:
            return [(p.out_name, p.store_dtype, p.source.shape)]
        from lib_fluxq.formats import nf4

        return nf4.v2_layout(p.out_name, p.source.shape, dtype_name="bfloat16")

    def _metadata(self) -> dict[str, str]:
        return {"format": "pt", "fluxq.source": os.path.basename(self.src), "fluxq.recipe": self.recipe,
                "fluxq.version": __version__, "fluxq.quantization": "bnb-nf4 v2 (blocksize 64, no double quant)"}

    def estimated_bytes(self) -> int:
        from lib_fluxq.formats.safetensors_write import StreamingSafetensorsWriter

        with open(os.devnull, "wb") as sink:
            writer = StreamingSafetensorsWriter(sink, self._metadata())
            for p in self.plan:
                for key, dtype, shape in self._layout(p):
                    writer.declare(key, dtype, shape)
            return writer.total_bytes

    def write(self, path: str, step: Callable[[str], None], cancel: threading.Event | None) -> None:
        from lib_fluxq.formats import nf4
        from lib_fluxq.formats.safetensors_write import StreamingSafetensorsWriter

        with open(path, "wb") as file:
            writer = StreamingSafetensorsWriter(file, self._metadata())
            for p in self.plan:
                for key, dtype, shape in self._layout(p):
                    writer.declare(key, dtype, shape)
            writer.write_header()
            for p in self.plan:
                _check_cancel(cancel)
                values = p.source.load()
                if p.store_dtype is not None:
                    writer.write(p.out_name, values.to(p.store_dtype))
                else:
                    weight = nf4.quantize_nf4(values, dtype_name="bfloat16")
                    for key, tensor in weight.state_dict(p.out_name).items():
                        writer.write(key, tensor)
                step(p.out_name)
            writer.finish()
            file.flush()
            os.fsync(file.fileno())


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ConversionCancelled("conversion cancelled; no output was written")


def _write_atomically(dst: str, output, plan: list[PlannedTensor], progress: ProgressCallback | None,
                      cancel: threading.Event | None) -> int:
    folder = os.path.dirname(dst) or "."
    needed = output.estimated_bytes()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < needed:
        raise ConvertError(f"{dst}: not enough space in {folder}: the output needs about {_gb(needed)}, "
                           f"{_gb(free)} free; free some space or choose another folder with -o")
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        # O_EXCL: never reuse someone else's file; mode 0o666 so the umask applies as for any new file
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise _write_error(dst, folder, exc, needed) from exc
    done = 0

    def step(name: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(plan), name)
        _check_cancel(cancel)

    try:
        _check_cancel(cancel)
        output.write(tmp, step, cancel)
        os.replace(tmp, dst)
    except OSError as exc:
        raise _write_error(dst, folder, exc, needed) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.path.getsize(dst)


def _write_error(dst: str, folder: str, exc: OSError, needed: int) -> ConvertError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConvertError(f"{dst}: the target folder {folder} ran out of space (the output needs about "
                            f"{_gb(needed)}); nothing was written — free some space or choose another folder with -o")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConvertError(f"{dst}: cannot write into {folder} ({exc.strerror}); choose a writable folder with -o")
    return ConvertError(f"{dst}: writing failed ({exc.strerror or exc}); nothing was written")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Flux transformer: .safetensors (FP32/FP16/BF16/FP8; BFL, ComfyUI, all-in-one or "
                                    "diffusers names) or an F16/BF16 .gguf")
    to = parser.add_argument("--to", required=True, metavar="TYPE", dest="to",
                             help="target: %(type_names)s (Q4_K_S etc. are accepted for the K types)")
    to.type_names = _TypeNames()  # filled in by argparse only when the help is printed
    parser.add_argument("-o", "--output", help="output file (default: next to SRC, named after TYPE)")
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="default: quantize the 2-D block weights, keep embeddings/final layer/1-D high precision "
                             "(as the published files); all: quantize every 2-D weight")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


class _TypeNames:
    """The target list for ``--help``, read from the quantizer table (which imports torch) only when printed."""

    def __str__(self) -> str:
        return ", ".join(target_names())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    detect.require_model(args.src)  # before parse_target, which loads the quantizer table (and torch)
    target = parse_target(args.to)
    bar = None

    def on_progress(done: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="tensor", desc=f"-> {args.to}", file=sys.stderr, dynamic_ncols=True)
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(1)

    # SIGTERM (kill, a closing terminal, a service stop) must clean up like Ctrl-C: turn it into KeyboardInterrupt
    # so convert_file's cleanup runs. Only SIGKILL can leave a hidden ``.NAME.*.partial`` file behind.
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        result = convert_file(args.src, args.output, target, recipe=args.recipe, progress=on_progress,
                              force=args.force)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    print(f"wrote {result.path}")
    print(f"  {result.target} ({result.recipe} recipe): {result.n_quantized} of {result.n_tensors} tensors quantized, "
          f"source layout {result.layout}")
    ratio = result.n_bytes / result.source_bytes if result.source_bytes else float("nan")
    print(f"  size {_gb(result.n_bytes)} ({ratio:.2f}x the {_gb(result.source_bytes)} source) "
          f"in {result.seconds:.1f} s")
    if result.skipped:
        print(f"  left out {len(result.skipped)} tensors outside the transformer (e.g. {result.skipped[0]})")
    for note in result.notes[:5]:
        print(f"  note: {note}")
    return 0
