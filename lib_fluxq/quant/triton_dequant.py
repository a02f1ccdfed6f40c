"""Fused GPU dequantization with Triton: one kernel per GGML type reads the packed bytes once and writes each value
once, straight in the output dtype (the torch kernels of dequant.py take 3-5 passes and a float32 temporary).

Same arithmetic as ggml's ``dequantize_row_*``: float32, ggml's order of multiplications, and no fused multiply-add
(launched with ``enable_fp_fusion=False``: a contracted ``d1 * q - m1`` would round once where ggml rounds twice), so
float32 output is bit-identical to ggml and half outputs are that value rounded once. Checked on CPU by Triton's
interpreter (``TRITON_INTERPRET=1``, tests/test_triton_dequant.py) and on a GPU by bench/gpu.py.

Optional: without the ``triton`` package (CPU installs, Forge on Windows) ``available()`` is False and nothing here is
used. ``lib_fluxq.quant.dequantize`` calls it on CUDA only where it measured faster than the torch path on this GPU
(``choose``), so a slower or broken Triton can never make a forward slower.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a Triton that cannot initialise here
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _f16_at(halves, index):
        """fp16 stored at int16 ``index`` of the blocks, as float32 (every bit pattern as ggml converts it)."""
        return tl.load(halves + index).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _store(out, block, element, values, block_size: tl.constexpr, mask):
        if out.dtype.element_ty == tl.bfloat16:
            # float32 -> bfloat16 rounded to nearest even by integer arithmetic (NaN stays NaN): the same on a GPU
            # and in the interpreter, whose own bf16 conversion truncates.
            bits = values.to(tl.int32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
            rounded = tl.where(values != values, 0x7FC0, rounded)
            stored = rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            stored = values.to(out.dtype.element_ty)
        tl.store(out + block[:, None] * block_size + element[None, :], stored, mask=mask[:, None])

    @triton.jit
    def _q8_0(raw, halves, out, n_blocks, BLOCKS: tl.constexpr):
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 32)
        d = _f16_at(halves, block * 17)
        q = tl.load(raw + block[:, None] * 34 + 2 + element[None, :]).to(tl.int8, bitcast=True)
        _store(out, block, element, q.to(tl.float32) * d[:, None], 32, mask)

    @triton.jit
    def _legacy4(raw, halves, out, n_blocks, type_size: tl.constexpr, qs_at: tl.constexpr, high_at: tl.constexpr,
                 offset: tl.constexpr, has_min: tl.constexpr, BLOCKS: tl.constexpr):
        """Q4_0, Q4_1, Q5_0, Q5_1: element j < 16 is the low nibble of byte j, j >= 16 the high nibble of byte j - 16;
        5-bit types add bit j of the 32-bit qh as bit 4. Value (q - offset) * d, or q * d + m."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 32)
        byte = tl.load(raw + block[:, None] * type_size + qs_at + (element[None, :] % 16)).to(tl.int32)
        q = tl.where(element[None, :] < 16, byte & 15, byte >> 4)
        if high_at > 0:
            qh = tl.load(raw + block[:, None] * type_size + high_at + element[None, :] // 8).to(tl.int32)
            q = q | (((qh >> (element[None, :] % 8)) & 1) << 4)
        d = _f16_at(halves, block * (type_size // 2))
        if has_min:
            m = _f16_at(halves, block * (type_size // 2) + 1)
            values = q.to(tl.float32) * d[:, None] + m[:, None]
        else:
            values = (q - offset).to(tl.float32) * d[:, None]
        _store(out, block, element, values, 32, mask)

    @triton.jit
    def _iq4_nl(raw, halves, codebook, out, n_blocks, BLOCKS: tl.constexpr):
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 32)
        byte = tl.load(raw + block[:, None] * 18 + 2 + (element[None, :] % 16)).to(tl.int32)
        q = tl.where(element[None, :] < 16, byte & 15, byte >> 4)
        d = _f16_at(halves, block * 9)
        _store(out, block, element, d[:, None] * tl.load(codebook + q).to(tl.float32), 32, mask)

    @triton.jit
    def _k_scale_min(raw, block, sub, type_size: tl.constexpr):
        """Q4_K/Q5_K's get_scale_min_k4 for sub-block ``sub`` (0..7) of each block: (scale, min) as int32."""
        base = block[:, None] * type_size + 4
        low = tl.load(raw + base + (sub % 4)).to(tl.int32)
        mid = tl.load(raw + base + 4 + (sub % 4)).to(tl.int32)
        high = tl.load(raw + base + 8 + (sub % 4)).to(tl.int32)
        scale = tl.where(sub < 4, low & 63, (high & 15) | ((low >> 6) << 4))
        minimum = tl.where(sub < 4, mid & 63, (high >> 4) | ((mid >> 6) << 4))
        return scale, minimum

    @triton.jit
    def _q45_k(raw, halves, out, n_blocks, type_size: tl.constexpr, qs_at: tl.constexpr, has_high: tl.constexpr,
               BLOCKS: tl.constexpr):
        """Q4_K / Q5_K: element e: 64-group g = e // 64, low nibble for e % 64 < 32, sub-block s = e // 32;
        value d1 * q - m1 with d1 = d * scale[s], m1 = dmin * min[s] (Q5_K: bit s of qh[e % 32] is bit 4)."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 256)
        sub = element[None, :] // 32
        lane = element[None, :] % 32
        byte = tl.load(raw + block[:, None] * type_size + qs_at + (element[None, :] // 64) * 32 + lane).to(tl.int32)
        q = tl.where(sub % 2 == 0, byte & 15, byte >> 4)
        if has_high:
            qh = tl.load(raw + block[:, None] * type_size + 16 + lane).to(tl.int32)
            q = q | (((qh >> sub) & 1) << 4)
        scale, minimum = _k_scale_min(raw, block, sub, type_size)
        d = _f16_at(halves, block * (type_size // 2))
        dmin = _f16_at(halves, block * (type_size // 2) + 1)
        d1 = d[:, None] * scale.to(tl.float32)
        m1 = dmin[:, None] * minimum.to(tl.float32)
        _store(out, block, element, d1 * q.to(tl.float32) - m1, 256, mask)

    @triton.jit
    def _q6_k(raw, halves, out, n_blocks, BLOCKS: tl.constexpr):
        """Q6_K: element e: half h = e // 128, quarter k = (e % 128) // 32, lane l = e % 32; low 4 bits from
        ql[64 h + 32 (k % 2) + l] (high nibble for k >= 2), top 2 from qh[32 h + l] >> 2 k; (d * sc[e // 16]) * q."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 256)
        half = element[None, :] // 128
        quarter = (element[None, :] % 128) // 32
        lane = element[None, :] % 32
        base = block[:, None] * 210
        low = tl.load(raw + base + 64 * half + 32 * (quarter % 2) + lane).to(tl.int32)
        low = tl.where(quarter < 2, low & 15, low >> 4)
        high = (tl.load(raw + base + 128 + 32 * half + lane).to(tl.int32) >> (2 * quarter)) & 3
        q = (low | (high << 4)) - 32
        scale = tl.load(raw + base + 192 + element[None, :] // 16).to(tl.int8, bitcast=True).to(tl.float32)
        d = _f16_at(halves, block * 105 + 104)
        _store(out, block, element, (d[:, None] * scale) * q.to(tl.float32), 256, mask)

    @triton.jit
    def _q2_k(raw, halves, out, n_blocks, BLOCKS: tl.constexpr):
        """Q2_K: element e: half h = e // 128, shift s = (e % 128) // 32, lane l; q = (qs[32 h + l] >> 2 s) & 3;
        scale byte e // 16: dl = d * (b & 15), ml = dmin * (b >> 4); dl * q - ml."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 256)
        shift = (element[None, :] % 128) // 32
        base = block[:, None] * 84
        q = (tl.load(raw + base + 16 + 32 * (element[None, :] // 128) + element[None, :] % 32).to(tl.int32)
             >> (2 * shift)) & 3
        scales = tl.load(raw + base + element[None, :] // 16).to(tl.int32)
        d = _f16_at(halves, block * 42 + 40)
        dmin = _f16_at(halves, block * 42 + 41)
        dl = d[:, None] * (scales & 15).to(tl.float32)
        ml = dmin[:, None] * (scales >> 4).to(tl.float32)
        _store(out, block, element, dl * q.to(tl.float32) - ml, 256, mask)

    @triton.jit
    def _q3_k(raw, halves, out, n_blocks, BLOCKS: tl.constexpr):
        """Q3_K: element e: half h, shift s, lane l as Q2_K; k = 4 h + s; q = crumb - (bit k of hmask[l] ? 0 : 4);
        16 6-bit scales (scale j: low 4 bits from byte j % 8 (high nibble for j >= 8), top 2 from byte 8 + j % 4
        >> 2 (j // 4)), minus 32; (d * scale) * q."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 256)
        shift = (element[None, :] % 128) // 32
        k = 4 * (element[None, :] // 128) + shift
        lane = element[None, :] % 32
        base = block[:, None] * 110
        crumb = (tl.load(raw + base + 32 + 32 * (element[None, :] // 128) + lane).to(tl.int32) >> (2 * shift)) & 3
        hmask = (tl.load(raw + base + lane).to(tl.int32) >> k) & 1
        q = crumb - tl.where(hmask == 1, 0, 4)
        j = element[None, :] // 16
        low = tl.load(raw + base + 96 + j % 8).to(tl.int32)
        low = tl.where(j < 8, low & 15, low >> 4)
        top = (tl.load(raw + base + 104 + j % 4).to(tl.int32) >> (2 * (j // 4))) & 3
        scale = ((low | (top << 4)) - 32).to(tl.float32)
        d = _f16_at(halves, block * 55 + 54)
        _store(out, block, element, (d[:, None] * scale) * q.to(tl.float32), 256, mask)

    @triton.jit
    def _iq4_xs(raw, halves, codebook, out, n_blocks, BLOCKS: tl.constexpr):
        """IQ4_XS: 8 sub-blocks of 32: sub-block s reads bytes 8 + 16 s + (e % 16) (high nibble for e % 32 >= 16);
        6-bit scale ls = low nibble of byte 4 + s // 2 (high for odd s) | ((scales_h >> 2 s) & 3) << 4;
        d * (ls - 32) * codebook[q]."""
        block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        mask = block < n_blocks
        block = tl.where(mask, block, 0)
        element = tl.arange(0, 256)
        sub = element[None, :] // 32
        base = block[:, None] * 136
        byte = tl.load(raw + base + 8 + 16 * sub + element[None, :] % 16).to(tl.int32)
        q = tl.where(element[None, :] % 32 < 16, byte & 15, byte >> 4)
        low = tl.load(raw + base + 4 + sub // 2).to(tl.int32)
        low = tl.where(sub % 2 == 0, low & 15, low >> 4)
        scales_h = tl.load(halves + block[:, None] * 68 + 1).to(tl.int32) & 0xFFFF
        ls = low | (((scales_h >> (2 * sub)) & 3) << 4)
        d = _f16_at(halves, block * 68)
        dl = d[:, None] * (ls - 32).to(tl.float32)
        _store(out, block, element, dl * tl.load(codebook + q).to(tl.float32), 256, mask)


_LEGACY = {"Q4_0": (18, 2, 0, 8, False), "Q4_1": (20, 4, 0, 0, True), "Q5_0": (22, 6, 2, 16, False),
           "Q5_1": (24, 8, 4, 0, True)}
SUPPORTED = ("Q8_0", *_LEGACY, "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_XS")
_codebooks: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    from lib_fluxq.quant.dequant import IQ4_CODEBOOK
    table = _codebooks.get(device)
    if table is None:
        table = _codebooks[device] = torch.tensor(IQ4_CODEBOOK, dtype=torch.int8, device=device)
    return table


def dequantize_blocks(type_name: str, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """``blocks`` (n, type_size) uint8, contiguous -> ``out`` (n, block_size), float32 / float16 / bfloat16."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n = blocks.shape[0]
    if n == 0:
        return
    halves = blocks.view(torch.int16)
    options: dict[str, Any] = {} if _interpreting() else {"enable_fp_fusion": False}
    small = type_name in ("Q8_0", "IQ4_NL", *_LEGACY)
    per_program = 64 if small else 8
    grid = (triton.cdiv(n, per_program),)
    if type_name == "Q8_0":
        _q8_0[grid](blocks, halves, out, n, BLOCKS=per_program, **options)
    elif type_name in _LEGACY:
        type_size, qs_at, high_at, offset, has_min = _LEGACY[type_name]
        _legacy4[grid](blocks, halves, out, n, type_size, qs_at, high_at, offset, has_min, BLOCKS=per_program,
                       **options)
    elif type_name == "IQ4_NL":
        _iq4_nl[grid](blocks, halves, _codebook(blocks.device), out, n, BLOCKS=per_program, **options)
    elif type_name in ("Q4_K", "Q5_K"):
        type_size, qs_at = (144, 16) if type_name == "Q4_K" else (176, 48)
        _q45_k[grid](blocks, halves, out, n, type_size, qs_at, type_name == "Q5_K", BLOCKS=per_program, **options)
    elif type_name == "Q6_K":
        _q6_k[grid](blocks, halves, out, n, BLOCKS=per_program, **options)
    elif type_name == "Q2_K":
        _q2_k[grid](blocks, halves, out, n, BLOCKS=per_program, **options)
    elif type_name == "Q3_K":
        _q3_k[grid](blocks, halves, out, n, BLOCKS=per_program, **options)
    elif type_name == "IQ4_XS":
        _iq4_xs[grid](blocks, halves, _codebook(blocks.device), out, n, BLOCKS=per_program, **options)
    else:
        raise ValueError(f"no Triton kernel for {type_name}")


# --- choosing per GPU: Triton only where it measured faster than the torch kernels ---------------------------------

_choice: dict[tuple[Any, ...], bool] = {}


def choose(type_name: str, blocks: torch.Tensor, out: torch.Tensor,
           torch_path: Callable[[torch.Tensor, torch.Tensor], None]) -> bool:
    """True when the Triton kernel should serve this (GPU, type, output dtype): decided once by timing both paths on
    the first tensor seen (best of 3 each, after a warm-up). ``FLUXQ_DEQUANT=torch|triton`` overrides."""
    forced = os.environ.get("FLUXQ_DEQUANT", "auto")
    if forced in ("torch", "triton"):
        return forced == "triton" and available() and type_name in SUPPORTED
    if not available() or type_name not in SUPPORTED or blocks.device.type != "cuda":
        return False
    key = (blocks.device, type_name, out.dtype)
    if key not in _choice:
        try:
            _choice[key] = _time(lambda: dequantize_blocks(type_name, blocks, out), blocks.device) < \
                _time(lambda: torch_path(blocks, out), blocks.device)
        except Exception:   # a Triton that cannot compile here: the torch path, for good
            _choice[key] = False
    return _choice[key]


def _time(fn: Callable[[], None], device: torch.device) -> float:
    fn()
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best
