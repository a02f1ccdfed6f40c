"""The torch dequantizers fluxq is compared with, re-implemented here from reading their published algorithms (not
copied): what ComfyUI-GGUF (city96) does per forward, and what Forge dfdcbab6 does (a one-time "bake" into its own
layout, then per forward). Bench-only: Q8_0, Q4_0 and Q4_K, the types the forward targets name.

Both compute in the compute dtype (bf16 / fp16): the fp16 scale is converted to it first and products and offsets
are rounded in it, where fluxq computes ggml's float32 value and rounds once. Forge additionally stores Q4_K's
sub-block scales multiplied out in the compute dtype and re-packs 4-bit values in element order, read through a
65,536-entry table (two bytes -> four values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Dequantizer = Callable[[torch.Tensor], torch.Tensor]


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((low & 63, (high & 15) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, mn


# --- ComfyUI-GGUF style: dequantize the GGML bytes per call, arithmetic in the compute dtype -----------------------

def comfy_style(qtype: str, packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Dequantizer:
    sizes = {"Q8_0": 34, "Q4_0": 18, "Q4_K": 144}
    blocks = packed.reshape(-1, sizes[qtype])
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)

    def q8_0(_: torch.Tensor) -> torch.Tensor:
        d = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
        return (d * blocks[:, 2:].view(torch.int8)).reshape(shape)

    def q4_0(_: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = blocks[:, :2].contiguous().view(torch.float16).to(dtype)
        qs = (blocks[:, 2:].reshape(n, -1, 1, 16) >> shifts) & 15
        return (d * (qs.reshape(n, 32).view(torch.int8) - 8)).reshape(shape)

    def q4_k(_: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d = blocks[:, 0:2].contiguous().view(torch.float16).to(dtype)
        dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(dtype)
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        d_sub, m_sub = (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)
        qs = ((blocks[:, 16:].reshape(n, 4, 1, 32) >> shifts) & 15).reshape(n, 8, 32)
        return (d_sub * qs - m_sub).reshape(shape)

    return {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_K": q4_k}[qtype]


# --- Forge style: bake once (layout rewrite), then dequantize the baked bytes per call -----------------------------

def _pairs(nibbles: torch.Tensor) -> torch.Tensor:
    """GGML nibble bytes (lows = first half of the elements, highs = second) -> bytes packing elements 2j, 2j+1."""
    values = torch.cat((nibbles & 15, nibbles >> 4), dim=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpack_table(offset: int) -> torch.Tensor:
    """uint16 (two bytes) -> four 4-bit values (minus ``offset``) as one int32: Forge's quick_unpack table."""
    word = torch.arange(65536, dtype=torch.int32)
    values = torch.stack([(word >> shift) & 15 for shift in (0, 4, 8, 12)], dim=-1) - offset
    return values.to(torch.int8).contiguous().view(torch.int32).reshape(65536)


def forge_style(qtype: str, packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Dequantizer:
    sizes = {"Q8_0": 34, "Q4_0": 18, "Q4_K": 144}
    blocks = packed.reshape(-1, sizes[qtype])
    n = blocks.shape[0]

    def in_dtype(raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.float16).to(dtype).view(torch.uint8)

    if qtype == "Q8_0":
        baked = torch.cat((in_dtype(blocks[:, :2]), blocks[:, 2:]), dim=-1).contiguous()

        def dequantize(_: torch.Tensor) -> torch.Tensor:
            return (baked[:, 2:].view(torch.int8) * baked[:, :2].view(dtype)).reshape(shape)
        return dequantize

    if qtype == "Q4_0":
        baked = torch.cat((in_dtype(blocks[:, :2]), _pairs(blocks[:, 2:])), dim=-1).contiguous()
        table = _unpack_table(8)

        def dequantize(_: torch.Tensor) -> torch.Tensor:
            index = baked[:, 2:].contiguous().view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).reshape(-1)
            q = torch.index_select(table, 0, index).view(torch.int8).view(n, 32)
            return (baked[:, :2].view(dtype) * q).reshape(shape)
        return dequantize

    d = blocks[:, 0:2].contiguous().view(torch.float16).to(dtype)
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(dtype)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    baked = torch.cat(((d * sc).view(torch.uint8), (dmin * mn).view(torch.uint8),
                       _pairs(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 128)), dim=-1).contiguous()
    table = _unpack_table(0)

    def dequantize(_: torch.Tensor) -> torch.Tensor:
        d_sub = baked[:, 0:16].view(dtype).reshape(n, 8, 1)
        m_sub = baked[:, 16:32].view(dtype).reshape(n, 8, 1)
        index = baked[:, 32:].contiguous().view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF).reshape(-1)
        q = torch.index_select(table, 0, index).view(torch.uint8).view(n, 8, 32)
        return (d_sub * q - m_sub).reshape(shape)
    return dequantize
