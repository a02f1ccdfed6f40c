"""Torch dequantization kernels, one per GGML block layout.

Each kernel takes ``blocks``, a contiguous ``(n_blocks, type_size)`` uint8 tensor (CPU or CUDA), and writes
``(n_blocks, block_size)`` float32 into ``out``. Writing into a given buffer with in-place float ops keeps the number
of full-size float passes (the cost that matters) at two or three, and lets callers reuse buffers. The kernels follow
ggml's ``dequantize_row_*`` (ggml-quants.c) operation by operation, including the order of float multiplications,
so the fp32 results are bit-identical to ggml's ``to_float``. The per-type facts (block size, bytes) live in
``table.py``; this module only knows byte layouts.
"""

from __future__ import annotations

import torch

# ggml's non-linear 4-bit codebook for IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml-common.h).
IQ4_CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_codebook_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _codebook(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = (device, dtype)
    table = _codebook_cache.get(key)
    if table is None:
        table = _codebook_cache[key] = torch.tensor(IQ4_CODEBOOK, dtype=dtype, device=device)
    return table


def _f16(blocks: torch.Tensor, start: int, count: int = 1) -> torch.Tensor:
    """fp16 field(s) at byte ``start`` of every block, as float32 ``(n_blocks, count)``.

    Every finite, infinite and NaN scale converts as in ggml; only NaN *payloads* may differ (torch's scalar tail
    path canonicalises them), which no quantizer ever produces.
    """
    return blocks[:, start:start + 2 * count].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``(..., k)`` bytes -> ``(..., 2k)`` values: the k low nibbles, then the k high nibbles (ggml's order)."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


_bit_tables: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _bits(packed: torch.Tensor, per_byte: int, width: int) -> torch.Tensor:
    """``(..., k)`` bytes -> ``(..., k, per_byte)`` fields of ``width`` bits, lowest bits first.

    A 256-row lookup table gathered with ``index_select`` is ~3x faster than broadcasting shifts over a tiny inner
    dimension, which torch's elementwise loops do not vectorize.
    """
    key = (per_byte, width, packed.device)
    table = _bit_tables.get(key)
    if table is None:
        shifts = torch.arange(0, per_byte * width, width)
        table = ((torch.arange(256).unsqueeze(1) >> shifts) & ((1 << width) - 1)).to(torch.uint8)
        table = _bit_tables[key] = table.to(packed.device)
    fields = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return fields.view(*packed.shape, per_byte)


# --- plain floats -----------------------------------------------------------------------------------------------

def dequant_f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))


def dequant_f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float16))


def dequant_bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))


# --- legacy 32-element blocks -----------------------------------------------------------------------------------

def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:].view(torch.int8))
    out.mul_(_f16(blocks, 0))  # ggml: x[j] = qs[j] * d


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 2:]).view(torch.int8) - 8)
    out.mul_(_f16(blocks, 0))


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 4:]))
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))  # ggml: x0*d + m (two roundings, no FMA)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes -> 32 bits as 0/16, bit j belongs to element j."""
    return _bits(qh, 8, 1).flatten(-2) << 4


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_((_nibbles(blocks[:, 6:]) | _high_bits_32(blocks[:, 2:6])).view(torch.int8) - 16)
    out.mul_(_f16(blocks, 0))


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_nibbles(blocks[:, 8:]) | _high_bits_32(blocks[:, 4:8]))
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def dequant_iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(_codebook(blocks.device)[_nibbles(blocks[:, 2:]).long()])
    out.mul_(_f16(blocks, 0))  # ggml: d * kvalues[q]


# --- K-quants: 256-element super-blocks ---------------------------------------------------------------------------

