"""Read a GGUF file's header — metadata and tensor table — without touching tensor data.

Why our own parser instead of gguf-py's ``GGUFReader``: the reader memory-maps the whole file and fails on bad input
with bare ``ValueError``/``IndexError``; the inspector needs to count the bytes it reads, survive any garbage (it is
fuzzed), and name the tensor at fault. Only gguf-py's vocabulary (value types, ``GGMLQuantizationType``,
``GGML_QUANT_SIZES``) is used, which Forge's older vendored copy also has.

Layout (v2/v3, little endian): magic ``GGUF``, u32 version, u64 tensor count, u64 KV count, KV pairs (string key,
u32 value type, value), tensor infos (string name, u32 n_dims, u64 ne[n_dims], u32 GGML type, u64 offset relative to
the aligned data section), padding to ``general.alignment`` (default 32), tensor data.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lib_fluxq.errors import FormatError
from lib_fluxq.formats import detect

GGUF_MAGIC = detect.GGUF_MAGIC
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4             # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8    # nested arrays are legal but never deep in practice; bounds recursion on garbage

_REFETCH = "the file is damaged or truncated; download it again"

# value type -> (struct format, numpy dtype) for fixed-size scalars
_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "<u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
# Fewest bytes one element of each kind can occupy: bounds counts before anything is allocated.
_MIN_ITEM_BYTES = {**{t: struct.calcsize(f) for t, (f, _) in _SCALARS.items()},
                   GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table."""

    name: str
    shape: tuple[int, ...]   # torch order (GGML's ne reversed)
    ggml_type: int           # GGMLQuantizationType value
    offset: int              # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int          # absolute offset of the (aligned) tensor data section
    file_size: int
    bytes_read: int = 0      # bytes this parse fetched from the file
    tensor_index: dict[str, GGUFTensorInfo] = field(default_factory=dict, repr=False)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None


class HeaderStream:
    """Sequential reader over an unbuffered file: fetches in chunks, never past the end, counting what it fetched.

    Every read is checked against the file size *before* anything is allocated, so a corrupt length field becomes a
    FormatError instead of a huge allocation. Shared with the safetensors header reader.
    """

    def __init__(self, path: str, raw: Any, file_size: int, chunk: int = 4096) -> None:
        self.path = path
        self.chunk = chunk  # small: a GGUF header is many tiny fields, and we must not read into tensor data
        self._raw = raw
        self.file_size = file_size
        self._buffer = b""
        self._buffer_pos = 0
        self._fetched_to = 0     # file offset just past the last fetched byte
        self.bytes_read = 0

    @property
    def pos(self) -> int:
        return self._fetched_to - (len(self._buffer) - self._buffer_pos)

    @property
    def remaining(self) -> int:
        return self.file_size - self.pos

    def take(self, n: int, what: str, tensor: str | None = None) -> bytes:
        if n < 0 or n > self.remaining:
            raise FormatError(self.path, f"{what} ({n} bytes at offset {self.pos}) runs past the end of the "
                                         f"{self.file_size}-byte file", tensor=tensor, fix=_REFETCH)
        available = len(self._buffer) - self._buffer_pos
        if available < n:
            want = min(max(n - available, self.chunk), self.file_size - self._fetched_to)
            parts = [self._buffer[self._buffer_pos:]]
            got = 0
            while got < want:
                chunk = self._raw.read(want - got)
                if not chunk:  # file shrank under us
                    raise FormatError(self.path, f"{what}: unexpected end of file at offset {self._fetched_to}",
                                      tensor=tensor, fix=_REFETCH)
                parts.append(chunk)
                got += len(chunk)
                self._fetched_to += len(chunk)
            self.bytes_read += got
            self._buffer = b"".join(parts)
            self._buffer_pos = 0
        out = self._buffer[self._buffer_pos:self._buffer_pos + n]
        self._buffer_pos += n
        return out

    def unpack(self, fmt: str, what: str, tensor: str | None = None) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what, tensor))[0]


