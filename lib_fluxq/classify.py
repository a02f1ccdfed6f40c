"""The one classifier: what a model file is, from its header, by the family table (lib_fluxq/families.py).

``classify_file(path)`` reads the header with the one header reader (lib_fluxq/formats/*_header.py) and returns a
``Classification``: the family (or None when the file holds no diffusion model), the parts it holds (transformer,
clip_l, t5xxl, qwen3_4b, ae, flux2_vae, ...) with their precision, the storage format (gguf, bnb-nf4, fp8-scaled,
comfy-nvfp4, svdq-int4, ...) and which evidence decided the family: ``content`` (tensor names and shapes), or —
only where content cannot tell two families apart (Kontext / Krea vs dev, Klein base vs distilled) —
``metadata``, then ``name``. Pairing (lib_fluxq/pairing.py) and inspect (lib_fluxq/inspect.py) both call it.

Only headers are read, plus — for Comfy mixed-quant files without ``_quantization_metadata`` — the few bytes of
the per-layer ``.comfy_quant`` JSON tensors (tens of bytes each), which are the format's own marker.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lib_fluxq import families as F
from lib_fluxq.errors import FormatError
from lib_fluxq.formats.gguf_header import GGUFHeader, read_gguf_header
from lib_fluxq.formats.safetensors_header import SafetensorsHeader, read_safetensors_header

GGUF_FLOAT_TYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp32"}
SAFETENSORS_PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp32", "F8_E4M3": "fp8",
                          "F8_E5M2": "fp8", "NF4": "nf4", "FP4": "fp4", "I8": "int8", "U8": "uint8"}
FULL_PRECISIONS = ("fp16", "bf16", "fp32")
# bitsandbytes QuantState.as_dict(packed=True) markers stored next to each 4-bit weight (Forge NF4 checkpoints).
BNB_MARKERS = {".quant_state.bitsandbytes__nf4": "NF4", ".quant_state.bitsandbytes__fp4": "FP4"}
# ComfyUI quant_ops.QUANT_ALGOS / Neo backend/quant_ops.py format names -> our format keys.
COMFY_FORMATS = {"float8_e4m3fn": "comfy-fp8", "float8_e5m2": "comfy-fp8", "nvfp4": "comfy-nvfp4",
                 "mxfp8": "comfy-mxfp8", "int8_tensorwise": "comfy-int8", "convrot_w4a4": "comfy-w4a4"}
_COMFY_QUANT_READ_LIMIT = 1 << 20   # bytes of .comfy_quant JSON read per file at most
_DIGITS = r"\d+"


@dataclass(frozen=True)
class TensorSpec:
    """One header entry in torch order. dtype: safetensors' names, GGML type names for GGUF, NF4/FP4 for
    bitsandbytes-packed weights (whose shape is then the logical one where the header allows)."""

    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    n_bytes: int = 0


@dataclass
class HeaderView:
    """Format-neutral view of a model file's header."""

    path: str
    container: str                               # "gguf" | "safetensors"
    tensors: dict[str, TensorSpec]
    metadata: dict[str, Any] = field(default_factory=dict)
    bytes_read: int = 0

    @cached_property
    def index(self) -> _Index:
        return _Index(self.tensors)


def read_header(path: str | os.PathLike[str]) -> HeaderView:
    """The header of a .gguf / .safetensors file (by magic, then extension). Raises FormatError."""
    path = os.fspath(path)
    if _is_gguf(path):
        return view_from_gguf(read_gguf_header(path))
    lower = path.lower()
    if lower.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise FormatError(path, "pickle checkpoints are not read (loading one runs its code)",
                          fix="use the .safetensors or .gguf release of this file")
    return view_from_safetensors(read_safetensors_header(path))


