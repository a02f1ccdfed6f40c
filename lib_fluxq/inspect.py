"""What is this model file? Family, key naming, quantization mix, components — from headers only, never tensor data.

``inspect_file(path)`` reads one GGUF/safetensors header (a few KB of a multi-GB file) and returns a ``FileReport``;
``scan(paths)`` does that for files, folders (recursively) and WebUI roots (their models/ subfolders). A file that
cannot be read becomes a report with ``status == "unreadable"`` and the reason; the scan goes on.

The report is the shared vocabulary of the advisor (which level, what is missing), the Forge loader hook (pre-check
before Forge reads 12 GB only to fail) and the UI. ``FileReport.to_dict()`` field names are stable and documented
in README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib_fluxq import families as F
from lib_fluxq.classify import Classification, HeaderView, classify, view_from_gguf, view_from_safetensors
from lib_fluxq.errors import FormatError
from lib_fluxq.flux import FORGE_PREFIX
from lib_fluxq.formats import detect
from lib_fluxq.formats.gguf_header import read_gguf_header
from lib_fluxq.formats.safetensors_header import read_safetensors_header

SCHEMA_VERSION = 1
INSPECTED_EXTENSIONS = (".safetensors", ".sft", ".gguf")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
# WebUI (A1111/Forge) and ComfyUI model folders; a WebUI root is scanned through these only.
MODEL_FOLDERS = ("Stable-diffusion", "text_encoder", "VAE", "Lora", "unet", "diffusion_models",
                 "text_encoders", "clip", "vae", "loras", "LyCORIS")
# Where Forge looks for each kind of file (used for a "misplaced" note).
EXPECTED_FOLDERS = {"transformer": ("Stable-diffusion", "unet", "diffusion_models"),
                    "text_encoder": ("text_encoder", "text_encoders", "clip"),
                    "vae": ("VAE", "vae"), "lora": ("Lora", "loras", "LyCORIS")}

FLOAT_TYPES = ("F64", "F32", "F16", "BF16")
FP8_LEVELS = {"F8_E4M3": "FP8 e4m3fn", "F8_E5M2": "FP8 e5m2"}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_BITS_ORDER = ("Q2_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q3_K", "IQ3_XXS", "IQ3_S", "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS",
               "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
MIXED_SHARE = 0.10  # share of higher-precision quantized tensors above which a K-quant mix reads as "_M"

# bitsandbytes QuantState.as_dict(packed=True) suffixes stored next to each 4-bit weight (Forge NF4 checkpoints).
_BNB_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_BNB_MARKERS = {".quant_state.bitsandbytes__nf4": "NF4", ".quant_state.bitsandbytes__fp4": "FP4"}

# Name prefixes of the parts of an all-in-one checkpoint (Forge/ComfyUI/ldm layouts), first match wins.
_COMPONENT_PREFIXES = (
    (FORGE_PREFIX, "model"),
    ("vae.", "vae"), ("first_stage_model.", "vae"),
    ("text_encoders.clip_l.", "clip_l"), ("text_encoders.clip_g.", "clip_g"), ("text_encoders.t5xxl.", "t5xxl"),
    ("cond_stage_model.", "clip"), ("conditioner.embedders.0.", "clip"), ("conditioner.embedders.1.", "clip#1"),
    ("text_encoders.", "text_encoder"),     # Neo all-in-one files: text_encoders.qwen3_4b.transformer. ...
)

_LORA_DOWN = re.compile(r"(lora_down|lora_A|lora\.down|lora\d\.down)\.weight$")
_LORA_ANY = re.compile(r"(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora\d\.(down|up)|hada_w1_a|lokr_w1)")
_BLOCK_PATTERNS = (  # (label, regex over a LoRA key with '_' or '.' separators)
    ("double_blocks", re.compile(r"double_blocks[._](\d+)[._]")),
    ("single_blocks", re.compile(r"single_blocks[._](\d+)[._]")),
    ("single_transformer_blocks", re.compile(r"single_transformer_blocks[._](\d+)[._]")),
    ("transformer_blocks", re.compile(r"(?<!single_)(?<!single\.)transformer_blocks[._](\d+)[._]")),
    ("input_blocks", re.compile(r"input_blocks[._](\d+)[._]")),
    ("output_blocks", re.compile(r"output_blocks[._](\d+)[._]")),
    ("down_blocks", re.compile(r"down_blocks[._](\d+)[._]")),
    ("up_blocks", re.compile(r"up_blocks[._](\d+)[._]")),
    ("mid_block", re.compile(r"mid(dle)?_block[._]()")),
)


@dataclass
class StorageEntry:
    """Tensors of one storage type: a GGML type (Q4_K), a safetensors dtype (F8_E4M3, BF16) or NF4/FP4."""

    dtype: str
    tensors: int
    bytes: int


@dataclass
class ComponentReport:
    """One part of a checkpoint (transformer, unet, vae, clip_l, clip_g, t5xxl) and how it is stored."""

    name: str
    tensors: int
    parameters: int
    bytes: int
    level: str
    storage: list[StorageEntry]


@dataclass
class LoraReport:
    target: str                 # "flux", "sdxl", "sd" or "unknown"
    naming: str                 # "bfl", "xlabs", "diffusers", "kohya", "lycoris"
    rank: int | None            # most common rank (rows of the down / A matrices)
    ranks: list[int]            # every distinct rank
    modules: int                # adapted layers
    blocks: dict[str, list[int]]  # block family -> indices touched, e.g. {"double_blocks": [0, 1, ...]}
    text_encoder: bool          # also adapts a text encoder


@dataclass
class FileReport:
    path: str
    status: str = "ok"                # "ok" | "unreadable" | "skipped"
    error: str | None = None          # reason when not ok
    format: str | None = None         # "gguf" | "safetensors" | "pickle"
    file_size: int = 0
    folder: str | None = None         # the WebUI/ComfyUI models subfolder it sits in
    family: str = "unknown"           # a families.FAMILIES key (flux-dev, chroma, flux2-klein-4b, sd15, ...), else
                                      # the part(s) a text-encoder / VAE file holds (t5xxl, qwen3_4b, ae, ...)
    family_title: str | None = None   # "FLUX.2 [klein] 4B"
    decided_by: str | None = None     # how the family was told: "content", or "metadata" / "name" (look-alikes)
    key_naming: str | None = None     # "bfl", "prefixed", "diffusers", "nunchaku", "city96", "hf", "ldm", ...
    level: str | None = None          # what users call it: Q4_K_S, Q8_0, NF4 v2, FP8 e4m3fn, SVDQuant INT4, ...
    level_source: str | None = None   # "general.file_type", "tensor mix" or "format marker"
    quant_format: str | None = None   # families.FORMATS key: gguf, bnb-nf4, fp8-scaled, comfy-nvfp4, svdq-int4, ...
    runs_on: dict[str, str] = field(default_factory=dict)   # host -> "yes (...)" / "no (...)" for this family+format
    parameters: int = 0
    tensors: int = 0
    storage: list[StorageEntry] = field(default_factory=list)
    components: list[str] = field(default_factory=list)
    component_details: list[ComponentReport] = field(default_factory=list)
    missing_for_flux: list[str] = field(default_factory=list)   # parts its family needs that the file lacks
    details: dict[str, Any] = field(default_factory=dict)   # family facts: in_channels, guidance, blocks, ...
    lora: LoraReport | None = None
    architecture: str | None = None   # GGUF general.architecture
    metadata: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    header_bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def readable(self) -> bool:
        return self.status == "ok"

    @property
    def storage_summary(self) -> str:
        """E.g. 'Q4_K 304 tensors 6.2 GB + F32 472 tensors 0.1 GB'."""
        return " + ".join(f"{e.dtype} {e.tensors} tensors {format_bytes(e.bytes)}" for e in self.storage)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema"] = SCHEMA_VERSION
        data["storage_summary"] = self.storage_summary
        return data

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)


@dataclass
class _Tensor:
    """Format-neutral view of one header entry."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    n_bytes: int
    parameters: int
    double_quant: bool = False  # bitsandbytes 4-bit weight whose absmax is itself quantized (nested_*)


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------------------------------------- reading

