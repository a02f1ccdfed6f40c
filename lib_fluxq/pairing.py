"""Which text encoders and VAE a checkpoint needs, chosen by what the files contain (never by their names).

Host-free: the Forge hook (lib_fluxq/host/forge.py) feeds it the checkpoint and the files Forge lists under
"VAE / Text Encoder"; the UI and CLI can use it the same way. Only tensor names and shapes from the file headers are
read (safetensors JSON header, GGUF tensor infos), so deciding costs milliseconds even for a 12 GB file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lib_fluxq.errors import FluxqError, FormatError
from lib_fluxq.flux import FLUX_MARKER_KEY

# Marker keys, matched as key suffixes so every prefix Forge/ComfyUI/BFL use is covered
# ("", "model.diffusion_model.", "text_encoders.clip_l.transformer.", "vae.", "first_stage_model.", ...).
CLIP_L_KEY = "text_model.encoder.layers.0.layer_norm1.bias"       # width 768 = CLIP-L (1280 = CLIP-G)
OPENCLIP_L_KEY = "transformer.resblocks.0.ln_1.bias"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.k.weight"
T5_CITY96_KEY = "enc.blk.0.attn_k.weight"                         # city96's T5 GGUF naming
VAE_KEY = "decoder.conv_in.weight"                                # in-channels: 16 = Flux/SD3 VAE, 4 = SD VAE
LEGACY_UNET_KEY = "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
SD3_KEY = "final_layer.adaLN_modulation.1.bias"
CHROMA_KEY = "distilled_guidance_layer.layers.0.in_layer.bias"

CLIP_L_WIDTH = 768
LEGACY_FAMILIES = {768: "sd1", 1024: "sd2", 1280: "xlrf", 2048: "sdxl"}   # cross-attention width -> family
SD_FAMILIES = frozenset({"sd1", "sd2", "xlrf", "sdxl"})

# Parts each family needs besides its own transformer.
REQUIRED_PARTS: dict[str, tuple[str, ...]] = {"flux": ("clip_l", "t5xxl", "ae"), "chroma": ("t5xxl", "ae")}

# What to download for each part and where it goes (exact repositories and files).
# part -> (Hugging Face repository, files (any one), folder kind, note)
DOWNLOADS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "clip_l": ("comfyanonymous/flux_text_encoders", ("clip_l.safetensors",), "text_encoder", "0.25 GB"),
    "t5xxl": ("comfyanonymous/flux_text_encoders", ("t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors"),
              "text_encoder", "fp8 4.9 GB for less than 32 GB RAM, fp16 9.5 GB otherwise"),
    "ae": ("black-forest-labs/FLUX.1-schnell", ("ae.safetensors",), "VAE",
           "0.33 GB, Apache-2.0 licensed, works for dev and schnell"),
}
PART_TITLES = {"clip_l": "CLIP-L text encoder", "t5xxl": "T5-XXL text encoder", "ae": "Flux VAE (ae)"}

T5_FP16_MIN_FREE_RAM = 32 * 1024**3   # below this, a 9.5 GB fp16 T5 next to the transformer swaps: prefer fp8/GGUF
_FULL_PRECISION = ("fp16", "bf16", "fp32")
_SMALL_PRECISION = ("fp8", "gguf", "nf4")


@dataclass(frozen=True)
class FileContents:
    """What one model file holds, from its header alone."""

    path: str
    family: str | None = None                      # flux, chroma, sd1, sd2, xlrf, sdxl, sd3 (None: no diffusion model)
    parts: frozenset[str] = frozenset()            # transformer, clip_l, t5xxl, ae (16-ch VAE), sd_vae (4-ch VAE)
    t5_precision: str | None = None                # fp16 / bf16 / fp32 / fp8 / gguf / nf4 when it holds a T5

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class Pairing:
    """The additional modules to load with a checkpoint, and the parts nothing provides."""

    modules: list[str]                             # paths, the user's own selection first
    added: dict[str, str] = field(default_factory=dict)      # part -> path we chose
    dropped: list[str] = field(default_factory=list)         # user-selected paths that do not fit this model
    missing: list[str] = field(default_factory=list)         # parts neither the checkpoint nor any file provides


class MissingComponentsError(FluxqError):
    """A Flux checkpoint lacks text encoders / VAE and no file on disk provides them."""

    def __init__(self, checkpoint: str, missing: Sequence[str], folders: dict[str, str] | None = None) -> None:
        self.checkpoint = checkpoint
        self.missing = list(missing)
        super().__init__(missing_files_message(checkpoint, missing, folders))


def missing_files_message(checkpoint: str, missing: Sequence[str], folders: dict[str, str] | None = None) -> str:
    """What is missing, which exact files provide it and which folder each goes in.

    ``folders`` maps the folder kind ("text_encoder", "VAE") to the real path in this install.
    """
    folders = folders or {}
    titles = ", ".join(PART_TITLES[p] for p in missing)
    lines = [f"{os.path.basename(checkpoint)} does not contain everything Flux needs; missing: {titles}.",
             "Download (once) and put them here, then press Generate again (fluxq picks them up):"]
    for part in missing:
        repo, files, folder_kind, note = DOWNLOADS[part]
        folder = folders.get(folder_kind, os.path.join("models", folder_kind))
        lines.append(f"  - {PART_TITLES[part]}: {' or '.join(files)} ({note}) from https://huggingface.co/{repo}"
                     f"  ->  {folder}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading headers


def read_tensor_specs(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (torch shape, dtype name) from the header only. dtype names: safetensors' (F16, F8_E4M3, ...) or
    GGML's (Q4_0, F16, ...) prefixed with 'gguf:'."""
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith(".gguf"):
        return _gguf_specs(path)
    if lower.endswith(".safetensors"):
        return _safetensors_specs(path)
    raise FormatError(path, "only .safetensors and .gguf headers can be read without loading the file",
                      fix="convert the file with `python -m lib_fluxq convert`")


