"""Streaming safetensors reading: parse the header, then read one tensor at a time from disk.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a conversion touches stays resident
(and counted in RSS) until the file is closed, so converting a 24 GB checkpoint would look like it needs 24 GB. Here
each tensor is read with a positioned read into a fresh buffer that is freed once the caller drops it.

The header layout (8-byte little-endian length, JSON with ``dtype``/``shape``/``data_offsets`` per tensor, optional
``__metadata__``) is the published safetensors format; every field is validated so a damaged file gets a
FormatError naming the file and tensor instead of garbage values.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lib_fluxq.errors import FormatError

# safetensors dtype code -> torch dtype. F8 codes are what PyTorch/ComfyUI FP8 checkpoints use.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; ``start`` is the absolute byte offset in the file."""

    name: str
    dtype: str                 # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


class SafetensorsReader:
    """A safetensors file opened for tensor-by-tensor reading (header parsed eagerly, data read on demand)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FormatError(self.path, "file not found", fix="check the path")
        if os.path.isdir(self.path):
            raise FormatError(self.path, "is a directory, not a .safetensors file")
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for positioned reads, closed in close()
        except OSError as exc:
            raise FormatError(self.path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            self.metadata, self.entries = _parse_header(self.path, self._file)
        except BaseException:
            self._file.close()
            raise

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype (a fresh CPU tensor, not a view of a map)."""
        entry = self.entries[name]
        buffer = torch.empty(entry.n_bytes, dtype=torch.uint8)
        if entry.n_bytes:
            view = memoryview(buffer.numpy())
            done = 0
            while done < entry.n_bytes:
                got = _seek_read(self._file, view[done:], entry.start + done)  # portable (no pread on Windows)
                if got <= 0:
                    raise FormatError(self.path, "file ends inside the tensor data (truncated file?)", tensor=name,
                                      fix="the file is damaged or truncated; download it again")
                done += got
        return buffer.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsReader:
    return SafetensorsReader(path)


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Only the header: ``(metadata, entries)``; never reads tensor data."""
    with SafetensorsReader(path) as reader:
        return reader.metadata, reader.entries


def _seek_read(file, view: memoryview, position: int) -> int:
    file.seek(position)
    return file.readinto(view) or 0


def _parse_header(path: str, file) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    file_size = os.fstat(file.fileno()).st_size
    head = file.read(8)
    if len(head) < 8:
        raise FormatError(path, f"file is {file_size} bytes, too short for a safetensors header",
                          fix="the download or copy was probably cut short; fetch the file again")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise FormatError(path, f"not a safetensors file (header length {header_len} does not fit the "
                                f"{file_size}-byte file)",
                          fix="check the file extension; a .gguf/.ckpt file needs its own loader")
    try:
        header = json.loads(file.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise FormatError(path, "not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise FormatError(path, "__metadata__ is not a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, data_size)
    spans = sorted((e.start, e.start + e.n_bytes, e.name) for e in entries.values() if e.n_bytes)
    for (_, end, name), (next_start, _, next_name) in zip(spans, spans[1:], strict=False):
        if end > next_start:
            raise FormatError(path, f"tensor data overlaps tensor '{next_name}'", tensor=name,
                              fix="the file is damaged; download it again")
    return {str(k): str(v) for k, v in metadata.items()}, entries


def _entry(path: str, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise FormatError(path, "header entry is not a JSON object", tensor=name)
    dtype = info.get("dtype")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if dtype not in TORCH_DTYPES:
        raise FormatError(path, f"unsupported dtype {dtype!r}", tensor=name)
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise FormatError(path, f"invalid shape {shape!r}", tensor=name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise FormatError(path, f"invalid data_offsets {offsets!r}", tensor=name)
    n_bytes = offsets[1] - offsets[0]
    expected = math.prod(shape) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    if n_bytes != expected:
        raise FormatError(path, f"{dtype} tensor of shape {shape} needs {expected} bytes, the header gives "
                                f"{n_bytes}", tensor=name, fix="the file is damaged; download it again")
    if offsets[1] > data_size:
        raise FormatError(path, f"tensor data runs past the end of the file ({offsets[1]} > {data_size} data bytes)",
                          tensor=name, fix="the file is truncated; download it again")
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=data_start + offsets[0], n_bytes=n_bytes)
