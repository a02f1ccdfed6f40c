"""Quantized weights in torch: ``dequantize`` / ``quantize`` for every GGML type fluxq handles."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from gguf import GGMLQuantizationType

from lib_fluxq.quant.table import FORMATS, QuantFormat, get_format, resolve_qtype

__all__ = ["FORMATS", "QuantFormat", "dequantize", "get_format", "quantize", "resolve_qtype"]

QType = GGMLQuantizationType | str | int


def dequantize(packed: torch.Tensor, qtype: QType, shape: Sequence[int],
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed GGML bytes -> a ``shape`` tensor of ``dtype`` on ``packed``'s device.

    ``shape`` is the logical torch shape (rows contiguous, i.e. GGML's ``ne`` reversed). Computation is in float32,
    bit-identical to ggml's ``to_float``; float16 / bfloat16 results are that float32 result rounded once, written
    directly (no full-size float32 temporary). ``out`` (contiguous, ``shape``-sized, of ``dtype``) is filled and
    returned when given, which saves the allocation on repeated calls (see ``lib_fluxq.ops`` for a shared one).
    """
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in shape)
    n_elements = math.prod(shape)
    row = shape[-1] if shape else 1
    if row % fmt.block_size:
        raise ValueError(f"{fmt.name}: row length {row} is not a multiple of the block size {fmt.block_size}")
    expected = fmt.packed_bytes(n_elements)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"{fmt.name}: shape {list(shape)} needs {expected} packed bytes, got {packed.numel()} "
                         f"of {packed.dtype}")
    if out is not None and (out.dtype != dtype or out.numel() != n_elements or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n_elements} elements")
    if dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"dequantize: dtype must be one of {', '.join(str(d) for d in _OUTPUT_DTYPES)}, got {dtype}")
    blocks = packed.reshape(-1, fmt.type_size)
    if not blocks.is_contiguous():
        blocks = blocks.contiguous()
    result = out if out is not None else torch.empty(shape, dtype=dtype, device=packed.device)
    target = result.view(-1, fmt.block_size)
    if packed.device.type == "cuda" and _use_triton(fmt, blocks, target):
        from lib_fluxq.quant import triton_dequant
        triton_dequant.dequantize_blocks(fmt.name, blocks, target)
        return result.view(shape)
    step = _chunk_blocks(fmt, blocks)
    for start in range(0, blocks.shape[0], step):
        fmt.dequantize_blocks(blocks[start:start + step], target[start:start + step])
    return result.view(shape)


_OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# On CPU, kernels run in chunks of a million elements: their byte and float temporaries (per-thread scratch
# reused by every chunk and call) then stay cache-sized instead of being multi-MB allocations that the C allocator
# maps and page-faults on every call, and the per-op overhead (~1-3 us) stays small against each chunk's work.
# GPUs take the whole tensor in one go.
_CPU_CHUNK_ELEMENTS = 1 << 20


def _use_triton(fmt: QuantFormat, blocks: torch.Tensor, target: torch.Tensor) -> bool:
    """On CUDA, the fused Triton kernel where it exists and measured faster than the torch kernels on this GPU."""
    try:
        from lib_fluxq.quant import triton_dequant
    except Exception:
        return False
    return triton_dequant.choose(fmt.name, blocks, target, fmt.dequantize_blocks)


def _chunk_blocks(fmt: QuantFormat, blocks: torch.Tensor) -> int:
    if blocks.device.type != "cpu":
        return max(blocks.shape[0], 1)
    return max(_CPU_CHUNK_ELEMENTS // fmt.block_size, 1)


def quantize(values: torch.Tensor, qtype: QType) -> torch.Tensor:
    """A ``(..., row)`` float tensor -> uint8 ``(rows, row_bytes)`` in GGML layout (reference algorithm)."""
    fmt = get_format(qtype)
    row = values.shape[-1] if values.dim() else 1
    if row % fmt.block_size:
        raise ValueError(f"{fmt.name}: row length {row} is not a multiple of the block size {fmt.block_size}")
    rows = values.numel() // max(row, 1)
    blocks = values.reshape(-1, fmt.block_size).float().contiguous()
    return fmt.quantize_blocks(blocks).reshape(rows, fmt.row_bytes(row))