def _safetensors_specs(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(path, "file too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 1024**2 or length > os.path.getsize(path):
            raise FormatError(path, f"safetensors header length {length} is not plausible (damaged file?)")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise FormatError(path, f"safetensors header is not JSON: {exc}") from None
    return {name: (tuple(info["shape"]), str(info["dtype"]))
            for name, info in header.items() if name != "__metadata__" and isinstance(info, dict)}


def _gguf_specs(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from gguf import GGMLQuantizationType, GGUFReader  # Forge's vendored copy inside Forge: only old API used

    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # GGUFReader raises bare struct/Value errors
        raise FormatError(path, f"malformed GGUF header: {exc}") from None
    specs = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(int(t.tensor_type))
        specs[str(t.name)] = (tuple(int(s) for s in reversed(list(t.shape))), f"gguf:{qtype.name}")
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Classifying


def _find(specs: dict[str, tuple[tuple[int, ...], str]], suffix: str) -> tuple[str, tuple[int, ...], str] | None:
    for name, (shape, dtype) in specs.items():
        if name == suffix or name.endswith("." + suffix):
            return name, shape, dtype
    return None


def _precision(dtype: str) -> str:
    if dtype.startswith("gguf:"):
        return "gguf"
    return {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}.get(dtype, dtype.lower())


def classify(path: str, specs: dict[str, tuple[tuple[int, ...], str]]) -> FileContents:
    """Family and parts of a file from its tensor names/shapes (Forge's own recognition keys)."""
    parts: set[str] = set()
    family = None
    legacy = _find(specs, LEGACY_UNET_KEY)
    if _find(specs, FLUX_MARKER_KEY):
        family = "chroma" if _find(specs, CHROMA_KEY) else "flux"
    elif legacy and len(legacy[1]) == 2:
        family = LEGACY_FAMILIES.get(legacy[1][1])
    elif _find(specs, SD3_KEY):
        family = "sd3"
    if family is not None:
        parts.add("transformer")
    for key in (CLIP_L_KEY, OPENCLIP_L_KEY):
        found = [s for n, (s, _) in specs.items() if (n == key or n.endswith("." + key)) and s == (CLIP_L_WIDTH,)]
        if found:
            parts.add("clip_l")
    t5 = _find(specs, T5_KEY) or _find(specs, T5_CITY96_KEY)
    t5_precision = None
    if t5:
        parts.add("t5xxl")
        t5_precision = "nf4" if any("bitsandbytes__nf4" in n for n in specs) else _precision(t5[2])
    vae = _find(specs, VAE_KEY)
    if vae and len(vae[1]) == 4:
        parts.add("ae" if vae[1][1] == 16 else "sd_vae")
    return FileContents(path=path, family=family, parts=frozenset(parts), t5_precision=t5_precision)


def describe_file(path: str | os.PathLike[str]) -> FileContents:
    """Read ``path``'s header and classify it."""
    path = os.fspath(path)
    return classify(path, read_tensor_specs(path))


def describe_files(paths: Iterable[str]) -> list[FileContents]:
    """Classify every readable file; unreadable or unsupported ones are skipped (they are just not candidates)."""
    result = []
    for p in paths:
        try:
            result.append(describe_file(p))
        except (FluxqError, OSError):
            continue
    return result


# ---------------------------------------------------------------------------------------------------------------
# Choosing


def _t5_rank(contents: FileContents, free_ram_bytes: int) -> int:
    preferred = _FULL_PRECISION + _SMALL_PRECISION if free_ram_bytes >= T5_FP16_MIN_FREE_RAM \
        else _SMALL_PRECISION + _FULL_PRECISION
    precision = contents.t5_precision or ""
    return preferred.index(precision) if precision in preferred else len(preferred)


def _standalone(contents: FileContents, part: str) -> bool:
    """A text-encoder/VAE file holding ``part`` (not another diffusion checkpoint that happens to embed it)."""
    return part in contents.parts and "transformer" not in contents.parts


def _drops_for(checkpoint: FileContents, module: FileContents) -> bool:
    """Would this selected module break (or silently change) a load of ``checkpoint``? (Forge issue #2255.)"""
    family = checkpoint.family
    if family in SD_FAMILIES:
        # Flux VAE swaps a 16-channel decoder into a 4-channel model; T5 is unused; a lone CLIP-L replaces the
        # model's own (fine-tuned) one.
        return bool(module.parts & {"ae", "t5xxl"}) or module.parts == frozenset({"clip_l"})
    if family in ("flux", "chroma"):
        return module.parts == frozenset({"sd_vae"})          # a 4-channel SD VAE cannot decode Flux latents
    if family == "sd3":
        # SD3 uses CLIP-L/G and T5, so those stay. A separate 16-channel VAE replaces the checkpoint's own VAE; the
        # Flux ae has the same shapes as SD3's and would silently give wrong colours.
        return module.parts == frozenset({"sd_vae"}) or (module.parts == frozenset({"ae"})
                                                         and "ae" in checkpoint.parts)
    return False


def choose_pairing(checkpoint: FileContents, selected: Sequence[FileContents], available: Sequence[FileContents],
                   free_ram_bytes: int, pair: bool = True, drop: bool = True) -> Pairing:
    """The module list to load ``checkpoint`` with.

    ``selected``: what the user picked in "VAE / Text Encoder" (kept unless it does not fit this model: ``drop``).
    ``available``: every VAE/text-encoder file Forge knows; for a Flux/Chroma checkpoint, each part that neither the
    checkpoint nor the selection provides is filled from them (``pair``), by content. T5: fp16 when at least 32 GB
    of RAM is free, else fp8 / GGUF (each the other's fallback).
    """
    kept = [m for m in selected if not (drop and _drops_for(checkpoint, m))]
    pairing = Pairing(modules=[m.path for m in kept],
                      dropped=[m.path for m in selected if m not in kept])
    required = REQUIRED_PARTS.get(checkpoint.family or "", ())
    have = set(checkpoint.parts)
    for m in kept:
        have |= m.parts
    for part in required:
        if part in have:
            continue
        candidates = [c for c in available if _standalone(c, part) and c.path not in pairing.modules]
        if not pair or not candidates:
            pairing.missing.append(part)
            continue
        if part == "t5xxl":
            candidates.sort(key=lambda c: (_t5_rank(c, free_ram_bytes), c.name))
        else:
            # A file holding only this part beats a bundle; then by name, so the choice is stable between loads.
            candidates.sort(key=lambda c: (len(c.parts), c.name))
        chosen = candidates[0]
        pairing.modules.append(chosen.path)
        pairing.added[part] = chosen.path
        have |= chosen.parts
    return pairing