def open_header_stream(path: str | os.PathLike[str], kind: str) -> tuple[str, Any, int]:
    """Open ``path`` for header reading if it is a readable regular file of ``kind`` (detect.GGUF / SAFETENSORS).

    Anything else (missing, a folder, a pipe, no permission, a pickle, a web page, other bytes) becomes the
    FormatError ``detect`` words for it, decided by content, never by the file name.
    """
    path = os.fspath(path)
    raw = os.fdopen(detect.open_regular(path), "rb", buffering=0)
    try:
        size = os.fstat(raw.fileno()).st_size
        found = detect.Identified(path, detect.sniff(raw.read(min(size, detect.SNIFF_BYTES)), size), size)
        if found.kind != kind:
            raise detect.not_a_model(found, {detect.GGUF: "a GGUF file", detect.SAFETENSORS: "a safetensors file"}
                                     .get(kind, f"a {kind} file"))
        raw.seek(0)
    except OSError as exc:
        raw.close()
        raise detect.path_error(path, exc) from None
    except BaseException:
        raw.close()
        raise
    return path, raw, size


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the header of the GGUF file at ``path``. Raises FormatError (file, tensor, reason) on anything invalid."""
    path, raw, size = open_header_stream(path, detect.GGUF)
    try:
        stream = HeaderStream(path, raw, size)
        return _parse(stream)
    except OSError as exc:
        raise FormatError(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        raw.close()


def _parse(stream: HeaderStream) -> GGUFHeader:
    path, size = stream.path, stream.file_size
    if size < 24:
        raise FormatError(path, f"file is {size} bytes, too short for a GGUF header", fix=_REFETCH)
    if stream.take(4, "magic") != GGUF_MAGIC:  # checked on opening; the file changed since
        raise FormatError(path, "is not a GGUF file (no GGUF magic)", fix=_REFETCH)
    version = stream.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        # no raw number from the file in the message unless it reads as a plausible version
        named = f"version {version}" if 1 <= version <= 255 else "an unknown version"
        hint = "GGUF v1 is obsolete; re-convert the model" if version == 1 else "written by a newer tool, or damaged"
        raise FormatError(path, f"is a GGUF file of {named}; fluxq reads versions 2 and 3", fix=hint)
    n_tensors = stream.unpack("<Q", "tensor count")
    n_kv = stream.unpack("<Q", "metadata count")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > stream.remaining:
        raise FormatError(path, f"header claims more tensors and metadata entries than the {size}-byte file can "
                                "hold", fix=_REFETCH)

    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = _read_string(stream, f"metadata key #{index}", strict=True)
        value_type = _value_type(stream, f"metadata '{key}'")
        metadata[key] = _read_value(stream, value_type, f"metadata '{key}'", depth=0)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise FormatError(path, "general.alignment is not a positive power of two", fix=_REFETCH)

    raw_infos = []
    for index in range(n_tensors):
        name = _read_string(stream, f"tensor name #{index}", strict=True)
        n_dims = stream.unpack("<I", "tensor dimension count", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(path, f"tensor has {n_dims} dimensions (GGML allows 1..{MAX_DIMS})", tensor=name)
        ne = struct.unpack(f"<{n_dims}Q", stream.take(8 * n_dims, "tensor dimensions", name))
        type_id = stream.unpack("<I", "tensor type", name)
        relative_offset = stream.unpack("<Q", "tensor offset", name)
        raw_infos.append((name, ne, type_id, relative_offset))

    data_start = -(-stream.pos // alignment) * alignment
    tensors: list[GGUFTensorInfo] = []
    index_by_name: dict[str, GGUFTensorInfo] = {}
    for name, ne, type_id, relative_offset in raw_infos:
        info = _tensor_info(path, size, name, ne, type_id, relative_offset, data_start, alignment)
        if name in index_by_name:
            raise FormatError(path, "tensor name appears twice in the tensor table", tensor=name)
        index_by_name[name] = info
        tensors.append(info)
    _check_overlaps(path, tensors)
    return GGUFHeader(path=path, version=version, metadata=metadata, tensors=tensors, alignment=alignment,
                      data_start=data_start, file_size=size, bytes_read=stream.bytes_read,
                      tensor_index=index_by_name)


def _tensor_info(path: str, size: int, name: str, ne: tuple[int, ...], type_id: int, relative_offset: int,
                 data_start: int, alignment: int) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise FormatError(path, f"unknown GGML type id {type_id}", tensor=name,
                          fix="the file uses a type newer than this gguf library, or is damaged") from None
    if qtype not in GGML_QUANT_SIZES:
        raise FormatError(path, f"GGML type {qtype.name} has no known block size", tensor=name)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if any(d == 0 for d in ne):
        raise FormatError(path, f"tensor has a zero dimension {list(ne)}", tensor=name)
    if ne[0] % block_size:
        raise FormatError(path, f"row length {ne[0]} is not a multiple of the {qtype.name} block size "
                                f"{block_size}", tensor=name)
    n_elements = 1
    for d in ne:
        n_elements *= d
    n_bytes = n_elements // block_size * type_size
    if relative_offset % alignment:
        raise FormatError(path, f"data offset {relative_offset} is not aligned to {alignment} bytes", tensor=name)
    offset = data_start + relative_offset
    if offset + n_bytes > size:
        raise FormatError(path, f"{qtype.name} tensor of shape {list(reversed(ne))} needs bytes "
                                f"{offset}..{offset + n_bytes}, past the end of the {size}-byte file (truncated?)",
                          tensor=name, fix=_REFETCH)
    return GGUFTensorInfo(name=name, shape=tuple(reversed(ne)), ggml_type=int(qtype), offset=offset,
                          n_bytes=n_bytes)


def _check_overlaps(path: str, tensors: list[GGUFTensorInfo]) -> None:
    spans = sorted(tensors, key=lambda t: t.offset)
    for current, following in zip(spans, spans[1:], strict=False):
        if current.offset + current.n_bytes > following.offset:
            raise FormatError(path, f"tensor data overlaps tensor '{following.name}' (byte count does not match "
                                    "the shape)", tensor=current.name)


def _value_type(stream: HeaderStream, what: str) -> GGUFValueType:
    type_id = stream.unpack("<I", f"{what} value type")
    try:
        return GGUFValueType(type_id)
    except ValueError:
        raise FormatError(stream.path, f"{what}: unknown value type {type_id}", fix=_REFETCH) from None


def _read_string(stream: HeaderStream, what: str, strict: bool = False) -> str:
    length = stream.unpack("<Q", f"{what} length")
    data = stream.take(length, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if strict:  # names must be exact: a replaced character would silently mismatch a key
            raise FormatError(stream.path, f"{what} is not valid UTF-8", fix=_REFETCH) from None
        return data.decode("utf-8", errors="replace")


def _read_value(stream: HeaderStream, value_type: GGUFValueType, what: str, depth: int) -> Any:
    if value_type == GGUFValueType.STRING:
        return _read_string(stream, what)
    if value_type in _SCALARS:
        value = stream.unpack(_SCALARS[value_type][0], what)
        return bool(value) if value_type == GGUFValueType.BOOL else value
    # array: element type, count, elements
    if depth >= MAX_ARRAY_NESTING:
        raise FormatError(stream.path, f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
    element_type = _value_type(stream, what)
    count = stream.unpack("<Q", f"{what} array length")
    if count * _MIN_ITEM_BYTES[element_type] > stream.remaining:
        raise FormatError(stream.path, f"{what}: array of {count} elements cannot fit in the file", fix=_REFETCH)
    if element_type in _SCALARS:
        fmt, dtype = _SCALARS[element_type]
        values = np.frombuffer(stream.take(count * struct.calcsize(fmt), what), dtype=dtype).tolist()
        return [bool(v) for v in values] if element_type == GGUFValueType.BOOL else values
    return [_read_value(stream, element_type, what, depth + 1) for _ in range(count)]
