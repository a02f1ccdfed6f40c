"""Streaming GGUF writing on gguf-py's ``GGUFWriter``: tensor infos first, then the data one tensor at a time.

``GGUFWriter.add_tensor`` keeps every array until ``write_tensors_to_file`` (or spools them to a temp file): a full
model in RAM or on disk twice. Instead every tensor is *declared* (name, GGML type, shape: all known from the
source header before any data is read) with ``add_tensor_info``; header, metadata and tensor infos are written;
then each tensor's bytes go out through ``write_tensor_data`` as soon as they are quantized, and are freed.

Only long-standing GGUFWriter methods are used, so this also works with the older gguf-py Forge vendors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from lib_fluxq.quant import get_format

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION; city96's Flux files carry it too


def file_type_for(qtype: GGMLQuantizationType) -> int:
    """``general.file_type`` (llama_ftype) for a file whose main type is ``qtype``.

    Uniform K-quant files are the ``_S`` variants (as city96 names his Flux files: Q4_K_S, Q5_K_S, Q3_K_S).
    """
    names = ("ALL_F32",) if qtype == GGMLQuantizationType.F32 else (f"MOSTLY_{qtype.name}", f"MOSTLY_{qtype.name}_S")
    for name in names:
        member = getattr(gguf.LlamaFileType, name, None)
        if member is not None:
            return int(member)
    return int(getattr(gguf.LlamaFileType, "GUESSED", 1024))


@dataclass(frozen=True)
class DeclaredTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]   # logical torch shape (rows last)

    @property
    def n_bytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return get_format(self.qtype).packed_bytes(n)


class StreamingGGUFWriter:
    """``declare`` every tensor, ``begin`` (writes header, KV and tensor infos), ``write`` each in order, ``finish``.

    ``path`` is opened for writing by ``begin``; the caller owns temp-file naming and the final rename.
    """

    def __init__(self, path: str | os.PathLike[str], arch: str = "flux") -> None:
        self.path = os.fspath(path)
        self._writer = gguf.GGUFWriter(self.path, arch=arch)
        self._declared: list[DeclaredTensor] = []
        self._next = 0

    def add_string(self, key: str, value: str) -> None:
        self._writer.add_string(key, value)

    def add_uint32(self, key: str, value: int) -> None:
        self._writer.add_uint32(key, value)

    def add_standard_metadata(self, main_type: GGMLQuantizationType) -> None:
        self._writer.add_quantization_version(QUANTIZATION_VERSION)
        self._writer.add_file_type(file_type_for(main_type))

    def declare(self, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
        tensor = DeclaredTensor(name, GGMLQuantizationType(qtype), tuple(int(s) for s in shape))
        # a non-uint8 numpy dtype makes gguf-py take ``shape`` as the logical shape (not a byte shape)
        self._writer.add_tensor_info(name, tensor.shape, np.dtype(np.float32), tensor.n_bytes, raw_dtype=tensor.qtype)
        self._declared.append(tensor)

    @property
    def declared(self) -> list[DeclaredTensor]:
        return list(self._declared)

    def data_bytes(self) -> int:
        align = self._writer.data_alignment
        return sum(-(-t.n_bytes // align) * align for t in self._declared)

    def begin(self) -> None:
        self._writer.write_header_to_file()
        self._writer.write_kv_data_to_file()
        self._writer.write_ti_data_to_file()

    def write(self, name: str, packed: torch.Tensor | np.ndarray) -> None:
        expected = self._declared[self._next]
        array = packed.detach().cpu().contiguous().numpy() if isinstance(packed, torch.Tensor) else packed
        array = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if name != expected.name or array.nbytes != expected.n_bytes:
            raise ValueError(f"tensor {name} ({array.nbytes} bytes) does not match the declared "
                             f"{expected.name} ({expected.n_bytes} bytes)")
        self._writer.write_tensor_data(array)
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._declared):
            raise RuntimeError(f"{len(self._declared) - self._next} declared tensors were not written")
        self._writer.flush()
        files = self._writer.fout
        for fout in files if isinstance(files, list) else [files]:  # older gguf-py keeps a single file object
            if fout is not None:
                os.fsync(fout.fileno())
        self._writer.close()

    def close(self) -> None:
        """Close the file without finishing it (on error / cancel); the caller deletes it."""
        self._writer.close()