def inspect_file(path: str | os.PathLike[str], hash: bool = False, folder: str | None = None) -> FileReport:
    """Inspect one file from its header. Never raises for a bad file: the report says ``unreadable: <reason>``."""
    path = os.fspath(path)
    report = FileReport(path=path, folder=folder if folder is not None else _model_folder(path))
    try:
        found = detect.identify(path)  # by content: the extension may lie (a .gguf that is HTML, a .ckpt that is not)
    except FormatError as exc:
        return _unreadable(report, exc.describe())
    report.file_size = found.size
    if found.kind == detect.PICKLE:
        report.format, report.status = "pickle", "skipped"
        report.error = detect.not_a_model(found).describe()  # the same words as every other command
        return report
    if found.kind not in detect.MODEL_KINDS:
        return _unreadable(report, detect.not_a_model(found).describe())
    try:
        report.format = found.kind
        if found.kind == detect.GGUF:
            tensors, view = _read_gguf(path, report)
        else:
            tensors, view = _read_safetensors(path, report)
        _analyse(report, tensors, view)
        report.header_bytes_read = view.bytes_read   # plus the Comfy .comfy_quant marker bytes, if any
        if hash:
            report.sha256 = _sha256(path)
    except FormatError as exc:
        return _unreadable(report, exc.describe())
    except OSError as exc:
        return _unreadable(report, detect.path_error(path, exc).describe())
    return report


