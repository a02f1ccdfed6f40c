"""Streaming safetensors writing: declare every tensor first, then write the data one tensor at a time.

``safetensors.torch.save_file`` needs the whole state dict in memory; a converter cannot afford that. Because the
header lists every tensor's dtype, shape and byte range, all of them can be laid out before any data exists: the
header is written first and each tensor's bytes follow in declaration order.
"""

from __future__ import annotations

import json
import math
from typing import BinaryIO

import torch

from lib_fluxq.formats.safetensors_read import SAFETENSORS_CODES, TORCH_DTYPES

_ALIGN = 8  # the format pads the header so the data starts 8-byte aligned


class StreamingSafetensorsWriter:
    """Write to an open binary file: ``declare`` all tensors, ``write_header``, then ``write`` each in order."""

    def __init__(self, file: BinaryIO, metadata: dict[str, str] | None = None) -> None:
        self._file = file
        self._metadata = dict(metadata or {})
        self._declared: list[tuple[str, str, tuple[int, ...], int]] = []
        self._next = 0
        self._header_written = False

    def declare(self, name: str, dtype: torch.dtype | str, shape: tuple[int, ...]) -> None:
        code = dtype if isinstance(dtype, str) else SAFETENSORS_CODES[dtype]
        n_bytes = math.prod(shape) * torch.empty((), dtype=TORCH_DTYPES[code]).element_size()
        self._declared.append((name, code, tuple(int(s) for s in shape), n_bytes))

    @property
    def total_bytes(self) -> int:
        """File size once complete (header included)."""
        return 8 + len(self._header_bytes()) + sum(d[3] for d in self._declared)

    def _header_bytes(self) -> bytes:
        header: dict[str, object] = {}
        if self._metadata:
            header["__metadata__"] = self._metadata
        offset = 0
        for name, code, shape, n_bytes in self._declared:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
            offset += n_bytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return encoded + b" " * (-(8 + len(encoded)) % _ALIGN)

    def write_header(self) -> None:
        if len({d[0] for d in self._declared}) != len(self._declared):
            raise ValueError("duplicate tensor names")
        header = self._header_bytes()
        self._file.write(len(header).to_bytes(8, "little"))
        self._file.write(header)
        self._header_written = True

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._header_written:
            raise RuntimeError("write_header() first")
        expected_name, code, shape, n_bytes = self._declared[self._next]
        if name != expected_name or TORCH_DTYPES[code] != tensor.dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match declaration "
                             f"{expected_name} {code} {shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._declared):
            missing = self._declared[self._next][0]
            raise RuntimeError(f"{len(self._declared) - self._next} declared tensors not written (next: {missing})")
