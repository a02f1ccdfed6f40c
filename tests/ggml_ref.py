"""The ggml C library (PyPI ``libggml-python``) through ctypes: the reference every kernel is checked against.

Dev/test only. ``quantize`` is ``ggml_quantize_chunk`` (no importance matrix), ``to_float`` is the type traits'
``to_float`` — ggml's own scalar reference code, single-threaded.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import libggml
import numpy as np

_LIB = ctypes.CDLL(str(Path(libggml.__file__).parent / "lib64" / "libggml-base.so"))


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_LIB.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
_LIB.ggml_get_type_traits.argtypes = [ctypes.c_int]
_LIB.ggml_quantize_chunk.restype = ctypes.c_size_t
_LIB.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p]
_LIB.ggml_row_size.restype = ctypes.c_size_t
_LIB.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
_LIB.ggml_quantize_init.argtypes = [ctypes.c_int]
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def traits(qtype: int) -> _TypeTraits:
    return _LIB.ggml_get_type_traits(int(qtype)).contents


def row_size(qtype: int, n_per_row: int) -> int:
    return int(_LIB.ggml_row_size(int(qtype), n_per_row))


def quantize(values: np.ndarray, qtype: int) -> np.ndarray:
    """float32 ``(rows, n_per_row)`` -> uint8 ``(rows, row_bytes)`` by ``ggml_quantize_chunk``."""
    src = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = src.shape
    dst = np.zeros((rows, row_size(qtype, n_per_row)), dtype=np.uint8)
    _LIB.ggml_quantize_init(int(qtype))
    written = _LIB.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, n_per_row, None)
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst


def to_float_fn(qtype: int):
    return _TO_FLOAT(traits(qtype).to_float)


def dequantize(packed: np.ndarray, qtype: int, n_elements: int) -> np.ndarray:
    """Packed bytes -> flat float32 by the type traits' ``to_float``."""
    src = np.ascontiguousarray(packed, dtype=np.uint8)
    if int(qtype) == 0:  # F32 has no to_float: the bytes are the values
        return src.view(np.float32).reshape(-1).copy()
    out = np.empty(n_elements, dtype=np.float32)
    to_float_fn(qtype)(src.ctypes.data, out.ctypes.data, n_elements)
    return out
