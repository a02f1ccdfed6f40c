"""Read a safetensors file's header (tensor names, dtypes, shapes, offsets, ``__metadata__``) without tensor data.

Layout: u64 little-endian header length N, N bytes of UTF-8 JSON (an object: name -> {dtype, shape, data_offsets},
plus an optional ``__metadata__`` string map), then the data section; offsets are relative to its start.
The safetensors package only parses headers as part of opening a file for loading; we need a byte-counted,
fuzz-robust parse that reports exactly what is wrong, so this reads the header itself.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from lib_fluxq.errors import FormatError
from lib_fluxq.formats import detect
from lib_fluxq.formats.gguf_header import HeaderStream, open_header_stream

# dtype -> bits per element (the safetensors format's dtype names)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_REFETCH = "the file is damaged or truncated; download it again"


@dataclass(frozen=True)
class SafetensorsTensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int      # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class SafetensorsHeader:
    path: str
    tensors: dict[str, SafetensorsTensorInfo]
    metadata: dict[str, str]
    header_size: int     # N, the JSON length
    file_size: int
    bytes_read: int = 0
    extra: dict[str, object] = field(default_factory=dict)  # non-standard top-level entries, if any

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse the header of the safetensors file at ``path``. Raises FormatError (file, tensor, reason)."""
    path, raw, size = open_header_stream(path, detect.SAFETENSORS)
    try:
        stream = HeaderStream(path, raw, size, chunk=8)  # two exact reads: the length, then the JSON
        return _parse(stream)
    except OSError as exc:
        raise FormatError(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        raw.close()


def _parse(stream: HeaderStream) -> SafetensorsHeader:
    path, size = stream.path, stream.file_size
    if size < 8:
        raise FormatError(path, f"file is {size} bytes, too short for a safetensors header", fix=_REFETCH)
    header_size = struct.unpack("<Q", stream.take(8, "header length"))[0]
    if header_size > size - 8:  # checked on opening; the file changed since
        raise FormatError(path, "is a truncated safetensors file (its header runs past the end of the file)",
                          fix=_REFETCH)
    if header_size > MAX_HEADER_BYTES:
        raise FormatError(path, f"safetensors header larger than the {MAX_HEADER_BYTES // (1 << 20)} MB limit "
                                "of the format", fix=_REFETCH)
    text = stream.take(header_size, "header")
    try:
        document = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"header is not valid UTF-8 (byte {exc.start})", fix=_REFETCH) from None
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError.msg says what was expected where, never the text itself
        reason = getattr(exc, "msg", "nested too deeply")
        raise FormatError(path, f"header is not valid JSON ({reason})", fix=_REFETCH) from None
    if not isinstance(document, dict):
        raise FormatError(path, f"header JSON is a {type(document).__name__}, expected an object")

    metadata = document.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "__metadata__ is not an object of strings")
    data_size = size - 8 - header_size
    tensors: dict[str, SafetensorsTensorInfo] = {}
    for name, entry in document.items():
        tensors[name] = _tensor_info(path, name, entry, 8 + header_size, data_size)
    _check_overlaps(path, tensors)
    return SafetensorsHeader(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                             header_size=header_size, file_size=size, bytes_read=stream.bytes_read)


def _tensor_info(path: str, name: str, entry: object, data_start: int, data_size: int) -> SafetensorsTensorInfo:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # JSON \ud800-style escapes decode to lone surrogates no tool can use as a key
        raise FormatError(path, "tensor name is not valid Unicode",
                          tensor=name.encode("utf-8", "backslashreplace").decode("ascii", "replace")) from None
    if not isinstance(entry, dict):
        raise FormatError(path, f"entry is a {type(entry).__name__}, expected an object", tensor=name)
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown = f" {dtype}" if isinstance(dtype, str) and len(dtype) <= 16 and dtype.isprintable() else ""
        raise FormatError(path, f"unknown dtype{shown}", tensor=name,
                          fix="written by a newer safetensors? known: " + ", ".join(DTYPE_BITS))
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise FormatError(path, "shape is not a list of non-negative integers", tensor=name)
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise FormatError(path, "data_offsets is not [begin, end]", tensor=name)
    begin, end = offsets
    n_elements = 1
    for s in shape:
        n_elements *= s
    bits = n_elements * DTYPE_BITS[dtype]
    expected = (bits + 7) // 8
    if end < begin or end - begin != expected:
        raise FormatError(path, f"data_offsets [{begin}, {end}] hold {end - begin} bytes but {dtype} "
                                f"{shape} needs {expected}", tensor=name)
    if end > data_size:
        raise FormatError(path, f"tensor data ends at byte {data_start + end}, past the end of the "
                                f"{data_start + data_size}-byte file (truncated?)", tensor=name, fix=_REFETCH)
    return SafetensorsTensorInfo(name=name, dtype=dtype, shape=tuple(shape), offset=data_start + begin,
                                 n_bytes=end - begin)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_overlaps(path: str, tensors: dict[str, SafetensorsTensorInfo]) -> None:
    spans = sorted((t for t in tensors.values() if t.n_bytes), key=lambda t: t.offset)
    for current, following in zip(spans, spans[1:], strict=False):
        if current.offset + current.n_bytes > following.offset:
            raise FormatError(path, f"tensor data overlaps tensor '{following.name}'", tensor=current.name)
