"""Torch quantization kernels, one per GGML block layout (the reference algorithms, no importance matrix).

Each kernel takes ``(n_blocks, block_size)`` float32 and returns ``(n_blocks, type_size)`` uint8 in GGML layout,
byte-identical to ``ggml_quantize_chunk`` without an importance matrix (ggml-quants.c: ``quantize_row_*_ref``,
``quantize_iq4_nl`` / ``quantize_iq4_xs``). Bit-exactness rests on three rules followed throughout:

* every float operation ggml does in C is one torch op here, in the same order (no fused multiply-add: ggml-base is
  built without FMA, so ``a*b + c`` is two roundings), with the same float32 constants;
* ggml's sums are sequential float32 loops, so they are sequential here too (``_sequential_sum`` walks the summed
  axis in order; torch's own reductions use pairwise/double accumulation and would differ in the last ulp);
* searches keep ggml's tie-breaking (strict ``>``/``<``, first index wins).

Work is vectorised across blocks; the only Python loops run over a block's elements or a fixed number of search
steps, never over blocks. Inputs are processed in chunks so the search tensors stay cache-sized.
"""

from __future__ import annotations

import torch

# --- shared helpers ---------------------------------------------------------------------------------------------

_constants: dict[tuple[float, torch.device], torch.Tensor] = {}


def _const(value: float, device: torch.device) -> torch.Tensor:
    """A 0-dim float32 tensor on ``device``.

    Divisions use this instead of a Python scalar because CUDA turns ``tensor / python_scalar`` into a multiply by
    the reciprocal, which is not bit-identical to C's ``a / b``.
    """
    key = (value, device)
    tensor = _constants.get(key)
    if tensor is None:
        tensor = _constants[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return tensor


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 ``(n, k)`` -> ``(n, 2k)`` bytes of fp16 (round-to-nearest-even, as ggml's GGML_FP32_TO_FP16)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_round(values: torch.Tensor) -> torch.Tensor:
    """What ggml reads back after storing a scale: ``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``."""
    return values.to(torch.float16).float()


def _nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: add 1.5 * 2^23 and read the low mantissa bits (int32).

    This is round-half-to-even for |v| <= 4194303 and ggml's exact garbage outside that range (and 0 for NaN), which
    matters where a later clamp decides the stored value.
    """
    shifted = (values + 12582912.0).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _safe_reciprocal(values: torch.Tensor) -> torch.Tensor:
    """C's ``d ? 1.0f/d : 0.0f``."""
    return torch.where(values != 0, torch.reciprocal(values), torch.zeros_like(values))


def _first_max_abs(values: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``: (amax, the signed value at its first index)."""
    magnitude = values.abs()
    index = magnitude.argmax(dim=dim, keepdim=True)  # torch returns the first maximal index, as the strict '<' does
    return magnitude.gather(dim, index).squeeze(dim), values.gather(dim, index).squeeze(dim)


def _sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in index order with float32 rounding at every step, like C's ``s = 0; for (...) s += t[i]``."""
    total = terms[0] + 0.0  # C starts from +0.0f, which also turns a leading -0.0 into +0.0
    for i in range(1, terms.shape[0]):
        total += terms[i]
    return total


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(..., 8k)`` 0/1 values -> ``(..., k)`` bytes, element 8j+b in bit b of byte j (little-endian bit order)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    grouped = bits.to(torch.uint8).unflatten(-1, (-1, 8)) << shifts
    return grouped.sum(dim=-1, dtype=torch.uint8)


def _pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two uint8 tensors of 4-bit values -> one byte each (``low | high << 4``)."""
    return (low & 0x0F) | ((high & 0x0F) << 4)


def quant_f32(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.uint8)


def quant_f16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8)


def quant_bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).contiguous().view(torch.uint8)


# --- legacy 32-element blocks -----------------------------------------------------------------------------------

def quant_q8_0(values: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: d = amax/127, q = roundf(x * (1/d))."""
    amax = values.abs().amax(dim=1, keepdim=True)
    d = amax / _const(127.0, values.device)
    scaled = values * _safe_reciprocal(d)
    # roundf (half away from zero), exactly: trunc(t) + trunc(2 * frac(t)); frac and 2*frac are exact in float.
    whole = scaled.trunc()
    rounded = whole + (scaled - whole).mul_(2.0).trunc_()
    out = torch.empty((values.shape[0], 34), dtype=torch.uint8, device=values.device)
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:] = rounded.to(torch.int8).view(torch.uint8)
    return out


def _legacy_codes(values: torch.Tensor, bits: int, affine: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                             torch.Tensor]:
    """Q4_0/Q5_0 (symmetric, d = max/-2^(bits-1)) and Q4_1/Q5_1 (d = (max-min)/(2^bits-1), m = min).

    Returns (d, m or None, codes as uint8 in [0, 2^bits)).
    """
    top = (1 << bits) - 1
    if affine:
        low = values.amin(dim=1, keepdim=True)
        high = values.amax(dim=1, keepdim=True)
        d = (high - low) / _const(float(top), values.device)
        shifted = (values - low).mul_(_safe_reciprocal(d)).add_(0.5)  # C: (x - min)*id, then + 0.5f
        offset_min = low
    else:
        _, signed_max = _first_max_abs(values)
        d = (signed_max / _const(-float(1 << (bits - 1)), values.device)).unsqueeze(1)
        shifted = (values * _safe_reciprocal(d)).add_((1 << (bits - 1)) + 0.5)  # C: x*id + 8.5f (or 16.5f)
        offset_min = None
    # C: (int8_t)/(uint8_t) cast truncates toward zero; Q4_x and Q5_0 clamp with MIN(top, .), Q5_1 does not but
    # keeps only the stored bits.
    codes = shifted.trunc_().to(torch.int32)
    codes = codes & top if bits == 5 and affine else codes.clamp_(max=top)
    return d, offset_min, codes.to(torch.uint8)


def _quant_legacy(values: torch.Tensor, bits: int, affine: bool) -> torch.Tensor:
    d, offset_min, codes = _legacy_codes(values, bits, affine)
    n = values.shape[0]
    parts = [_fp16_bytes(d)]
    if offset_min is not None:
        parts.append(_fp16_bytes(offset_min))
    if bits == 5:
        parts.append(_pack_bits(codes >> 4))  # qh: bit j = fifth bit of element j
    parts.append(_pack_nibbles(codes[:, :16], codes[:, 16:]))  # element j low nibble, element j+16 high nibble
    return torch.cat(parts, dim=1).reshape(n, -1)


def quant_q4_0(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=4, affine=False)


def quant_q4_1(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=4, affine=True)


def quant_q5_0(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=5, affine=False)


def quant_q5_1(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=5, affine=True)


def _not_yet(name: str):
    def kernel(values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"quantization to {name} is not implemented yet")
    return kernel


quant_q6_k = _not_yet("Q6_K")
quant_q5_k = _not_yet("Q5_K")
quant_q4_k = _not_yet("Q4_K")
quant_q3_k = _not_yet("Q3_K")
quant_q2_k = _not_yet("Q2_K")
quant_iq4_nl = _not_yet("IQ4_NL")
quant_iq4_xs = _not_yet("IQ4_XS")
