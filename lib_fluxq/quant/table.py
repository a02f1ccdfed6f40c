"""The one table of per-type behaviour: GGML type -> block size, bytes per block, dequantizer, quantizer.

Block sizes and byte counts come from gguf-py's ``GGML_QUANT_SIZES`` (the field's vocabulary), so this table and
every GGUF file agree by construction. Kernels live in ``dequant.py`` / ``quantize.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lib_fluxq.errors import UnsupportedTypeError
from lib_fluxq.quant import dequant as dq
from lib_fluxq.quant import quantize as qz

DequantKernel = Callable[[torch.Tensor, torch.Tensor], None]
QuantKernel = Callable[[torch.Tensor], torch.Tensor]
T = GGMLQuantizationType


@dataclass(frozen=True)
class QuantFormat:
    qtype: GGMLQuantizationType
    block_size: int          # elements per block
    type_size: int           # bytes per block
    dequantize_blocks: DequantKernel  # (n_blocks, type_size) uint8 -> writes (n_blocks, block_size) float32 out
    quantize_blocks: QuantKernel      # (n_blocks, block_size) float32 -> (n_blocks, type_size) uint8

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, row_length: int) -> int:
        return row_length // self.block_size * self.type_size

    def packed_bytes(self, n_elements: int) -> int:
        return n_elements // self.block_size * self.type_size


_ROWS: list[tuple[GGMLQuantizationType, DequantKernel, QuantKernel]] = [
    (T.F32, dq.dequant_f32, qz.quant_f32),
    (T.F16, dq.dequant_f16, qz.quant_f16),
    (T.BF16, dq.dequant_bf16, qz.quant_bf16),
    (T.Q8_0, dq.dequant_q8_0, qz.quant_q8_0),
    (T.Q6_K, dq.dequant_q6_k, qz.quant_q6_k),
    (T.Q5_K, dq.dequant_q5_k, qz.quant_q5_k),
    (T.Q5_1, dq.dequant_q5_1, qz.quant_q5_1),
    (T.Q5_0, dq.dequant_q5_0, qz.quant_q5_0),
    (T.Q4_K, dq.dequant_q4_k, qz.quant_q4_k),
    (T.Q4_1, dq.dequant_q4_1, qz.quant_q4_1),
    (T.Q4_0, dq.dequant_q4_0, qz.quant_q4_0),
    (T.Q3_K, dq.dequant_q3_k, qz.quant_q3_k),
    (T.Q2_K, dq.dequant_q2_k, qz.quant_q2_k),
    (T.IQ4_NL, dq.dequant_iq4_nl, qz.quant_iq4_nl),
    (T.IQ4_XS, dq.dequant_iq4_xs, qz.quant_iq4_xs),
]

FORMATS: dict[GGMLQuantizationType, QuantFormat] = {
    qtype: QuantFormat(qtype, *GGML_QUANT_SIZES[qtype], dequantize, quantize)
    for qtype, dequantize, quantize in _ROWS
}


def resolve_qtype(qtype: GGMLQuantizationType | str | int) -> GGMLQuantizationType:
    """Accept an enum member, its name ('Q4_K', 'q4_k') or its integer id."""
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return GGMLQuantizationType[qtype.strip().upper()]
        except KeyError:
            raise UnsupportedTypeError(
                f"unknown quantization type '{qtype}'; known: {', '.join(t.name for t in FORMATS)}") from None
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise UnsupportedTypeError(f"unknown GGML type id {qtype}") from None


def get_format(qtype: GGMLQuantizationType | str | int) -> QuantFormat:
    resolved = resolve_qtype(qtype)
    fmt = FORMATS.get(resolved)
    if fmt is None:
        raise UnsupportedTypeError(
            f"GGML type {resolved.name} is not supported by fluxq; supported: {', '.join(t.name for t in FORMATS)}")
    return fmt
