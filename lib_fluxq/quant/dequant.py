"""Torch dequantization kernels, one per GGML block layout.

Each kernel takes ``blocks``, a contiguous ``(n_blocks, type_size)`` uint8 tensor (CPU or CUDA), and writes
``(n_blocks, block_size)`` values into ``out``, whose dtype may be float32, float16 or bfloat16. The kernels follow
ggml's ``dequantize_row_*`` (ggml-quants.c) operation by operation, including the order of float multiplications,
so float32 results are bit-identical to ggml's ``to_float``; a half-precision ``out`` receives that float32 result
rounded once (the arithmetic stays float32, see ``_scale``).

How they stay fast in eager torch, where every op is one pass over memory:
- bit fiddling happens on bytes (nibbles, 2-bit crumbs, high bits), a quarter of a float pass each, and only on
  contiguous "planes": each field is shifted and masked over a whole flat byte array, then moved into place by 2-D
  copies (an element-wise op on short strided rows falls to torch's scalar loop, ~10x slower);
- per-block scales are read as strided fp16 / int32 columns (one op per block, not one per byte);
- the float work is the minimum ggml's rounding allows: one int -> float conversion, one multiply by the broadcast
  per-(sub-)block scale, and for affine types one add / subtract of the broadcast offset;
- temporaries come from a per-thread scratch (``scratch``) that the caller's chunk loop reuses, so nothing is
  allocated per call once warm (on CPU a fresh multi-MB allocation costs page faults every time);
- IQ4's non-linear codebook is two small integer gathers (byte -> int8 codebook value of its low / high nibble),
  not a float lookup through int64 indices.

The per-type facts (block size, bytes) live in ``table.py``; this module only knows byte layouts.
"""

from __future__ import annotations

import threading

import torch

# ggml's non-linear 4-bit codebook for IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml-common.h).
IQ4_CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# --- scratch --------------------------------------------------------------------------------------------------------

class _ThreadScratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


_scratch = _ThreadScratch()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``shape`` tensor from this thread's grow-only buffer named ``slot`` (contents undefined).

    On CPU the buffers persist: the chunked kernels ask for the same sizes on every call. On other devices a plain
    ``torch.empty`` is returned: the CUDA caching allocator already reuses freed blocks without page faults, and a
    persistent buffer there would pin memory that the next layer's activations may need.
    """
    numel = 1
    for size in shape:
        numel *= size
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    key = (slot, device, dtype)
    buffer = _scratch.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffers[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_scratch() -> None:
    """Drop this thread's scratch buffers (tests; or after a model is unloaded)."""
    _scratch.buffers.clear()


# --- lookup tables (built once per device) ----------------------------------------------------------------------

_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _TABLE_BUILDERS[name]().to(device)
    return table