def _unreadable(report: FileReport, reason: str) -> FileReport:
    report.status, report.error = "unreadable", reason
    return report


def _read_gguf(path: str, report: FileReport) -> tuple[list[_Tensor], HeaderView]:
    header = read_gguf_header(path)
    report.header_bytes_read = header.bytes_read
    report.architecture = header.architecture
    report.metadata = {k: _short(v) for k, v in header.metadata.items()
                       if k.startswith("general.") or not isinstance(v, list)}
    file_type = header.metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        report.details["gguf_file_type"] = _file_type_name(file_type)
    return ([_Tensor(t.name, t.type_name, t.shape, t.n_bytes, t.n_elements) for t in header.tensors],
            view_from_gguf(header))


def _read_safetensors(path: str, report: FileReport) -> tuple[list[_Tensor], HeaderView]:
    header = read_safetensors_header(path)
    report.header_bytes_read = header.bytes_read
    report.metadata = {k: _short(v) for k, v in header.metadata.items()}
    infos = header.tensors
    # Fold bitsandbytes 4-bit states into their weight: 'w' is NF4/FP4 when 'w.quant_state.bitsandbytes__nf4' exists.
    four_bit: dict[str, str] = {}
    for name in infos:
        for marker, kind in _BNB_MARKERS.items():
            if name.endswith(marker):
                four_bit[name[:-len(marker)]] = kind
    tensors: list[_Tensor] = []
    aux_bytes: Counter[str] = Counter()
    for name, info in infos.items():
        owner = _bnb_owner(name, four_bit)
        if owner is not None:
            aux_bytes[owner] += info.n_bytes
            continue
        if name in four_bit:
            # packed uint8: two 4-bit values per byte
            tensors.append(_Tensor(name, four_bit[name], info.shape, info.n_bytes, 2 * info.n_elements,
                                   double_quant=f"{name}.nested_absmax" in infos))
        else:
            tensors.append(_Tensor(name, info.dtype, info.shape, info.n_bytes, info.n_elements))
    for tensor in tensors:
        tensor.n_bytes += aux_bytes.get(tensor.name, 0)
    if four_bit:
        report.details["bnb_double_quant"] = any(t.double_quant for t in tensors)
    return tensors, view_from_safetensors(header)


def _bnb_owner(name: str, four_bit: dict[str, str]) -> str | None:
    for marker in _BNB_MARKERS:
        if name.endswith(marker):
            return name[:-len(marker)]
    for suffix in _BNB_STATE_SUFFIXES:
        if name.endswith(suffix) and name[:-len(suffix)] in four_bit:
            return name[:-len(suffix)]
    return None


