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

import functools

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
    """ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }``: (amax, the signed value at its first index).

    Fast path: the largest and the smallest value decide it (two plain reductions); only when +a and -a tie for the
    largest magnitude (or NaN is present) does the first index matter, and then the exact argmax path runs.
    """
    high = values.amax(dim=dim)
    low = values.amin(dim=dim)
    negative_low = low.neg()
    if not bool(torch.isnan(high).any()) and not bool((high == negative_low).logical_and_(high != 0).any()):
        use_low = negative_low > high
        amax = torch.where(use_low, negative_low, high).clamp_(min=0.0)
        return amax, torch.where(amax > 0, torch.where(use_low, low, high), 0.0)
    return _first_max_abs_exact(values, dim)


def _first_max_abs_exact(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    magnitude = values.abs().nan_to_num_(nan=-1.0)  # NaN never wins a C comparison
    index = magnitude.argmax(dim=dim, keepdim=True)  # torch returns the first maximal index, as the strict '<' does
    amax = magnitude.gather(dim, index).squeeze(dim)
    found = amax > 0
    # nothing strictly above 0 (all zeros / NaN): C keeps its initial amax = 0, max = +0.0
    return amax.clamp_(min=0.0), torch.where(found, values.gather(dim, index).squeeze(dim), 0.0)


def _sequential_sum(terms: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Sum over dim 0 in index order with float32 rounding at every step, like C's ``s = 0; for (...) s += t[i]``.

    ``terms`` may be a pre-split list of rows (``tensor.unbind(0)`` of a reused buffer), which saves a view per add.
    """
    rows = terms.unbind(0) if isinstance(terms, torch.Tensor) else terms
    total = rows[0] + 0.0  # C starts from +0.0f, which also turns a leading -0.0 into +0.0
    for row in rows[1:]:
        total += row
    return total


# Input elements per kernel call: big enough that per-op overhead stays small, small enough that the search
# buffers stay in cache. 2^18 was the fastest of 2^15..2^20 for the K-quants and IQ4 on a 2-core EPYC.
_CHUNK_ELEMENTS = 1 << 18


def _chunked(kernel):
    """Run a block kernel over slices of at most ``_CHUNK_ELEMENTS`` input elements (a loop over chunks, not
    blocks), concatenating the slices' bytes."""
    @functools.wraps(kernel)
    def run(values: torch.Tensor) -> torch.Tensor:
        per_chunk = max(1, _CHUNK_ELEMENTS // max(values.shape[1], 1))
        if values.shape[0] <= per_chunk:
            return kernel(values)
        parts = [kernel(part) for part in values.split(per_chunk)]
        return torch.cat(parts)
    return run


def _running_max(values: torch.Tensor) -> torch.Tensor:
    """C: ``m = 0; for (...) if (v > m) m = v;`` over dim 1 (never negative, never -0.0)."""
    return values.amax(dim=1).clamp_(min=0.0).add_(0.0)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``(..., 8k)`` 0/1 values -> ``(..., k)`` bytes, element 8j+b in bit b of byte j (little-endian bit order)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    grouped = bits.to(torch.uint8).unflatten(-1, (-1, 8)) << shifts
    return grouped.sum(dim=-1, dtype=torch.uint8)


def _pack_nibbles(low: torch.Tensor, high: torch.Tensor, masked: bool = True) -> torch.Tensor:
    """Two uint8 tensors -> one byte each: ``(low & 15) | (high & 15) << 4``; ``masked=False`` when the caller
    guarantees values below 16 (saves two passes)."""
    if masked:
        low, high = low & 0x0F, high & 0x0F
    return (high << 4).bitwise_or_(low)


def quant_f32(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.uint8)


def quant_f16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8)


def quant_bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).contiguous().view(torch.uint8)


# --- legacy 32-element blocks -----------------------------------------------------------------------------------

@_chunked
def quant_q8_0(values: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: d = amax/127, q = roundf(x * (1/d))."""
    amax = torch.maximum(values.amax(dim=1, keepdim=True), values.amin(dim=1, keepdim=True).neg_())
    d = amax.clamp_(min=0.0).add_(0.0) / _const(127.0, values.device)  # +0.0 for all-zero blocks, as in C
    scaled = values * _safe_reciprocal(d)
    # roundf (half away from zero) = trunc(t + copysign(0.49999997f, t)) for every float t: the largest float below
    # 0.5 never carries a non-tie across an integer, and a tie's sum rounds (to even) up to the next integer.
    half = torch.full_like(scaled, 0.49999997).copysign_(scaled)
    out = torch.empty((values.shape[0], 34), dtype=torch.uint8, device=values.device)
    out[:, 0:2] = _fp16_bytes(d)
    out[:, 2:] = scaled.add_(half).to(torch.int8).view(torch.uint8)  # the float -> int8 cast truncates
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
    # C: (int8_t)/(uint8_t) cast truncates toward zero (values here are >= 0, so the float -> uint8 cast does the
    # same); Q4_x and Q5_0 clamp with MIN(top, .), Q5_1 does not but keeps only the stored bits.
    if bits == 5 and affine:
        return d, offset_min, shifted.clamp_(0.0, 255.0).to(torch.uint8).bitwise_and_(top)
    return d, offset_min, shifted.clamp_(0.0, float(top)).to(torch.uint8)


def _quant_legacy(values: torch.Tensor, bits: int, affine: bool) -> torch.Tensor:
    d, offset_min, codes = _legacy_codes(values, bits, affine)
    n = values.shape[0]
    parts = [_fp16_bytes(d)]
    if offset_min is not None:
        parts.append(_fp16_bytes(offset_min))
    if bits == 5:
        parts.append(_pack_bits(codes >> 4))  # qh: bit j = fifth bit of element j
    parts.append(_pack_nibbles(codes[:, :16], codes[:, 16:], masked=bits == 5))  # j low nibble, j+16 high
    return torch.cat(parts, dim=1).reshape(n, -1)


@_chunked
def quant_q4_0(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=4, affine=False)


@_chunked
def quant_q4_1(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=4, affine=True)


@_chunked
def quant_q5_0(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=5, affine=False)


@_chunked
def quant_q5_1(values: torch.Tensor) -> torch.Tensor:
    return _quant_legacy(values, bits=5, affine=True)


# --- K-quant building blocks ------------------------------------------------------------------------------------
#
# Sub-block searches work in a transposed layout: ``(n, B)`` = (element within a sub-block, sub-block), so that the
# sequential sums over a sub-block's elements are n adds of contiguous ``(B,)`` rows.

_NEAREST_INT_SAFE = 4194303.0  # nearest_int is plain round-half-even up to this magnitude


def _round_codes(scaled: torch.Tensor, bound: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``MAX(low, MIN(high, nearest_int(scaled)))`` as float, in place on ``scaled``.

    ``bound`` (per sub-block) bounds ``|scaled|``; when every bound is finite and small, ``round`` equals ggml's
    bit trick and costs one pass instead of four; otherwise the exact bit trick runs.
    """
    bound_max = bound.max()
    if bool(torch.isfinite(bound_max)) and float(bound_max) <= _NEAREST_INT_SAFE:
        return scaled.round_().clamp_(low, high)
    return scaled.copy_(_nearest_int(scaled).clamp_(int(low), int(high)))


def _f32(value: float) -> float:
    """A Python float rounded to float32, for constants C computes in float (e.g. ``rmin + rdelta*is + nmax``)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _step_constants(rmin: float, rdelta: float, nmax: int, nstep: int) -> list[float]:
    """C: ``(rmin + rdelta*is + nmax)`` evaluated left to right in float32, for is = 0..nstep."""
    constants = []
    for step in range(nstep + 1):
        term = _f32(_f32(rdelta) * step)
        constants.append(_f32(_f32(_f32(rmin) + term) + nmax))
    return constants


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants on ``(n, B)`` sub-blocks: returns (scale (B,), the_min (B,), L (n, B) float).

    An affine fit ``x ~ scale*L + min`` (min <= 0), searched over nstep+1 trial inverse scales; a trial replaces the
    current fit when its weighted error is strictly smaller, and later trials start from the new ``min``.
    """
    n = x.shape[0]
    device = x.device
    x_min = x.amin(dim=0).clamp_(max=0.0)  # C: if (min > 0) min = 0
    x_max = x.amax(dim=0)
    x_absmax = torch.maximum(x_max.abs(), x_min.abs())
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * x)
    flat = x_max == x_min

    def fit_error(scale: torch.Tensor, offset: torch.Tensor, codes: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        # C: diff = scale*L + min - x; diff = mad ? |diff| : diff*diff; err += w*diff
        torch.mul(codes, scale, out=work).add_(offset).sub_(x)
        work.abs_() if use_mad else work.mul_(work)
        return _sequential_sum(work.mul_(weights))

    work = torch.empty_like(x)
    codes = torch.empty_like(x)
    iscale = _const(float(nmax), device) / (x_max - x_min)
    scale = torch.reciprocal(iscale)
    bound = iscale.abs() * (x_absmax + x_absmax)
    torch.sub(x, x_min, out=codes).mul_(iscale)
    codes = _round_codes(codes, bound, 0.0, float(nmax))
    best_error = fit_error(scale, x_min, codes, work)
    best_iscale, best_offset = iscale, x_min  # what L was computed with, to rebuild it at the end
    offset = x_min

    sums = torch.empty((n, 3, x.shape[1]), dtype=x.dtype, device=device)
    sum_rows = sums.unbind(0)
    for constant in _step_constants(rmin, rdelta, nmax, nstep):
        iscale = _const(constant, device) / (x_max - offset)
        bound = iscale.abs() * (x_absmax + offset.abs())
        torch.sub(x, offset, out=codes).mul_(iscale)
        codes = _round_codes(codes, bound, 0.0, float(nmax))
        weighted = torch.mul(weights, codes, out=sums[:, 0])           # w*l
        torch.mul(weighted, codes, out=sums[:, 1])                     # w*l*l
        torch.mul(weighted, x, out=sums[:, 2])                         # w*l*x
        sum_l, sum_l2, sum_xl = _sequential_sum(sum_rows).unbind(0)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive_min = this_min > 0
        this_scale = torch.where(positive_min, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        error = fit_error(this_scale, this_min, codes, work)
        better = (det > 0) & (error < best_error)  # NaN errors never win, as in C
        best_error = torch.where(better, error, best_error)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_offset = torch.where(better, offset, best_offset)
        scale = torch.where(better, this_scale, scale)
        offset = torch.where(better, this_min, offset)

    # Rebuild the winning trial's L (same iscale, same offset, same rounding as when it was scored).
    bound = best_iscale.abs() * (x_absmax + best_offset.abs())
    torch.sub(x, best_offset, out=codes).mul_(best_iscale)
    codes = _round_codes(codes, bound, 0.0, float(nmax))
    codes.masked_fill_(flat, 0.0)
    scale = scale.masked_fill(flat, 0.0)
    return scale, offset.neg(), codes


def _transposed(values: torch.Tensor, sub_block: int) -> torch.Tensor:
    """``(n_blocks, 256)`` -> ``(sub_block, n_blocks * 256/sub_block)`` contiguous."""
    return values.reshape(-1, sub_block).t().contiguous()


def _untransposed(codes: torch.Tensor, n_blocks: int) -> torch.Tensor:
    return codes.t().reshape(n_blocks, -1)


def _quantize_to_codes(values: torch.Tensor, d: torch.Tensor, dm: torch.Tensor | None, fallback: torch.Tensor,
                       low: int, high: int) -> torch.Tensor:
    """ggml's final pass: where ``d != 0``, ``MAX(low, MIN(high, nearest_int((x + dm)/d)))``, else keep ``fallback``.

    values ``(n_blocks, S, n)``, d / dm ``(n_blocks, S)``, fallback ``(n_blocks, S, n)`` -> int32 codes.
    """
    shifted = values + dm.unsqueeze(-1) if dm is not None else values
    codes = _nearest_int(shifted / d.unsqueeze(-1)).clamp_(low, high)
    return torch.where((d != 0).unsqueeze(-1), codes, fallback.to(torch.int32))


def _six_bit_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: eight 6-bit scales and mins -> 12 bytes (inverse of ggml's get_scale_min_k4)."""
    head = torch.cat((ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6)), dim=1)
    tail = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat((head, tail), dim=1).to(torch.uint8)


def _quant_qk_affine(values: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K core (quantize_row_q{4,5}_K_ref): returns (fp16 d|dmin bytes (n,4), scale bytes (n,12),
    codes int32 (n, 8, 32))."""
    n_blocks = values.shape[0]
    x = _transposed(values, 32)
    square = x * x
    # C: av_x = sqrtf(sum_x2/32); weights = av_x + |x|
    # torch's float32 sqrt on CPU is not correctly rounded (sqrtf is); a float64 sqrt rounded to float32 is.
    av_x = torch.sqrt((_sequential_sum(square) / _const(32.0, x.device)).double()).float()
    weights = torch.add(x.abs(), av_x)
    scales, mins, codes = _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scales.view(n_blocks, 8)
    mins = mins.view(n_blocks, 8)
    max_scale = _running_max(scales)
    max_min = _running_max(mins)
    sixty_three = _const(63.0, x.device)
    inv_scale = torch.where(max_scale > 0, sixty_three / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, sixty_three / max_min, torch.zeros_like(max_min))
    # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    ls = (_nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp_(max=63)
    d_pair = torch.stack((max_scale / sixty_three, max_min / sixty_three), dim=1)
    d_read = _fp16_round(d_pair)
    d_sub = d_read[:, :1] * ls.float()
    dm_sub = d_read[:, 1:] * lm.float()
    codes = _quantize_to_codes(values.view(n_blocks, 8, 32), d_sub, dm_sub,
                               _untransposed(codes, n_blocks).view(n_blocks, 8, 32), 0, nmax)
    return _fp16_bytes(d_pair), _six_bit_scales_k4(ls, lm), codes


@_chunked
def quant_q4_k(values: torch.Tensor) -> torch.Tensor:
    head, scale_bytes, codes = _quant_qk_affine(values, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    codes = codes.to(torch.uint8).view(-1, 4, 2, 32)  # per 64 elements: 32 low nibbles, then 32 high nibbles
    qs = _pack_nibbles(codes[:, :, 0], codes[:, :, 1], masked=False).reshape(-1, 128)
    return torch.cat((head, scale_bytes, qs), dim=1)


@_chunked
def quant_q5_k(values: torch.Tensor) -> torch.Tensor:
    head, scale_bytes, codes = _quant_qk_affine(values, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    codes = codes.to(torch.uint8)
    n_blocks = codes.shape[0]
    # qh[j] bit k = fifth bit of element j of sub-block k
    qh = ((codes >> 4) << torch.arange(8, device=codes.device, dtype=torch.uint8).view(1, 8, 1)).sum(
        dim=1, dtype=torch.uint8)
    pairs = codes.view(n_blocks, 4, 2, 32)
    qs = _pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(n_blocks, 128)
    return torch.cat((head, scale_bytes, qh, qs), dim=1)


def _pack_crumbs(codes: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K: ``(n, 256)`` 2-bit values -> 64 bytes: per 128-half, byte l = L[l] | L[l+32]<<2 | ... | L[l+96]<<6."""
    quarters = codes.to(torch.uint8).view(-1, 2, 4, 32)
    shifts = torch.arange(0, 8, 2, device=codes.device, dtype=torch.uint8).view(1, 1, 4, 1)
    return (quarters << shifts).sum(dim=2, dtype=torch.uint8).reshape(-1, 64)


@_chunked
def quant_q2_k(values: torch.Tensor) -> torch.Tensor:
    """quantize_row_q2_K_ref: 16 sub-blocks of 16, make_qkx2_quants(nmax 3, weights |x|, mean absolute error)."""
    n_blocks = values.shape[0]
    x = _transposed(values, 16)
    scales, mins, codes = _make_qkx2_quants(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales = scales.view(n_blocks, 16)
    mins = mins.view(n_blocks, 16)
    max_scale = _running_max(scales)
    max_min = _running_max(mins)
    fifteen = _const(15.0, x.device)
    has_scale = (max_scale > 0).unsqueeze(1)
    has_min = (max_min > 0).unsqueeze(1)
    ls = _nearest_int((fifteen / max_scale).unsqueeze(1) * scales)
    lm = _nearest_int((fifteen / max_min).unsqueeze(1) * mins)
    # C: scales[j] = l (uint8), then scales[j] |= (l << 4) (truncated to the byte)
    scale_bytes = torch.where(has_scale, ls, 0)
    scale_bytes = torch.where(has_min, scale_bytes | (lm << 4), scale_bytes) & 0xFF
    d_pair = torch.stack((max_scale / fifteen, max_min / fifteen), dim=1)
    d_pair = torch.where(torch.stack((has_scale, has_min), dim=1).squeeze(2), d_pair, torch.zeros_like(d_pair))
    d_read = _fp16_round(d_pair)
    d_sub = d_read[:, :1] * (scale_bytes & 0x0F).float()
    dm_sub = d_read[:, 1:] * (scale_bytes >> 4).float()
    codes = _quantize_to_codes(values.view(n_blocks, 16, 16), d_sub, dm_sub,
                               _untransposed(codes, n_blocks).view(n_blocks, 16, 16), 0, 3)
    return torch.cat((scale_bytes.to(torch.uint8), _pack_crumbs(codes.view(n_blocks, 256)), _fp16_bytes(d_pair)),
                     dim=1)


_GROUP_MAX_EPS = 1e-15  # ggml's "all zero" threshold for a sub-block's max |x|


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants(rmse_type=1, no weights) on ``(n, B)``: returns (scale (B,), L (n, B) float).

    A symmetric fit with weights x^2 over 19 trial inverse scales ``-(nmax + 0.1*is)/max``; a trial wins when
    ``sumlx^2 > best*suml2`` (strict), comparing against the running best.
    """
    n = x.shape[0]
    device = x.device
    amax, signed_max = _first_max_abs(x, dim=0)
    all_zero = amax < _GROUP_MAX_EPS
    weighted_x = (x * x).mul_(x)  # C: w*x[i] with w = x[i]*x[i]
    square = x * x
    codes = torch.empty_like(x)
    sums = torch.empty((n, 2, x.shape[1]), dtype=x.dtype, device=device)
    sum_rows = sums.unbind(0)

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.mul(x, iscale, out=codes)
        _round_codes(codes, iscale.abs() * amax, -nmax, nmax - 1)
        torch.mul(weighted_x, codes, out=sums[:, 0])             # w*x*l
        torch.mul(square, codes, out=sums[:, 1]).mul_(codes)     # w*l*l
        sum_lx, sum_l2 = _sequential_sum(sum_rows).unbind(0)
        return sum_lx, sum_l2

    best_iscale = _const(-float(nmax), device) / signed_max
    sum_lx, sum_l2 = trial(best_iscale)
    scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        constant = _f32(nmax + _f32(_f32(0.1) * step))
        iscale = _const(-constant, device) / signed_max
        sum_lx, sum_l2 = trial(iscale)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        this_scale = sum_lx / sum_l2
        scale = torch.where(better, this_scale, scale)
        best = torch.where(better, this_scale * sum_lx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    torch.mul(x, best_iscale, out=codes)
    _round_codes(codes, best_iscale.abs() * amax, -nmax, nmax - 1).add_(nmax)
    codes.masked_fill_(all_zero, 0.0)
    return scale.masked_fill(all_zero, 0.0), codes


def _to_int8(values: torch.Tensor) -> torch.Tensor:
    """C's implicit int -> int8_t conversion (keep the low byte, signed)."""
    return ((values + 128) & 0xFF) - 128


@_chunked
def quant_q6_k(values: torch.Tensor) -> torch.Tensor:
    """quantize_row_q6_K_ref: 16 sub-blocks of 16, make_qx_quants(nmax 32), int8 sub-scales, one fp16 d."""
    n_blocks = values.shape[0]
    x = _transposed(values, 16)
    scales, codes = _make_qx_quants(x, 32)
    scales = scales.view(n_blocks, 16)
    max_abs_scale, max_scale = _first_max_abs(scales, dim=1)
    zero_block = max_abs_scale < _GROUP_MAX_EPS
    iscale = _const(-128.0, values.device) / max_scale
    d = torch.reciprocal(iscale)
    sub_scales = _to_int8(_nearest_int(iscale.unsqueeze(1) * scales).clamp_(max=127))
    d_sub = _fp16_round(d).unsqueeze(1) * sub_scales.float()
    codes = _quantize_to_codes(values.view(n_blocks, 16, 16), d_sub, None,
                               _untransposed(codes, n_blocks).view(n_blocks, 16, 16) - 32, -32, 31)
    codes = (codes + 32).to(torch.uint8).view(n_blocks, 2, 4, 32)  # (half, quarter, l)
    d_read = torch.where(zero_block, torch.zeros_like(d), d).unsqueeze(1)
    low = codes & 0x0F
    ql = torch.cat((_pack_nibbles(low[:, :, 0], low[:, :, 2]), _pack_nibbles(low[:, :, 1], low[:, :, 3])), dim=2)
    shifts = torch.arange(0, 8, 2, device=values.device, dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((codes >> 4) << shifts).sum(dim=2, dtype=torch.uint8)
    out = torch.cat((ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64),
                     sub_scales.to(torch.uint8), _fp16_bytes(d_read)), dim=1)
    return out.masked_fill_(zero_block.unsqueeze(1), 0)


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants(do_rmse=true) on ``(n, B)``: returns (scale (B,), L (n, B) float, offset by nmax).

    A symmetric fit refined by up to 5 passes of coordinate descent: element by element, a code moves to the value
    that is optimal given the others when that strictly improves sumlx^2/suml2. A pass that changes nothing leaves
    the state as it was, so running all 5 passes for every sub-block equals ggml's early ``break``.
    """
    n = x.shape[0]
    amax, signed_max = _first_max_abs(x, dim=0)
    all_zero = amax < _GROUP_MAX_EPS
    iscale = _const(-float(nmax), x.device) / signed_max
    codes = _round_codes(x * iscale, iscale.abs() * amax, -nmax, nmax - 1)
    square = x * x
    weighted_x = square * x  # C: w*x[i]
    sum_lx = _sequential_sum(weighted_x * codes)
    sum_l2 = _sequential_sum((square * codes).mul_(codes))
    rows = list(codes.unbind(0))
    for _ in range(5):
        for i in range(n):
            w, wx, xi, current = square[i], weighted_x[i], x[i], rows[i]
            slx = sum_lx - wx * current
            sl2 = sum_l2 - (w * current) * current
            new = _nearest_int((xi * sl2) / slx).clamp_(-nmax, nmax - 1).to(x.dtype)
            slx = slx + wx * new
            sl2 = sl2 + (w * new) * new
            accept = ((slx - wx * new) > 0) & (new != current) & (sl2 > 0)
            accept &= (slx * slx) * sum_l2 > (sum_lx * sum_lx) * sl2
            rows[i] = torch.where(accept, new, current)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
    codes = torch.stack(rows).add_(nmax).masked_fill_(all_zero, 0.0)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_lx))
    return scale.masked_fill(all_zero, 0.0), codes


def _six_bit_scales_q3(levels: torch.Tensor) -> torch.Tensor:
    """Q3_K: sixteen 6-bit scales -> 12 bytes: low nibbles (j, j+8 share byte j%8), then 2 high bits each in byte
    8 + j%4 at bit 2*(j//4)."""
    low = _pack_nibbles(levels[:, :8], levels[:, 8:])
    high = ((levels >> 4).view(-1, 4, 4) << torch.arange(0, 8, 2, device=levels.device, dtype=torch.uint8
                                                          ).view(1, 4, 1)).sum(dim=1, dtype=torch.uint8)
    return torch.cat((low, high), dim=1)


@_chunked
def quant_q3_k(values: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_ref: 16 sub-blocks of 16, make_q3_quants(nmax 4), 6-bit signed sub-scales, fp16 d."""
    n_blocks = values.shape[0]
    x = _transposed(values, 16)
    scales, codes = _make_q3_quants(x, 4)
    scales = scales.view(n_blocks, 16)
    _, max_scale = _first_max_abs(scales, dim=1)
    has_scale = (max_scale != 0).unsqueeze(1)
    iscale = _const(-32.0, values.device) / max_scale
    levels = _to_int8(_nearest_int(iscale.unsqueeze(1) * scales)).clamp_(-32, 31) + 32
    levels = torch.where(has_scale, levels, 0).to(torch.uint8)  # C: memset(scales, 0) when max_scale == 0
    d = torch.where(has_scale.squeeze(1), torch.reciprocal(iscale), torch.zeros_like(iscale)).unsqueeze(1)
    d_sub = _fp16_round(d) * (levels.to(torch.int32) - 32).float()
    codes = _quantize_to_codes(values.view(n_blocks, 16, 16), d_sub, None,
                               _untransposed(codes, n_blocks).view(n_blocks, 16, 16) - 4, -4, 3) + 4
    codes = codes.view(n_blocks, 256).to(torch.uint8)
    high = codes >> 2  # codes are 0..7: bit 2 goes to hmask
    # hmask[m] bit k = high bit of element 32k + m
    hmask = (high.view(n_blocks, 8, 32) << torch.arange(8, device=values.device, dtype=torch.uint8).view(1, 8, 1)
             ).sum(dim=1, dtype=torch.uint8)
    return torch.cat((hmask, _pack_crumbs(codes & 3), _six_bit_scales_q3(levels), _fp16_bytes(d)), dim=1)
# --- IQ4_NL / IQ4_XS: 4-bit indices into ggml's non-linear codebook ------------------------------------------------

IQ4_CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_codebooks: dict[torch.device, torch.Tensor] = {}


def _codebook(device: torch.device) -> torch.Tensor:
    table = _codebooks.get(device)
    if table is None:
        table = _codebooks[device] = torch.tensor(IQ4_CODEBOOK, dtype=torch.float32, device=device)
    return table


def _iq4_index_table() -> list[int]:
    """best_index_int8 for every half-unit cell [c/2, (c+1)/2), c = -256..255.

    Every decision boundary of best_index_int8 is a midpoint of two integer codebook entries, a multiple of 0.5,
    and near those midpoints ggml's float differences ``x - lo`` and ``hi - x`` are exact; so all values of a cell
    get the same index, and the index of a value is the entry of its cell (x >= midpoint goes to the upper entry).
    """
    table = []
    for cell in range(-256, 256):
        low_edge = cell / 2
        midpoints = [(IQ4_CODEBOOK[k] + IQ4_CODEBOOK[k + 1]) / 2 for k in range(15)]
        table.append(sum(1 for midpoint in midpoints if low_edge >= midpoint))
    return table


_iq4_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _iq4_lookup(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index per half-unit cell as uint8, codebook value per cell as float32)."""
    tables = _iq4_tables.get(device)
    if tables is None:
        index = torch.tensor(_iq4_index_table(), dtype=torch.uint8, device=device)
        tables = _iq4_tables[device] = (index, _codebook(device)[index.long()])
    return tables


def _iq4_cells(doubled: torch.Tensor) -> torch.Tensor:
    """``2 * x`` (float, overwritten) -> int32 cell numbers into the lookup tables; NaN goes to the top cell like
    ggml's binary search, +-inf to the ends."""
    if not bool(torch.isfinite(doubled).all()):
        doubled.nan_to_num_(nan=1000.0)
    return doubled.floor_().clamp_(-256, 255).add_(256).to(torch.int32)


def _best_index_iq4(values: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 over the codebook, as uint8."""
    index, _ = _iq4_lookup(values.device)
    return index[_iq4_cells(values * 2.0)]


def _iq4_sub_block_scales(x: torch.Tensor) -> torch.Tensor:
    """The per-32 scale search of quantize_row_iq4_nl_impl (ntry 7, weights x^2) on ``(32, B)`` -> ``(B,)``."""
    n = x.shape[0]
    device = x.device
    amax, signed_max = _first_max_abs(x, dim=0)
    all_zero = amax < _GROUP_MAX_EPS
    square = x * x
    sums = torch.empty((n, 2, x.shape[1]), dtype=x.dtype, device=device)
    sum_rows = sums.unbind(0)

    doubled_x = x * 2.0  # (2x)*id == 2*(x*id) exactly, so the lookup's doubling costs nothing per trial
    _, level_table = _iq4_lookup(device)

    def trial(inverse_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = level_table[_iq4_cells(doubled_x * inverse_scale)]
        weighted = torch.mul(square, levels, out=sums[:, 0])   # w*q
        torch.mul(weighted, levels, out=sums[:, 1])            # w*q*q
        weighted.mul_(x)                                       # w*q*x
        sum_qx, sum_q2 = _sequential_sum(sum_rows).unbind(0)
        return sum_qx, sum_q2

    d = signed_max.neg() / _const(float(IQ4_CODEBOOK[0]), device)  # C: -max/values[0]
    sum_qx, sum_q2 = trial(torch.reciprocal(d))
    d = torch.where(sum_q2 > 0, sum_qx / sum_q2, torch.zeros_like(sum_qx))
    best = d * sum_qx
    for step in range(-7, 8):
        inverse_scale = _const(float(step + IQ4_CODEBOOK[0]), device) / signed_max
        sum_qx, sum_q2 = trial(inverse_scale)
        better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
        this_d = sum_qx / sum_q2
        d = torch.where(better, this_d, d)
        best = torch.where(better, this_d * sum_qx, best)
    return d.masked_fill(all_zero, 0.0)


def _pack_iq4_codes(values: torch.Tensor, inverse_scale: torch.Tensor) -> torch.Tensor:
    """``(n, S, 32)`` values times ``(n, S)`` inverse scales -> ``(n, S*16)`` bytes: element j low nibble, j+16
    high nibble, per 32."""
    codes = _best_index_iq4(values * inverse_scale.unsqueeze(-1)).to(torch.uint8)
    return _pack_nibbles(codes[..., :16], codes[..., 16:], masked=False).reshape(values.shape[0], -1)


@_chunked
def quant_iq4_nl(values: torch.Tensor) -> torch.Tensor:
    """quantize_iq4_nl (ggml_quantize_chunk's path, ntry 7): one fp16 scale per 32."""
    d = _iq4_sub_block_scales(values.t().contiguous())
    return torch.cat((_fp16_bytes(d.unsqueeze(1)), _pack_iq4_codes(values.view(-1, 1, 32),
                                                                     _safe_reciprocal(d).unsqueeze(1))), dim=1)


@_chunked
def quant_iq4_xs(values: torch.Tensor) -> torch.Tensor:
    """quantize_iq4_xs: the IQ4_NL search per 32, then one fp16 d per 256 and 6-bit signed sub-scales."""
    n_blocks = values.shape[0]
    scales = _iq4_sub_block_scales(_transposed(values, 32)).view(n_blocks, 8)
    _, max_scale = _first_max_abs(scales, dim=1)
    d = max_scale.neg() / _const(32.0, values.device)  # C: -max_scale/32
    levels = _nearest_int(_safe_reciprocal(d).unsqueeze(1) * scales).clamp_(-32, 31)
    sub_d = d.unsqueeze(1) * levels.float()  # C: dl = d * l, in float32 (not the fp16 d)
    qs = _pack_iq4_codes(values.view(n_blocks, 8, 32), _safe_reciprocal(sub_d))
    levels = (levels + 32).to(torch.uint8)
    scales_l = _pack_nibbles(levels[:, 0::2], levels[:, 1::2])
    shifts = torch.arange(0, 8, 2, device=values.device, dtype=torch.uint8).view(1, 1, 4)
    scales_h = ((levels >> 4).view(n_blocks, 2, 4) << shifts).sum(dim=2, dtype=torch.uint8)  # uint16, little-endian
    return torch.cat((_fp16_bytes(d.unsqueeze(1)), scales_h, scales_l, qs), dim=1)