def _bits_table() -> torch.Tensor:
    """Byte -> its 8 bits (lowest first) as bytes 0 / 16, packed into one int64, so one gather per byte yields all
    eight (Q5_0/Q5_1: bit j of qh is element j's fifth bit)."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits << 4).to(torch.uint8).contiguous().view(torch.int64).reshape(256)


def _iq4_table(shift: int) -> torch.Tensor:
    """Byte -> int8 codebook value of its low (shift 0) or high (shift 4) nibble."""
    return torch.tensor(IQ4_CODEBOOK, dtype=torch.int8)[(torch.arange(256) >> shift) & 15]


_TABLE_BUILDERS = {
    "bits8x16": _bits_table,
    "iq4_low": lambda: _iq4_table(0),
    "iq4_high": lambda: _iq4_table(4),
}


# --- shared steps ---------------------------------------------------------------------------------------------------
#
# Eager torch is only fast when an op's iteration collapses to at most two dimensions with a contiguous inner one:
# element-wise byte ops on short strided rows fall to a scalar loop (~10x slower), and a third dimension adds a
# per-row dispatch. So every byte field is first copied out into its own contiguous buffer (copies of strided rows
# are cheap), shifted and masked there as one flat array ("planes"), and moved into place by 2-D copies.

def _column(blocks: torch.Tensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` field at byte ``start`` of every block as a strided ``(n,)`` view (or a copy when the bytes are
    not aligned for ``dtype``). One strided column op touches each block once, where a ``(n, 2)`` slice would
    cost a dispatched row per block."""
    size = torch.empty((), dtype=dtype).element_size()
    if blocks.shape[1] % size == 0 and (blocks.data_ptr() + start) % size == 0:
        return blocks.view(dtype)[:, start // size]
    return blocks[:, start:start + size].contiguous().view(dtype)[:, 0]


def _f16(blocks: torch.Tensor, start: int, count: int = 1, slot: str = "d") -> torch.Tensor:
    """fp16 field(s) at byte ``start`` of every block, as float32 ``(n_blocks, count)``.

    Every finite, infinite and NaN scale converts as in ggml; only NaN *payloads* may differ (torch's scalar tail
    path canonicalises them), which no quantizer ever produces.
    """
    n = blocks.shape[0]
    values = scratch(slot, (n, count), torch.float32, blocks.device)
    for index in range(count):
        values[:, index].copy_(_column(blocks, start + 2 * index, torch.float16))
    return values


def _bytes(blocks: torch.Tensor, start: int, length: int, slot: str) -> torch.Tensor:
    """Bytes ``start:start+length`` of every block as a contiguous ``(n, length)`` tensor."""
    field = scratch(slot, (blocks.shape[0], length), torch.uint8, blocks.device)
    field.copy_(blocks[:, start:start + length])
    return field


def _planes(src: torch.Tensor, fields: tuple[tuple[int, int], ...], slot: str) -> torch.Tensor:
    """``(F, *src.shape)`` uint8: for each ``(shift, mask)``, ``(src >> shift) & mask`` (a negative shift moves
    left), each computed over the whole contiguous ``src`` as a flat array."""
    out = scratch(slot, (len(fields), *src.shape), torch.uint8, src.device)
    for index, (shift, mask) in enumerate(fields):
        plane = out[index]
        if shift >= 0:
            torch.bitwise_right_shift(src, shift, out=plane)
        else:
            torch.bitwise_left_shift(src, -shift, out=plane)
        possible = (0xFF >> shift) if shift >= 0 else (0xFF << -shift) & 0xFF   # bits the shift can leave set
        if possible & ~mask:
            plane.bitwise_and_(mask)
    return out


_NIBBLES = ((0, 0x0F), (4, 0x0F))
_CRUMBS = ((0, 3), (2, 3), (4, 3), (6, 3))


def _accumulator(out: torch.Tensor) -> torch.Tensor:
    """Where the float32 values are built: ``out`` itself, or a float32 scratch of its shape for half outputs."""
    if out.dtype == torch.float32:
        return out
    return scratch("acc", tuple(out.shape), torch.float32, out.device)


def _scale(out: torch.Tensor, acc: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
           subtract: bool = False) -> None:
    """``acc = acc * scale (+ or - offset)`` in float32 with ggml's two roundings (no FMA), then stored in ``out``.

    ``scale``/``offset`` broadcast per (sub-)block against ``acc``'s shape. For a half-precision ``out`` the
    float32 result is rounded once on the final copy, so it equals the float32 result cast.
    """
    acc.mul_(scale)
    if offset is not None:
        if subtract:
            acc.sub_(offset)
        else:
            acc.add_(offset)
    if acc.data_ptr() != out.data_ptr():
        out.view(acc.shape).copy_(acc)


# --- plain floats -----------------------------------------------------------------------------------------------

def dequant_f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))


def dequant_f16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float16))


def dequant_bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))


# --- legacy 32-element blocks -----------------------------------------------------------------------------------

def dequant_q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    acc = _accumulator(out)
    acc.copy_(blocks[:, 2:].view(torch.int8))
    _scale(out, acc, _f16(blocks, 0))  # ggml: x[j] = qs[j] * d


def _nibbles_into(acc_or_q: torch.Tensor, blocks: torch.Tensor, start: int, offset: int = 0) -> None:
    """Low nibbles of bytes ``start:start+16`` -> elements 0..15, high nibbles -> 16..31 (ggml's 32-element
    blocks), minus ``offset`` in the integer domain; ``acc_or_q`` is ``(n, 32)`` float32 or uint8."""
    n = blocks.shape[0]
    planes = _planes(blocks, _NIBBLES, "planes")                           # over whole blocks: contiguous
    if offset:
        planes.view(torch.int8).sub_(offset)                               # ggml: (q - offset) as int, then * d
    halves = acc_or_q.view(n, 2, 16)
    source = planes if halves.dtype == torch.uint8 else planes.view(torch.int8)
    halves[:, 0].copy_(source[0, :, start:start + 16])
    halves[:, 1].copy_(source[1, :, start:start + 16])