def _short(value: Any) -> Any:
    """Metadata for the report: long strings and arrays (tokenizer vocabularies, kohya tag counts) are cut."""
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "…"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    return value


def _file_type_name(value: int) -> str | None:
    try:
        from gguf import LlamaFileType
        name = LlamaFileType(value).name
    except (ImportError, ValueError):
        return None
    return {"ALL_F32": "F32", "GUESSED": None}.get(name, name.removeprefix("MOSTLY_"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------- analysis

def _analyse(report: FileReport, tensors: list[_Tensor], view: HeaderView) -> None:
    # The one classifier (lib_fluxq.classify over the family table) names the file and, group by group, each part
    # of an all-in-one checkpoint; inspect adds the storage accounting per part. A model first: Nunchaku's SVDQuant
    # files carry low-rank 'lora_down' / 'lora_up' tensors in every layer and are not LoRAs.
    whole = classify(view)
    _count_packed(tensors, view, whole.format)
    report.tensors = len(tensors)
    report.parameters = sum(t.parameters for t in tensors)
    report.storage = _storage(tensors)
    names = [t.name for t in tensors]
    if not tensors:
        report.notes.append("the file holds no tensors")
        return
    if whole.family is None and any(_LORA_ANY.search(n) for n in names):
        _analyse_lora(report, tensors)
        _note_folder(report, "lora")
        return
    components: list[ComponentReport] = []
    naming: str | None = None
    for prefix, members in _split_components(tensors).values():
        local = HeaderView(view.path, view.container, {t.name[len(prefix):]: view.tensors[t.name] for t in members
                                                        if t.name in view.tensors}, view.metadata)
        found = classify(local)
        kind = _component_kind(found)
        if kind is None:
            report.notes.append(f"{len(members)} tensors under '{prefix or '(no prefix)'}' not recognised")
            continue
        components.append(_component(kind, members, report.details.get("gguf_file_type")))
        if kind in ("transformer", "unet") or naming is None:
            naming = _key_naming(local.tensors, prefix)
    components.sort(key=lambda c: _COMPONENT_ORDER.get(c.name, 99))
    report.component_details = components
    report.components = [c.name for c in components]
    report.key_naming = naming
    report.family = whole.family or ("+".join(sorted(whole.parts)) if whole.parts else "unknown")
    report.decided_by = whole.decided_by
    report.quant_format = whole.format
    report.details.update(whole.details)
    if whole.format_mix:
        report.details["format_mix"] = dict(whole.format_mix)
    row = whole.family_row
    if row is not None:
        report.family_title = row.title
        report.missing_for_flux = list(whole.needs)
        report.runs_on = {F.HOSTS[h]: F.runs_on(row.key, whole.format, h).text() for h in F.HOSTS}
        _note_family(report, whole)
    report.notes.extend(whole.notes)
    if components:
        main = components[0]
        report.level = main.level
        from_file_type = report.format == "gguf" and main.level == report.details.get("gguf_file_type")
        report.level_source = "general.file_type" if from_file_type else "tensor mix"
        if whole.format in _MARKED_FORMATS:   # the marker names it better than the raw int8 / uint8 storage
            report.level, report.level_source = F.fmt(whole.format).title, "format marker"
    if len(components) == 1:
        _note_folder(report, _folder_kind(components[0].name))
    elif "transformer" in report.components or "unet" in report.components:
        _note_folder(report, "transformer")


def _count_packed(tensors: list[_Tensor], view: HeaderView, quant_format: str | None) -> None:
    """Parameters of 4-bit weights packed into integer storage: SVDQuant 'qweight' int8 holds two (W4A4), int32
    eight (the AWQ W4A16 AdaNorm linears); Comfy nvfp4 'weight' uint8 holds two."""
    if quant_format in ("svdq-int4", "svdq-fp4"):
        per_element = {"I8": 2, "I32": 8}
        for t in tensors:
            if t.name.endswith(".qweight") and t.dtype in per_element:
                t.parameters *= per_element[t.dtype]
    elif quant_format == "comfy-nvfp4":
        for t in tensors:
            if t.dtype == "U8" and t.name.endswith(".weight") and \
                    f"{t.name[:-len('weight')]}weight_scale_2" in view.tensors:
                t.parameters *= 2


# Formats whose marker, not the storage dtype, says what the weights are.
_MARKED_FORMATS = ("svdq-int4", "svdq-fp4", "comfy-nvfp4", "comfy-mxfp8", "comfy-int8", "comfy-w4a4", "comfy-fp8",
                   "fp8-scaled")
_COMPONENT_ORDER = {name: i for i, name in enumerate(
    ("transformer", "unet", "ae", "flux2_vae", "sd_vae", "clip_l", "clip_g", "t5xxl", "qwen3_4b", "qwen3_8b",
     "mistral3_24b"))}


def _component_kind(found: Classification) -> str | None:
    """What one group of tensors is: the diffusion model ("transformer", or "unet" for SD UNets) or a part."""
    row = found.family_row
    if row is not None:
        return "unet" if row.arch == "sd" and row.key != "sd3" else "transformer"
    parts = sorted(found.parts, key=lambda p: _COMPONENT_ORDER.get(p, 99))
    return parts[0] if parts else None


def _folder_kind(component: str) -> str:
    """EXPECTED_FOLDERS key for a component name."""
    if component in ("transformer", "unet"):
        return "transformer"
    comp = F.COMPANIONS.get(component)
    return comp.kind if comp is not None else component


def _note_family(report: FileReport, whole: Classification) -> None:
    row = whole.family_row
    assert row is not None
    if whole.decided_by in ("name", "metadata"):
        report.notes.append(whole.decided_text())
    elif len(whole.look_alikes) > 1:
        others = [F.family(k).title for k in whole.look_alikes if k != whole.family]
        verb = "has" if len(others) == 1 else "have"
        report.notes.append(f"{' and '.join(others)} {verb} the same weights as {row.title}; neither the metadata "
                            f"nor the file name says which, so this reads as {row.title}")
    hosts = [f"{title}: {text}" for title, text in report.runs_on.items()]
    fmt_title = F.fmt(whole.format).title if whole.format in F.FORMATS else "this storage"
    report.notes.append(f"{row.title} as {fmt_title} runs on " + "; ".join(hosts))


def _key_naming(local: dict[str, Any], prefix: str) -> str | None:
    """How the tensors are named: bfl / prefixed (BFL under model.diffusion_model.), diffusers, nunchaku, city96
    (llama.cpp names in GGUF), hf (transformers), open_clip, ldm."""
    keys = list(local)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has(".qweight") and has("transformer_blocks."):
        return "nunchaku"
    if has("double_blocks.") or has("distilled_guidance_layer."):
        return "prefixed" if prefix == FORGE_PREFIX else "bfl"
    if has("enc.blk.") or any(k.startswith("blk.") or k == "token_embd.weight" for k in keys):
        return "city96"
    if has("transformer.resblocks."):
        return "open_clip"
    if has("text_model.") or has("encoder.block.") or has("layers.0.self_attn."):
        return "hf"
    if has("single_transformer_blocks.") or has("x_embedder.") or has("decoder.up_blocks.") \
            or has("time_embedding.linear_1."):
        return "diffusers"
    if has("input_blocks.") or has("decoder.up.") or has("joint_blocks.") or has("decoder.conv_in."):
        return "ldm"
    return None


def _split_components(tensors: list[_Tensor]) -> dict[str, tuple[str, list[_Tensor]]]:
    """Group tensors by all-in-one prefix; unprefixed tensors form one group named ''."""
    groups: dict[str, tuple[str, list[_Tensor]]] = {}
    for tensor in tensors:
        prefix, group = next(((p, g) for p, g in _COMPONENT_PREFIXES if tensor.name.startswith(p)), ("", ""))
        groups.setdefault(group, (prefix, []))[1].append(tensor)
    return groups


def _component(name: str, members: list[_Tensor], file_type: str | None) -> ComponentReport:
    storage = _storage(members)
    return ComponentReport(name=name, tensors=len(members), parameters=sum(t.parameters for t in members),
                           bytes=sum(t.n_bytes for t in members), level=_level(members, file_type), storage=storage)


def _storage(tensors: Iterable[_Tensor]) -> list[StorageEntry]:
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for t in tensors:
        counts[t.dtype] += 1
        sizes[t.dtype] += t.n_bytes
    return [StorageEntry(dtype, counts[dtype], sizes[dtype]) for dtype in sorted(sizes, key=lambda d: -sizes[d])]


def _level(tensors: list[_Tensor], file_type: str | None) -> str:
    """The name users know for how a component is stored."""
    quantized = [t for t in tensors if t.dtype not in FLOAT_TYPES and t.dtype not in ("I8", "U8", "I16", "I32",
                                                                                          "I64", "BOOL")]
    if not quantized:
        by_bytes = Counter()
        for t in tensors:
            by_bytes[t.dtype] += t.n_bytes
        return by_bytes.most_common(1)[0][0] if by_bytes else "unknown"
    counts = Counter(t.dtype for t in quantized)
    dominant = counts.most_common(1)[0][0]
    if file_type and file_type.startswith(dominant):
        return file_type  # the quantizer's own label (llama-quantize writes general.file_type), e.g. Q4_K_M
    if dominant in ("NF4", "FP4"):
        # v1 (the first Forge release) double-quantizes absmax (nested_*), v2 stores float32 absmax
        nested = any(t.double_quant for t in quantized if t.dtype == dominant)
        return f"{dominant} v1" if nested else f"{dominant} v2"
    if dominant in FP8_LEVELS:
        return FP8_LEVELS[dominant]
    if dominant in ("Q3_K", "Q4_K", "Q5_K"):
        rank = _BITS_ORDER.index(dominant)
        higher = sum(n for qtype, n in counts.items() if qtype in _BITS_ORDER and _BITS_ORDER.index(qtype) > rank)
        return f"{dominant}_M" if higher / len(quantized) >= MIXED_SHARE else f"{dominant}_S"
    return dominant


def _analyse_lora(report: FileReport, tensors: list[_Tensor]) -> None:
    names = [t.name for t in tensors]
    downs = [t for t in tensors if _LORA_DOWN.search(t.name)]
    ranks = Counter(t.shape[0] for t in downs if len(t.shape) >= 1)
    flux_like = any(re.search(r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d", n) for n in names)
    if any(n.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for n in names):
        naming = "kohya"
    elif any(re.search(r"_lora\d\.(down|up)\.", n) for n in names):
        naming = "xlabs"
    elif any("hada_w1_a" in n or "lokr_w1" in n for n in names):
        naming = "lycoris"
    elif any(re.search(r"(^|\.)(transformer|unet)\.", n) or "transformer_blocks" in n for n in names) \
            and not any("double_blocks" in n for n in names):
        naming = "diffusers"
    else:
        naming = "bfl"
    if flux_like:
        target = "flux"
    elif any(("lora_te2_" in n or "text_encoder_2" in n or "add_embedding" in n or "label_emb" in n) for n in names):
        target = "sdxl"
    elif any(re.search(r"(down_blocks|up_blocks|input_blocks|output_blocks|mid_block|middle_block)[._]", n)
             for n in names):
        target = "sd"
    else:
        target = "unknown"
    blocks: dict[str, list[int]] = {}
    for t in downs:
        for label, pattern in _BLOCK_PATTERNS:
            match = pattern.search(t.name)
            if match:
                index = int(match.group(match.lastindex)) if match.group(match.lastindex) else 0
                blocks.setdefault(label, [])
                if index not in blocks[label]:
                    blocks[label].append(index)
                break
    report.lora = LoraReport(
        target=target, naming=naming, rank=ranks.most_common(1)[0][0] if ranks else None, ranks=sorted(ranks),
        modules=len(downs), blocks={k: sorted(v) for k, v in blocks.items()},
        text_encoder=any(n.startswith(("lora_te", "text_encoder", "te_", "te1", "te2")) or ".text_encoder" in n
                         for n in names))
    report.family = {"flux": "flux-lora", "sd": "sd-lora", "sdxl": "sd-lora"}.get(target, "unknown")
    report.key_naming = naming
    report.components = ["lora"]
    report.level = _level(tensors, None)
    report.level_source = "tensor mix"


def _note_folder(report: FileReport, kind: str) -> None:
    expected = EXPECTED_FOLDERS.get(kind)
    if report.folder and expected and report.folder not in expected:
        report.notes.append(f"a {kind} file in models/{report.folder}; Forge looks for it in models/{expected[0]}")


def _model_folder(path: str) -> str | None:
    parts = Path(path).parts[:-1]
    for part in reversed(parts):
        if part in MODEL_FOLDERS:
            return part
    return None


# ------------------------------------------------------------------------------------------------------------- scan

def iter_model_files(path: str | os.PathLike[str],
                     folder_errors: list[tuple[str, OSError]] | None = None) -> Iterator[str]:
    """Model files under ``path``: itself if a file, its model folders if a WebUI root, else every file below it.

    Symlinked folders are followed once (a loop is cut); a directory whose name ends in a model extension is yielded
    so that it is reported, not silently skipped. Folders that cannot be listed go to ``folder_errors``.
    """
    root = os.fspath(path)
    if not os.path.isdir(root) or root.lower().endswith(INSPECTED_EXTENSIONS + PICKLE_EXTENSIONS):
        yield root
        return
    for models in (os.path.join(root, "models"), root):
        folders = [os.path.join(models, name) for name in MODEL_FOLDERS if os.path.isdir(os.path.join(models, name))]
        if folders and models != root or len(folders) >= 2:
            for folder in folders:
                yield from _walk(folder, folder_errors)
            return
    yield from _walk(root, folder_errors)


def _walk(root: str, folder_errors: list[tuple[str, OSError]] | None = None) -> Iterator[str]:
    seen: set[tuple[int, int]] = set()

    def unlistable(exc: OSError) -> None:
        if folder_errors is not None:
            folder_errors.append((exc.filename or root, exc))

    for directory, subdirs, files in os.walk(root, followlinks=True, onerror=unlistable):
        try:
            st = os.stat(directory)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        model_like_dirs = [d for d in subdirs if d.lower().endswith(INSPECTED_EXTENSIONS)]
        subdirs[:] = sorted(d for d in subdirs if d not in model_like_dirs and not d.startswith("."))
        for name in sorted(files + model_like_dirs):
            if name.lower().endswith(INSPECTED_EXTENSIONS + PICKLE_EXTENSIONS):
                yield os.path.join(directory, name)


_STATUS_ORDER = {"ok": 0, "skipped": 1, "unreadable": 2}


@dataclass
class ScanResult:
    """``reports``: each real file once, readable first, then skipped (pickles), broken last.
    ``empty``: the given folders that held no model file."""

    reports: list[FileReport]
    empty: list[str]


def scan_paths(paths: Iterable[str | os.PathLike[str]], hash: bool = False) -> ScanResult:
    """Reports for every model file under ``paths`` (files, folders, WebUI roots).

    A file reached twice (a symlink to a parent folder or to the file, a path given twice, a WebUI root and one of
    its folders) is reported once: under its own path when that path was found, else under the first path found.
    A broken file, an unreadable folder and a path that does not exist are reports with ``status == "unreadable"``
    and the reason, listed after the readable ones.
    """
    found: dict[str, str] = {}  # real file -> the path it is reported under (insertion order = scan order)
    folder_reports: list[FileReport] = []
    empty: list[str] = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isdir(path):
            candidates: list[str] = [path]  # a file, or a broken path: inspect_file says what is wrong
        else:
            folder_errors: list[tuple[str, OSError]] = []
            candidates = list(iter_model_files(path, folder_errors))
            for folder, exc in folder_errors:
                folder_reports.append(FileReport(path=folder, status="unreadable",
                                                 error="folder " + detect.path_error(folder, exc).describe()))
            if not candidates and not folder_errors:
                empty.append(path)
        for file_path in candidates:
            real = os.path.realpath(file_path)
            key = real if os.path.exists(file_path) else os.path.abspath(file_path)
            if key not in found or (real == os.path.abspath(file_path) != os.path.abspath(found[key])):
                found[key] = file_path  # first path found, or the file's own path over a link to it
    reports = [inspect_file(file_path, hash=hash) for file_path in found.values()] + folder_reports
    reports.sort(key=lambda r: _STATUS_ORDER.get(r.status, len(_STATUS_ORDER)))  # stable: scan order kept within
    return ScanResult(reports, empty)


def scan(paths: Iterable[str | os.PathLike[str]], hash: bool = False) -> list[FileReport]:
    """Reports for every model file under ``paths``: each real file once, broken files last (see ``scan_paths``)."""
    return scan_paths(paths, hash=hash).reports


# -------------------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="model files, folders (scanned recursively) or a WebUI root (its models/ folders)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of reports instead of a table")
    parser.add_argument("--hash", action="store_true", help="also compute sha256 (reads every byte: slow)")


def run(args: argparse.Namespace) -> int:
    """Table (or JSON) of every file; exit 1 when a file is unreadable or nothing was found.

    When nothing readable was found there is no table: each problem is one ``error:`` line naming the path.
    """
    result = scan_paths(args.paths, hash=args.hash)
    reports = result.reports
    problems = [f"error: {path}: no model files (.safetensors, .gguf) in this folder (give the folder or file that "
                "holds your models)" for path in result.empty]
    readable = any(r.status == "ok" for r in reports)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif readable:
        print(format_table(reports))
    else:
        problems += [f"error: {r.path}: {r.error}" for r in reports]
    for line in problems:
        print(line, file=sys.stderr)
    return 0 if readable and all(r.status != "unreadable" for r in reports) and not result.empty else 1


def format_table(reports: list[FileReport]) -> str:
    """The human view: one line per file, then its storage mix, notes and what is missing."""
    header = ("FILE", "FAMILY", "LEVEL", "PARAMS", "SIZE", "NAMING", "COMPONENTS")
    rows: list[tuple[str, ...]] = []
    extra: list[list[str]] = []
    for r in reports:
        name = os.path.basename(r.path) or r.path
        if r.status != "ok":
            rows.append((name, f"{r.status}: {r.error}"))
            extra.append([])
            continue
        rows.append((name, r.family, r.level or "-", format_count(r.parameters), format_bytes(r.file_size),
                     r.key_naming or "-", ", ".join(r.components) or "-"))
        lines = [f"storage: {r.storage_summary}"]
        if len(r.component_details) > 1:
            lines.append("components: " + ", ".join(f"{c.name} {c.level} {format_bytes(c.bytes)}"
                                                    for c in r.component_details))
        if r.lora:
            blocks = "; ".join(f"{k} {_ranges(v)}" for k, v in r.lora.blocks.items())
            lines.append(f"lora: target {r.lora.target}, {r.lora.naming} naming, rank {r.lora.rank}, "
                         f"{r.lora.modules} modules{', text encoder' if r.lora.text_encoder else ''}"
                         f"{'; ' + blocks if blocks else ''}")
        if r.missing_for_flux:
            lines.append("for a full Flux pipeline also select: " + ", ".join(r.missing_for_flux))
        if r.sha256:
            lines.append(f"sha256: {r.sha256}")
        lines.extend(f"note: {n}" for n in r.notes)
        extra.append(lines)
    widths = [max([len(header[i])] + [len(row[i]) for row in rows if len(row) > 2])
              for i in range(len(header) - 1)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  " + header[-1]]
    for row, lines in zip(rows, extra, strict=True):
        if len(row) == 2:
            out.append(f"{row[0].ljust(widths[0])}  {row[1]}")
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        out.extend("    " + line for line in lines)
    return "\n".join(out)


def _ranges(indices: list[int]) -> str:
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if start != prev else str(start))
    return ",".join(parts)