def _is_gguf(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def view_from_gguf(header: GGUFHeader) -> HeaderView:
    tensors = {t.name: TensorSpec(t.shape, t.type_name, t.offset, t.n_bytes) for t in header.tensors}
    return HeaderView(header.path, "gguf", tensors, dict(header.metadata), header.bytes_read)


def view_from_safetensors(header: SafetensorsHeader) -> HeaderView:
    infos = header.tensors
    tensors = {name: TensorSpec(info.shape, info.dtype, info.offset, info.n_bytes) for name, info in infos.items()}
    # Forge NF4: 'w' is a packed uint8 [n, 1]; its logical shape is (out, 2n/out) where the bias gives out.
    for name in infos:
        for marker, kind in BNB_MARKERS.items():
            if name.endswith(marker):
                weight = name[:-len(marker)]
                packed = tensors.get(weight)
                if packed is None:
                    continue
                shape = packed.shape
                bias = tensors.get(weight[:-len("weight")] + "bias") if weight.endswith(".weight") else None
                elements = 2 * _prod(packed.shape)
                if bias is not None and len(bias.shape) == 1 and bias.shape[0] and elements % bias.shape[0] == 0:
                    shape = (bias.shape[0], elements // bias.shape[0])
                tensors[weight] = TensorSpec(shape, kind, packed.offset, packed.n_bytes)
    return HeaderView(header.path, "safetensors", tensors, dict(header.metadata), header.bytes_read)


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Index:
    """Suffix lookup at dot boundaries: ``find("a.b")`` returns every name equal to "a.b" or ending in ".a.b"."""

    def __init__(self, tensors: Mapping[str, TensorSpec]) -> None:
        self.tensors = tensors
        self._by_suffix: dict[str, list[str]] = {}
        for name in tensors:
            parts = name.split(".")
            for i in range(len(parts)):
                self._by_suffix.setdefault(".".join(parts[i:]), []).append(name)
        self._globs: dict[str, re.Pattern[str]] = {}

    def find(self, keys: str) -> list[str]:
        found: list[str] = []
        for key in (k.strip() for k in keys.split("|")):
            if "*" in key:
                pattern = self._globs.get(key)
                if pattern is None:
                    body = r"\.".join(_DIGITS if p == "*" else re.escape(p) for p in key.split("."))
                    pattern = self._globs[key] = re.compile(rf"(^|\.){body}$")
                found.extend(sorted(n for n in self.tensors if pattern.search(n)))
            else:
                found.extend(self._by_suffix.get(key, ()))
        return found

    def has(self, keys: str) -> bool:
        return bool(self.find(keys))


def _matches(signature: F.Signature, index: _Index) -> list[str] | None:
    """The tensors that satisfied the signature (first = the most telling), or None when it does not match."""
    evidence: list[str] = []
    for keys in signature.present:
        found = index.find(keys)
        if not found:
            return None
        evidence.append(found[0])
    for keys in signature.absent:
        if index.has(keys):
            return None
    dims_evidence = []
    for keys, axis, allowed in signature.dims:
        hit = next((n for n in index.find(keys) if _dim(index.tensors[n].shape, axis) in allowed), None)
        if hit is None:
            return None
        dims_evidence.append(hit)
    return dims_evidence + evidence


def _dim(shape: tuple[int, ...], axis: int) -> int | None:
    try:
        return shape[axis]
    except IndexError:
        return None


# ------------------------------------------------------------------------------------------------- classification

@dataclass(frozen=True)
class Classification:
    family: str | None                      # a families.FAMILIES key; None: no diffusion model in the file
    decided_by: str | None = None           # "content" | "metadata" | "name"
    look_alikes: tuple[str, ...] = ()       # families with the same weights that content could not exclude
    parts: frozenset[str] = frozenset()     # "transformer" and families.COMPANIONS keys
    precisions: Mapping[str, str] = field(default_factory=dict)   # part -> fp16 / bf16 / fp8 / gguf / nf4 / ...
    format: str | None = None               # main storage format (families.FORMATS key)
    formats: tuple[str, ...] = ()           # every format seen, main first
    format_mix: Mapping[str, int] = field(default_factory=dict)   # Comfy mixed: layer format -> layers
    details: Mapping[str, Any] = field(default_factory=dict)      # geometry read from the header
    notes: tuple[str, ...] = ()

    @property
    def family_row(self) -> F.Family | None:
        return F.FAMILIES.get(self.family or "")

    @property
    def needs(self) -> tuple[str, ...]:
        """Companion parts the family needs that this file does not hold itself."""
        row = self.family_row
        return tuple(p for p in row.companions if p not in self.parts) if row else ()

    def decided_text(self) -> str:
        if self.decided_by in (None, "content"):
            return ""
        alike = ", ".join(F.FAMILIES[k].title for k in self.look_alikes if k != self.family)
        return f"decided by: {self.decided_by} (same weights as {alike})" if alike else \
            f"decided by: {self.decided_by}"


def classify_file(path: str | os.PathLike[str]) -> Classification:
    return classify(read_header(path))


def classify(view: HeaderView) -> Classification:
    index = view.index
    notes: list[str] = []
    family, decided_by, alikes, family_evidence = _family(view, index, notes)
    formats, mix = _formats(view, index, notes)
    parts: set[str] = set()
    precisions: dict[str, str] = {}
    if family is not None:
        parts.add("transformer")
        block = index.find(_BLOCK_WEIGHT)
        probe = block[0] if block else _weight_of(index, family_evidence)
        precision = _precision(view, probe)
        # packed integer storage says nothing by itself: the format (nvfp4, int8, SVDQ INT4, ...) does
        precisions["transformer"] = _PACKED_PRECISION.get(formats[0], precision) if formats and \
            precision in ("uint8", "int8", "int32") else precision
    for comp in F.COMPANIONS.values():
        evidence = _matches(comp.signature, index)
        if evidence is None:
            continue
        parts.add(comp.key)
        probe = index.find(comp.precision_key)[0] if comp.precision_key and index.has(comp.precision_key) \
            else evidence[0]
        precisions[comp.key] = _precision(view, probe)
    details = _details(view, index, family)
    return Classification(family=family, decided_by=decided_by, look_alikes=alikes, parts=frozenset(parts),
                          precisions=precisions, format=formats[0] if formats else None, formats=tuple(formats),
                          format_mix=mix, details=details, notes=tuple(notes))


def _family(view: HeaderView, index: _Index, notes: list[str]
            ) -> tuple[str | None, str | None, tuple[str, ...], list[str]]:
    matched = {key: ev for key, fam in F.FAMILIES.items() if (ev := _matches(fam.signature, index)) is not None}
    if not matched:
        return None, None, (), []
    specific = [k for k in matched if not F.FAMILIES[k].fallback]
    candidates = specific or list(matched)
    primaries = [k for k in candidates if F.FAMILIES[k].same_weights_as is None]
    if len(primaries) > 1:
        notes.append(f"header matches several families ({', '.join(primaries)}); using {primaries[0]}")
    primary = primaries[0] if primaries else candidates[0]
    alikes = tuple([primary] + [k for k, fam in F.FAMILIES.items() if fam.same_weights_as == primary])
    if len(alikes) == 1:
        return primary, "content", (), matched[primary]
    for key in alikes[1:]:
        if _metadata_says(view.metadata, F.FAMILIES[key].metadata_hints):
            return key, "metadata", alikes, matched[primary]
    name = os.path.basename(view.path).lower()
    for key in alikes[1:]:
        if any(re.search(hint, name) for hint in F.FAMILIES[key].name_hints):
            return key, "name", alikes, matched[primary]
    return primary, "content", alikes, matched[primary]


def _metadata_says(metadata: Mapping[str, Any], hints: Iterable[tuple[str, str]]) -> bool:
    return any(isinstance(metadata.get(key), str) and word in metadata[key].lower() for key, word in hints)


# A block linear of each naming (BFL, Nunchaku, diffusers): its dtype is the transformer's storage precision.
_BLOCK_WEIGHT = ("double_blocks.0.img_attn.qkv.weight | transformer_blocks.0.qkv_proj.qweight"
                 " | transformer_blocks.0.attn.to_q.weight | transformer_blocks.0.attn.to_q.qweight")
_PACKED_PRECISION = {"comfy-nvfp4": "nvfp4", "comfy-int8": "int8", "comfy-w4a4": "int4", "svdq-int4": "int4",
                     "svdq-fp4": "fp4", "comfy-mxfp8": "mxfp8"}


def _weight_of(index: _Index, evidence: list[str]) -> str:
    """A 2-D weight among the evidence (its dtype is the transformer's precision), else the first tensor."""
    return next((n for n in evidence if len(index.tensors[n].shape) == 2), evidence[0])


def _precision(view: HeaderView, name: str) -> str:
    dtype = view.tensors[name].dtype
    if view.container == "gguf":
        return GGUF_FLOAT_TYPES.get(dtype, "gguf")
    if name.endswith(".weight") and (name[:-len("weight")] + "scale_weight") in view.tensors:
        return "fp8"        # Comfy legacy scaled fp8: still fp8 storage
    return SAFETENSORS_PRECISIONS.get(dtype, dtype.lower())


# -------------------------------------------------------------------------------------------------------- formats

def _formats(view: HeaderView, index: _Index, notes: list[str]) -> tuple[list[str], dict[str, int]]:
    """Storage formats in the order that decides the main one (a marker beats the plain dtype mix)."""
    found: list[str] = []
    mix: dict[str, int] = {}
    if view.container == "gguf":
        found.append("gguf")
    svdq = _svdq_format(view)
    if svdq:
        found.append(svdq)
    for marker, kind in BNB_MARKERS.items():
        if any(n.endswith(marker) for n in view.tensors):
            found.append("bnb-nf4" if kind == "NF4" else "bnb-fp4")
    comfy = _comfy_layer_formats(view, notes)
    if comfy:
        mix = dict(Counter(comfy.values()).most_common())
        found.extend(dict.fromkeys(COMFY_FORMATS.get(f, "comfy-fp8") for f in mix if f in COMFY_FORMATS))
        unknown = sorted(f for f in mix if f not in COMFY_FORMATS)
        if unknown:
            notes.append(f"Comfy quant formats not known here: {', '.join(unknown)}")
    elif index.has("scaled_fp8"):
        found.append("fp8-scaled")
    plain = _dtype_format(view)
    if plain and plain not in found:
        found.append(plain)
    return found, mix


def _svdq_format(view: HeaderView) -> str | None:
    # nunchaku src/Linear.cpp GEMM_W4A4: qweight int8 [out, in/2]; wscales [in/64, out] bf16/fp16 for INT4, or
    # [in/16, out] fp8 e4m3 for NVFP4 (plus wtscale / wcscales). quantization_config in __metadata__ agrees.
    config = view.metadata.get("quantization_config")
    if isinstance(config, str) and "svdquant" in config:
        try:
            weight = json.loads(config).get("weight", {})
        except (ValueError, AttributeError):
            weight = {}
        if isinstance(weight, dict) and "fp4" in str(weight.get("dtype", "")):
            return "svdq-fp4"
        if isinstance(weight, dict) and "int4" in str(weight.get("dtype", "")):
            return "svdq-int4"
    for name, spec in view.tensors.items():
        if name.endswith(".qweight") and spec.dtype == "I8":
            scales = view.tensors.get(name[:-len("qweight")] + "wscales")
            if scales is not None:
                return "svdq-fp4" if scales.dtype.startswith("F8") else "svdq-int4"
    return None


def _comfy_layer_formats(view: HeaderView, notes: list[str]) -> dict[str, str]:
    """layer -> Comfy quant format, from ``_quantization_metadata`` or the per-layer ``.comfy_quant`` JSON."""
    raw = view.metadata.get("_quantization_metadata")
    if isinstance(raw, str):
        try:
            layers = json.loads(raw).get("layers", {})
            return {k: str(v.get("format")) for k, v in layers.items() if isinstance(v, dict)}
        except (ValueError, AttributeError):
            notes.append("_quantization_metadata is not valid JSON")
    markers = sorted(((n, s) for n, s in view.tensors.items() if n.endswith(".comfy_quant")),
                     key=lambda item: item[1].offset)
    if not markers:
        return {}
    layers: dict[str, str] = {}
    budget = _COMFY_QUANT_READ_LIMIT
    try:
        with open(view.path, "rb") as f:
            for name, spec in markers:
                if spec.n_bytes > budget or spec.n_bytes > 4096:
                    notes.append("some .comfy_quant markers were not read (too large)")
                    break
                f.seek(spec.offset)
                data = f.read(spec.n_bytes)
                budget -= len(data)
                view.bytes_read += len(data)
                try:
                    layers[name[:-len(".comfy_quant")]] = str(json.loads(data.decode("utf-8")).get("format"))
                except (ValueError, UnicodeDecodeError, AttributeError):
                    layers[name[:-len(".comfy_quant")]] = "unreadable"
    except OSError as exc:
        notes.append(f".comfy_quant markers not readable: {exc.strerror or exc}")
        layers = {name[:-len(".comfy_quant")]: "unreadable" for name, _ in markers}
    return layers


_PLAIN_FORMATS = {"F8_E4M3": "fp8-e4m3fn", "F8_E5M2": "fp8-e5m2", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def _dtype_format(view: HeaderView) -> str | None:
    """What most bytes of 2-D weights are stored as, when no marker says otherwise."""
    if view.container == "gguf":
        return None
    by_bytes: Counter[str] = Counter()
    for name, spec in view.tensors.items():
        if name.endswith(".weight") and len(spec.shape) >= 2:
            by_bytes[spec.dtype] += spec.n_bytes or _prod(spec.shape)
    if not by_bytes:
        return None
    return _PLAIN_FORMATS.get(by_bytes.most_common(1)[0][0])


# -------------------------------------------------------------------------------------------------------- details

_BLOCK_COUNTERS = (("double_blocks", r"(?:^|\.)double_blocks\.(\d+)\."),
                   ("single_blocks", r"(?:^|\.)single_blocks\.(\d+)\."),
                   ("double_blocks", r"(?:^|\.)transformer_blocks\.(\d+)\."),
                   ("single_blocks", r"(?:^|\.)single_transformer_blocks\.(\d+)\."))


def _details(view: HeaderView, index: _Index, family: str | None) -> dict[str, Any]:
    """Geometry read from the header, for reports: hidden size, in/context features, block counts, latent ch."""
    details: dict[str, Any] = {}
    row = F.FAMILIES.get(family or "")
    if row is not None and row.arch != "sd":
        img_in = index.find("img_in.weight | x_embedder.weight")
        txt_in = index.find("txt_in.weight | context_embedder.weight")
        if img_in:
            shape = view.tensors[img_in[0]].shape
            details["hidden_size"] = shape[0] if len(shape) == 2 else None
            details["in_channels"] = shape[-1] if len(shape) == 2 else None
        if txt_in and len(view.tensors[txt_in[0]].shape) == 2:
            details["context_in"] = view.tensors[txt_in[0]].shape[-1]
        details["guidance"] = index.has(F.GUIDANCE_KEYS)
        for label, pattern in _BLOCK_COUNTERS:
            indices = {int(m.group(1)) for n in view.tensors if (m := re.search(pattern, n))}
            if indices:
                details[label] = max(details.get(label, 0), len(indices))
        details.setdefault("double_blocks", 0)
        details.setdefault("single_blocks", 0)
    vae = index.find("decoder.conv_in.weight")
    if vae and len(view.tensors[vae[0]].shape) == 4:
        details["latent_channels"] = view.tensors[vae[0]].shape[1]
    return details