def dequant_q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    acc = _accumulator(out)
    _nibbles_into(acc, blocks, 2, offset=8)
    _scale(out, acc, _f16(blocks, 0))


def dequant_q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    acc = _accumulator(out)
    _nibbles_into(acc, blocks, 4)
    _scale(out, acc, _f16(blocks, 0), _f16(blocks, 2, slot="m"))  # ggml: x*d + m


def _gather_bytes(table: str, packed: torch.Tensor, slot: str) -> torch.Tensor:
    """Every byte of ``packed`` (any 2-D strided view) looked up in a 256-entry table: a flat tensor of the
    table's dtype, in ``packed``'s row-major order."""
    index = scratch(slot + ".idx", tuple(packed.shape), torch.int32, packed.device)
    index.copy_(packed)
    lookup = _table(table, packed.device)
    values = scratch(slot, (packed.numel(),), lookup.dtype, packed.device)
    torch.index_select(lookup, 0, index.view(-1), out=values)
    return values


def _q5_values(blocks: torch.Tensor, qh_at: int, qs_at: int) -> torch.Tensor:
    """Q5_0/Q5_1: ``(n, 32)`` uint8 values 0..31: nibbles | (bit j of the 32-bit qh) << 4."""
    n = blocks.shape[0]
    q = scratch("q", (n, 32), torch.uint8, blocks.device)
    _nibbles_into(q, blocks, qs_at)
    high = _gather_bytes("bits8x16", blocks[:, qh_at:qh_at + 4], "high")  # byte b bit i -> element 8 b + i
    q.bitwise_or_(high.view(torch.uint8).view(n, 32))
    return q


def dequant_q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _q5_values(blocks, 2, 6).view(torch.int8)
    q.sub_(16)
    acc = _accumulator(out)
    acc.copy_(q)
    _scale(out, acc, _f16(blocks, 0))


def dequant_q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    acc = _accumulator(out)
    acc.copy_(_q5_values(blocks, 4, 8))
    _scale(out, acc, _f16(blocks, 0), _f16(blocks, 2, slot="m"))


def _iq4_into(acc: torch.Tensor, blocks: torch.Tensor, start: int, runs: int) -> None:
    """IQ4: ``runs`` runs of 16 bytes at ``start`` -> ``(n * runs, 2, 16)`` codebook values in ``acc`` (low nibbles
    are a run's first 16 elements, high nibbles the next 16): one int32 index per byte, then two small integer
    gathers (byte -> int8 codebook value of its low / high nibble)."""
    n = blocks.shape[0]
    index = scratch("idx", (n, runs * 16), torch.int32, blocks.device)
    index.copy_(blocks[:, start:start + runs * 16])
    halves = acc.view(n * runs, 2, 16)
    for half, table in enumerate(("iq4_low", "iq4_high")):
        values = scratch("cb", (n * runs, 16), torch.int8, blocks.device)
        torch.index_select(_table(table, blocks.device), 0, index.view(-1), out=values.view(-1))
        halves[:, half].copy_(values)


def dequant_iq4_nl(blocks: torch.Tensor, out: torch.Tensor) -> None:
    acc = _accumulator(out)
    _iq4_into(acc, blocks, 2, 1)
    _scale(out, acc, _f16(blocks, 0))  # ggml: d * kvalues[q]


# --- K-quants: 256-element super-blocks ---------------------------------------------------------------------------

