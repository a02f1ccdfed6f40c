"""Streaming safetensors reading: parse the header, then read one tensor at a time from disk.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a conversion touches stays resident
(and counted in RSS) until the file is closed, so converting a 24 GB checkpoint would look like it needs 24 GB. Here
each tensor is read with a positioned read into a fresh buffer that is freed once the caller drops it.

The header layout (8-byte little-endian length, JSON with ``dtype``/``shape``/``data_offsets`` per tensor, optional
``__metadata__``) is the published safetensors format; every field is validated so a damaged file gets a
FormatError naming the file and tensor instead of garbage values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lib_fluxq.errors import FormatError
from lib_fluxq.formats import detect
from lib_fluxq.formats.safetensors_header import read_safetensors_header

# safetensors dtype code -> torch dtype. F8 codes are what PyTorch/ComfyUI FP8 checkpoints use.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


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
        # the one header parser (validates every field, diagnoses non-safetensors files by content)
        header = read_safetensors_header(self.path)
        self.metadata = header.metadata
        self.entries: dict[str, TensorEntry] = {}
        for info in header.tensors.values():
            if info.dtype not in TORCH_DTYPES:
                raise FormatError(self.path, f"unsupported dtype {info.dtype}", tensor=info.name,
                                  fix="fluxq reads " + ", ".join(TORCH_DTYPES))
            self.entries[info.name] = TensorEntry(name=info.name, dtype=info.dtype, shape=info.shape,
                                                  start=info.offset, n_bytes=info.n_bytes)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for positioned reads, closed in close()
        except OSError as exc:
            raise detect.path_error(self.path, exc) from None

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