def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((low & 63, (high & 0x0F) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, mn


def _sub_scales_k4(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-element sub-block ``d * sc`` and ``dmin * m`` as ``(n, 8, 1)`` float32 (ggml's d1, m1)."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    return (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


def dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d_sub, m_sub = _sub_scales_k4(blocks)
    y = out.view(n, 8, 32)
    y.copy_(_nibbles(blocks[:, 16:].view(n, 4, 32)).view(n, 8, 32))  # 32 low nibbles, then 32 high, per 64
    y.mul_(d_sub).sub_(m_sub)  # ggml: d1 * q - m1


def dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d_sub, m_sub = _sub_scales_k4(blocks)
    low = _nibbles(blocks[:, 48:].view(n, 4, 32)).view(n, 8, 32)
    high = _bits(blocks[:, 16:48], 8, 1).transpose(1, 2) << 4  # bit s of qh[l] -> sub-block s
    y = out.view(n, 8, 32)
    y.copy_(low | high)
    y.mul_(d_sub).sub_(m_sub)


def dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    ql = blocks[:, 0:128].view(n, 2, 2, 32)          # (half, 32-byte row, l)
    qh = blocks[:, 128:192].view(n, 2, 32)
    scales = blocks[:, 192:208].view(torch.int8).float().view(n, 16, 1)
    d = _f16(blocks, 208).view(n, 1, 1)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2)     # (n, 2, 4, 32): q1..q4 low bits
    high = _bits(qh, 4, 2).permute(0, 1, 3, 2) << 4  # (n, 2, 4, 32)
    y = out.view(n, 16, 16)
    y.copy_(((low | high).view(torch.int8) - 32).view(n, 16, 16))
    y.mul_(d * scales)  # ggml: d * sc * q, i.e. (d * sc) * q


def _scales_q3_k(raw: torch.Tensor) -> torch.Tensor:
    """Q3_K: 12 bytes -> sixteen 6-bit scales (ggml's kmask unpacking), minus 32, as float."""
    low = torch.cat((raw[:, 0:8] & 0x0F, raw[:, 0:8] >> 4), dim=-1)        # (n, 16)
    high = _bits(raw[:, 8:12], 4, 2).transpose(1, 2).reshape(-1, 16)      # scale k: byte 8 + k%4, bits 2*(k//4)
    return ((low | (high << 4)).view(torch.int8) - 32).float()


def _crumbs_k(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: 64 bytes of 2-bit values -> (n, 8, 32): per 128-half, shift 0/2/4/6 over the half's 32 bytes."""
    n = qs.shape[0]
    return _bits(qs.view(n, 2, 32), 4, 2).permute(0, 1, 3, 2).reshape(n, 8, 32)


def dequant_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = _f16(blocks, 108)
    dl = (d * _scales_q3_k(blocks[:, 96:108])).view(n, 16, 1)
    high_set = _bits(blocks[:, 0:32], 8, 1).transpose(1, 2)               # (n, 8, 32): bit k of hmask[l]
    q = _crumbs_k(blocks[:, 32:96]).view(torch.int8) - ((1 - high_set) << 2).view(torch.int8)  # q - (hm ? 0 : 4)
    y = out.view(n, 16, 16)
    y.copy_(q.view(n, 16, 16))
    y.mul_(dl)


def dequant_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    y = out.view(n, 16, 16)
    y.copy_(_crumbs_k(blocks[:, 16:80]).view(n, 16, 16))
    y.mul_(dl).sub_(ml)


def dequant_iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    scales_h = _bits(blocks[:, 2:4], 4, 2).reshape(n, 8)                   # 2 bits per sub-block, lowest first
    scales_l = _nibbles(blocks[:, 4:8])                                     # low nibbles are even sub-blocks
    scales_l = torch.stack((scales_l[:, 0:4], scales_l[:, 4:8]), dim=-1).reshape(n, 8)
    dl = (d * ((scales_l | (scales_h << 4)).float() - 32)).unsqueeze(-1)
    y = out.view(n, 8, 32)
    y.copy_(_codebook(blocks.device)[_nibbles(blocks[:, 8:].view(n, 8, 16)).long()])
    y.mul_(dl)
