"""Memory-mapped GGUF reading on top of gguf-py's ``GGUFReader``.

Opening a file maps it and parses the header; tensor bytes are never read until a tensor is used: each tensor's
``data`` is a torch uint8 view over the map (zero copy), so RAM grows only with the pages a caller touches.

Only long-standing GGUFReader API is used (``fields``, ``tensors``, ``ReaderTensor.{name, tensor_type, shape,
n_elements, n_bytes, data_offset, data}``), because inside Forge ``import gguf`` yields Forge's older vendored copy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from lib_fluxq.errors import FormatError, UnsupportedTypeError
from lib_fluxq.formats import detect
from lib_fluxq.formats.gguf_header import read_gguf_header
from lib_fluxq.quant import dequantize, get_format

GGUF_MAGIC = detect.GGUF_MAGIC
_MIN_HEADER_BYTES = 24  # magic, version, tensor count, kv count


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a mapped GGUF file."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]   # logical torch shape (GGML's ne reversed)
    data: torch.Tensor       # packed bytes, uint8, a view over the file map
    path: str

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def n_bytes(self) -> int:
        return self.data.numel()

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        packed = self.data if device is None else self.data.to(device, non_blocking=True)
        return dequantize(packed, self.qtype, self.shape, dtype)


class GGUFFile:
    """A GGUF file opened memory-mapped: ``metadata`` (decoded KV pairs) and ``tensors`` (name -> GGUFTensor)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _check_container(self.path)
        try:
            # 'c' = private copy-on-write map: numpy views are writable (torch needs that to wrap them without a
            # warning) while the file itself can never be modified through them.
            self._reader = GGUFReader(self.path, "c")
        except Exception as exc:  # GGUFReader raises bare ValueError/IndexError/struct errors on bad input
            raise _diagnose(self.path, exc) from exc
        self.metadata: dict[str, Any] = {name: _field_value(field) for name, field in self._reader.fields.items()}
        self.tensors: dict[str, GGUFTensor] = {}
        for reader_tensor in self._reader.tensors:
            tensor = _wrap_tensor(self.path, reader_tensor)
            self.tensors[tensor.name] = tensor
        _check_layout(self.path, self._reader, os.path.getsize(self.path))

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def __getitem__(self, name: str) -> GGUFTensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def close(self) -> None:
        """Drop our references to the map; it is unmapped once no tensor view is alive."""
        self.tensors = {}
        self._reader = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open ``path`` memory-mapped. Raises FormatError (naming file and tensor) for anything malformed."""
    return GGUFFile(path)


def _check_container(path: str) -> None:
    """A readable regular file that starts like a GGUF, else the FormatError that says what it is instead."""
    found = detect.require(path, detect.GGUF)
    if found.size < _MIN_HEADER_BYTES:
        raise FormatError(path, f"file is {found.size} bytes, too short for a GGUF header",
                          fix="the download or copy was probably cut short; fetch the file again")


def _diagnose(path: str, exc: Exception) -> FormatError:
    """Turn GGUFReader's low-level exception into a precise message (file, tensor, fix) via our header parser."""
    try:
        read_gguf_header(path)
    except FormatError as precise:
        return precise
    except Exception:  # the diagnosis must never hide the original problem
        pass
    # gguf-py's own message may quote values read from the file: name only the kind of failure
    return FormatError(path, f"malformed GGUF ({type(exc).__name__} in gguf-py's reader)",
                       fix="the file is damaged or truncated; download it again")


def _wrap_tensor(path: str, reader_tensor: Any) -> GGUFTensor:
    name = str(reader_tensor.name)
    try:
        qtype = GGMLQuantizationType(int(reader_tensor.tensor_type))
        fmt = get_format(qtype)
    except (ValueError, UnsupportedTypeError) as exc:
        raise FormatError(path, str(exc), tensor=name,
                          fix="convert the file to a supported type with `python -m lib_fluxq convert`") from None
    shape = tuple(int(s) for s in reversed(list(reader_tensor.shape)))
    if any(s <= 0 for s in shape):
        raise FormatError(path, f"invalid shape {list(shape)}", tensor=name)
    n_elements = int(np.prod(shape, dtype=np.int64))
    expected = fmt.packed_bytes(n_elements)
    if shape[-1] % fmt.block_size:
        raise FormatError(path, f"row length {shape[-1]} is not a multiple of the {fmt.name} block size "
                                f"{fmt.block_size}", tensor=name)
    array = reader_tensor.data
    if array.nbytes != expected:
        raise FormatError(path, f"{fmt.name} tensor of shape {list(shape)} needs {expected} bytes, the file holds "
                                f"{array.nbytes} (truncated file?)", tensor=name,
                          fix="the file is damaged or truncated; download it again")
    flat = np.asarray(array).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # older numpy/torch combos warn about memmap subclasses
        data = torch.from_numpy(flat)
    return GGUFTensor(name=name, qtype=qtype, shape=shape, data=data, path=path)


def _check_layout(path: str, reader: GGUFReader, file_size: int) -> None:
    """Tensor byte ranges must lie inside the file and not overlap (else a byte count disagrees with a shape)."""
    spans = sorted((int(t.data_offset), int(t.n_bytes), str(t.name)) for t in reader.tensors)
    for (start, length, name), following in zip(spans, [*spans[1:], (file_size, 0, None)], strict=True):
        end = start + length
        if end > file_size:
            raise FormatError(path, f"tensor data runs past the end of the file ({end} > {file_size} bytes)",
                              tensor=name, fix="the file is truncated; download it again")
        if end > following[0]:
            raise FormatError(path, f"tensor data overlaps tensor '{following[2]}': its byte count does not match "
                                    "its shape", tensor=name)


def _field_value(field: Any) -> Any:
    """Decode a ReaderField to Python (scalars, str, lists) without relying on newer gguf-py helpers."""
    types = list(field.types)
    if not types:
        return None

    def item(index: int, value_type: GGUFValueType) -> Any:
        part = field.parts[index]
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0] if len(part) else None
        return value.item() if hasattr(value, "item") else value

    if types[0] == GGUFValueType.ARRAY:
        element_type = types[-1] if len(types) > 1 else GGUFValueType.UINT8
        return [item(i, element_type) for i in field.data]
    return item(field.data[0], types[0])