def _sub_scales_k4(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-element sub-block ``d * sc`` and ``dmin * m`` as ``(n, 8, 1)`` float32 (ggml's d1, m1).

    ggml's get_scale_min_k4 on 12 bytes ``low[4] mid[4] high[4]``: scales are ``low & 63`` then
    ``(high & 15) | (low >> 6) << 4``, mins ``mid & 63`` then ``(high >> 4) | (mid >> 6) << 4``. Done four bytes at
    a time on int32 columns (one op per block, not per byte)."""
    n = blocks.shape[0]
    low, mid, high = (_column(blocks, at, torch.int32) for at in (4, 8, 12))
    words = scratch("k4", (n, 4), torch.int32, blocks.device)              # sc[0:4], sc[4:8], m[0:4], m[4:8]
    torch.bitwise_and(low, 0x3F3F3F3F, out=words[:, 0])
    torch.bitwise_and(mid, 0x3F3F3F3F, out=words[:, 2])
    torch.bitwise_or(high & 0x0F0F0F0F, (low >> 2) & 0x30303030, out=words[:, 1])
    torch.bitwise_or((high >> 4) & 0x0F0F0F0F, (mid >> 2) & 0x30303030, out=words[:, 3])
    fields = words.view(torch.uint8)                                       # (n, 16): 8 scales, 8 mins
    d, dmin = _f16(blocks, 0), _f16(blocks, 2, slot="m")
    d_sub = scratch("d1", (n, 8), torch.float32, blocks.device)
    m_sub = scratch("m1", (n, 8), torch.float32, blocks.device)
    d_sub.copy_(fields[:, 0:8])
    d_sub.mul_(d)
    m_sub.copy_(fields[:, 8:16])
    m_sub.mul_(dmin)
    return d_sub.unsqueeze(-1), m_sub.unsqueeze(-1)


def _k_nibbles_into(target: torch.Tensor, blocks: torch.Tensor, start: int) -> None:
    """Q4_K/Q5_K: 128 bytes at ``start`` -> 256 values, per 64: the 32 low nibbles then the 32 high nibbles."""
    n = blocks.shape[0]
    planes = _planes(_bytes(blocks, start, 128, "qs"), _NIBBLES, "planes").view(2, n * 4, 32)
    pairs = target.view(n * 4, 2, 32)
    pairs[:, 0].copy_(planes[0])
    pairs[:, 1].copy_(planes[1])


def dequant_q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d_sub, m_sub = _sub_scales_k4(blocks)
    acc = _accumulator(out)
    _k_nibbles_into(acc, blocks, 16)
    _scale(out, acc.view(n, 8, 32), d_sub, m_sub, subtract=True)  # ggml: d1 * q - m1


# Bit i of a byte -> (bit << 4) / (bit << 2): one (shift, mask) per bit (negative shifts move left).
_BITS_TO_16 = tuple((i - 4, 0x10) for i in range(8))
_BITS_TO_4 = tuple((k - 2, 0x04) for k in range(8))


def _bits_into(target: torch.Tensor, blocks: torch.Tensor, start: int, fields: tuple[tuple[int, int], ...]) -> None:
    """32 bytes at ``start``: bit k of byte l -> ``target[:, k, l]`` (``(n, 8, 32)`` uint8), as ``fields`` says."""
    planes = _planes(_bytes(blocks, start, 32, "qh"), fields, "high")      # (8 k, n, 32 l)
    for bit in range(8):
        target[:, bit].copy_(planes[bit])


def dequant_q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d_sub, m_sub = _sub_scales_k4(blocks)
    q = scratch("q", (n, 8, 32), torch.uint8, blocks.device)
    _k_nibbles_into(q, blocks, 48)
    high = scratch("h", (n, 8, 32), torch.uint8, blocks.device)
    _bits_into(high, blocks, 16, _BITS_TO_16)                              # bit s of qh[l] -> sub-block s
    q.bitwise_or_(high)
    acc = _accumulator(out)
    acc.view(n, 8, 32).copy_(q)
    _scale(out, acc.view(n, 8, 32), d_sub, m_sub, subtract=True)


# Q6_K: the 2-bit field k of qh[l] -> (field << 4).
_CRUMBS_TO_16 = ((-4, 0x30), (-2, 0x30), (0, 0x30), (2, 0x30))


def _crumbs_into(target: torch.Tensor, blocks: torch.Tensor, start: int, fields: tuple[tuple[int, int], ...]) -> None:
    """64 bytes at ``start`` (two halves of 32): field k of byte 32 h + l -> ``target[n, h, k, l]``."""
    n = blocks.shape[0]
    planes = _planes(_bytes(blocks, start, 64, "qc"), fields, "crumbs").view(4, n * 2, 32)
    rows = target.view(n * 2, 4, 32)
    for field in range(4):
        rows[:, field].copy_(planes[field])


def dequant_q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    q = scratch("q", (n, 2, 4, 32), torch.uint8, blocks.device)            # per half: q1, q2, q3, q4
    planes = _planes(_bytes(blocks, 0, 128, "qs"), _NIBBLES, "planes").view(2, n * 2, 64)
    rows = q.view(n * 2, 2, 64)                                            # q1|q2 = low nibbles, q3|q4 = high
    rows[:, 0].copy_(planes[0])
    rows[:, 1].copy_(planes[1])
    high = scratch("h", (n, 2, 4, 32), torch.uint8, blocks.device)
    _crumbs_into(high, blocks, 128, _CRUMBS_TO_16)
    q.bitwise_or_(high)
    qi = q.view(torch.int8)
    qi.sub_(32)
    d = _f16(blocks, 208)
    scales = scratch("sc", (n, 16), torch.float32, blocks.device)
    scales.copy_(blocks[:, 192:208].view(torch.int8))
    scales.mul_(d)                                                         # ggml: d * sc * q, i.e. (d * sc) * q
    acc = _accumulator(out)
    acc.view(n, 16, 16).copy_(qi.view(n, 16, 16))
    _scale(out, acc.view(n, 16, 16), scales.unsqueeze(-1))


def _scales_q3_k(raw: torch.Tensor) -> torch.Tensor:
    """Q3_K: 12 bytes -> sixteen 6-bit scales (ggml's kmask unpacking), minus 32, as int8 (n, 16)."""
    n = raw.shape[0]
    low = torch.cat((raw[:, 0:8] & 0x0F, raw[:, 0:8] >> 4), dim=-1)        # (n, 16)
    high = _planes(raw[:, 8:12].contiguous(), _CRUMBS, "sc3")              # (4 f, n, 4 b): scale k = 4 f + b
    return (low | (high.permute(1, 0, 2).reshape(n, 16) << 4)).view(torch.int8) - 32


def dequant_q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    dl = _f16(blocks, 108) * _scales_q3_k(blocks[:, 96:108])              # (n, 16)
    q = scratch("q", (n, 2, 4, 32), torch.uint8, blocks.device)            # element 128 h + 32 s + l, k = 4 h + s
    _crumbs_into(q, blocks, 32, _CRUMBS)
    high = scratch("h", (n, 2, 4, 32), torch.uint8, blocks.device)
    _bits_into(high.view(n, 8, 32), blocks, 0, _BITS_TO_4)                 # 4 where hmask bit k is set
    q.bitwise_or_(high)
    qi = q.view(torch.int8)
    qi.sub_(4)                                                             # crumb - (bit ? 0 : 4)
    acc = _accumulator(out)
    acc.view(n, 16, 16).copy_(qi.view(n, 16, 16))
    _scale(out, acc.view(n, 16, 16), dl.unsqueeze(-1))


def dequant_q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82, slot="m")
    dl = (d * (scales & 0x0F)).unsqueeze(-1)
    ml = (dmin * (scales >> 4)).unsqueeze(-1)
    acc = _accumulator(out)
    _crumbs_into(acc, blocks, 16, _CRUMBS)                                 # element 128 h + 32 s + l
    _scale(out, acc.view(n, 16, 16), dl, ml, subtract=True)                # one scale per 16 elements


def dequant_iq4_xs(blocks: torch.Tensor, out: torch.Tensor) -> None:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    scales_h = _planes(blocks[:, 2:4].contiguous(), _CRUMBS, "sch").permute(1, 2, 0).reshape(n, 8)  # 2 bits each
    scales_l = blocks[:, 4:8]                                              # low nibble: even sub-block, high: odd
    scales_l = torch.stack((scales_l & 15, scales_l >> 4), dim=-1).reshape(n, 8)
    dl = d * ((scales_l | (scales_h << 4)).view(torch.int8) - 32)          # ggml: d * (ls - 32)
    acc = _accumulator(out)
    _iq4_into(acc, blocks, 8, 8)
    _scale(out, acc.view(n, 8, 32), dl.unsqueeze(-1))
