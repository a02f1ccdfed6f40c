"""bitsandbytes NF4 in pure torch: the Forge/bitsandbytes on-disk layouts, a quantizer and a dequantizer.

Layout of one quantized Linear weight ``W`` (keys as ``QuantState.as_dict(packed=True)`` makes them, which is what
Forge's ``ForgeLoader4Bit`` saves and ``Params4bit.from_prequantized`` reads back):

====================================================  =====================  ===================================
key                                                   v2 (no double quant)    v1 (double quant, "compress stats")
====================================================  =====================  ===================================
``W.weight``                                          uint8 ``(ceil(n/2), 1)`` same: two 4-bit codes per byte,
                                                                              element 2i in the high nibble
``W.weight.absmax``                                   float32 per block       uint8 codes of (absmax - offset)
``W.weight.quant_map``                                float32[16] NF4 table   same
``W.weight.nested_absmax``                            —                       float32 per 256 absmax values
``W.weight.nested_quant_map``                         —                       float32[256] dynamic 8-bit map
``W.weight.quant_state.bitsandbytes__nf4``            uint8 JSON: quant_type, blocksize, dtype, shape
                                                      (+ v1: nested_blocksize, nested_dtype, nested_offset)
====================================================  =====================  ===================================

Blocks run over the flattened (row-major) tensor, ``blocksize`` consecutive elements each (64 in Forge's files).
Dequantization is ``quant_map[code] * absmax[block]`` in float32 (v1 first restores absmax as
``nested_quant_map[absmax_code] * nested_absmax[block256] + nested_offset``), so it is exact to bitsandbytes'.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lib_fluxq.errors import FormatError

BLOCKSIZE = 64
QUANT_STATE_SUFFIX = "quant_state.bitsandbytes__nf4"
NF4_MARKER = "bitsandbytes__nf4"
FP4_MARKER = "bitsandbytes__fp4"

# The NF4 data type (QLoRA, Dettmers et al. 2023): 16 quantiles of N(0, 1) normalised to [-1, 1], 0 exact.
# These are the format's defining constants as float32; tests check them against bitsandbytes' get_4bit_type("nf4").
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class NF4Weight:
    """One NF4-quantized weight in v2 form (what the quantizer produces and the writer stores)."""

    packed: torch.Tensor      # uint8 (ceil(n/2), 1)
    absmax: torch.Tensor      # float32 (n_blocks,)
    shape: tuple[int, ...]
    blocksize: int = BLOCKSIZE
    dtype_name: str = "bfloat16"  # dtype bitsandbytes dequantizes to (Forge casts to its compute dtype anyway)

    def quant_state_blob(self) -> torch.Tensor:
        return pack_quant_state({"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.dtype_name,
                                 "shape": list(self.shape)})

    def state_dict(self, weight_key: str) -> dict[str, torch.Tensor]:
        """The v2 keys for ``weight_key`` (e.g. ``model.diffusion_model.single_blocks.0.linear1.weight``)."""
        return {
            weight_key: self.packed,
            f"{weight_key}.absmax": self.absmax,
            f"{weight_key}.quant_map": NF4_CODE.clone(),
            f"{weight_key}.{QUANT_STATE_SUFFIX}": self.quant_state_blob(),
        }


def v2_layout(weight_key: str, shape: tuple[int, ...], dtype_name: str = "bfloat16",
              blocksize: int = BLOCKSIZE) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(key, dtype, shape)`` of every tensor the v2 layout stores for one weight, known before quantizing
    (so a streaming writer can lay out the whole file first)."""
    n = math.prod(shape)
    blob = NF4Weight(torch.empty(0), torch.empty(0), tuple(shape), blocksize, dtype_name).quant_state_blob()
    return [
        (weight_key, torch.uint8, ((n + 1) // 2, 1)),
        (f"{weight_key}.absmax", torch.float32, (math.ceil(n / blocksize),)),
        (f"{weight_key}.quant_map", torch.float32, (16,)),
        (f"{weight_key}.{QUANT_STATE_SUFFIX}", torch.uint8, (blob.numel(),)),
    ]


def pack_quant_state(values: dict[str, object]) -> torch.Tensor:
    """The non-tensor quant-state fields as bitsandbytes packs them: UTF-8 JSON bytes in a uint8 tensor."""
    return torch.frombuffer(bytearray(json.dumps(values).encode("utf-8")), dtype=torch.uint8).clone()


def unpack_quant_state(blob: torch.Tensor) -> dict[str, object]:
    return json.loads(bytes(blob.cpu().to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))


def quantize_nf4(values: torch.Tensor, blocksize: int = BLOCKSIZE, dtype_name: str | None = None,
                 chunk_blocks: int = 1 << 16) -> NF4Weight:
    """Blockwise absmax NF4 quantization (bitsandbytes' algorithm: scale by 1/absmax, nearest code by midpoints).

    Works through ``chunk_blocks`` blocks at a time so the float32 temporaries stay small for huge weights.
    """
    shape = tuple(values.shape)
    flat = values.detach().reshape(-1)
    n = flat.numel()
    n_blocks = math.ceil(n / blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    midpoints = ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(flat.device)
    step = chunk_blocks * blocksize  # even, so every chunk but the last packs whole bytes
    for start in range(0, n, step):
        part = flat[start:start + step].float()
        count = part.numel()
        part_blocks = math.ceil(count / blocksize)
        # zero padding leaves the block's absmax unchanged; padded codes are cut off below
        blocks = torch.nn.functional.pad(part, (0, part_blocks * blocksize - count)).view(part_blocks, blocksize)
        block_absmax = blocks.abs().amax(dim=1)
        if count % blocksize:  # bitsandbytes stores a partial last block's absmax already clamped
            block_absmax[-1] = block_absmax[-1].clamp(min=1e-38)
        # multiply by the reciprocal (not divide) and clamp tiny absmax as bitsandbytes does: the same bits out
        scaled = torch.clamp(blocks * (1.0 / block_absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)[:count]
        if count % 2:  # an odd count fills the last low nibble with the code of 0.0
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        packed[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // blocksize:start // blocksize + part_blocks] = block_absmax
    if dtype_name is None:
        dtype_name = _DTYPE_NAMES.get(values.dtype, "bfloat16")
    return NF4Weight(packed=packed.unsqueeze(1), absmax=absmax, shape=shape, blocksize=blocksize,
                     dtype_name=dtype_name)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   blocksize: int = BLOCKSIZE, quant_map: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed 4-bit codes + float32 per-block absmax -> ``shape`` tensor (computed in float32, then cast)."""
    n = math.prod(shape)
    code = (NF4_CODE if quant_map is None else quant_map.reshape(-1).float()).to(packed.device)
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    codes = torch.stack(((flat >> 4), (flat & 0x0F)), dim=1).reshape(-1)[:n].long()
    n_blocks = math.ceil(n / blocksize)
    values = torch.nn.functional.pad(code[codes], (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    values = values * absmax.reshape(-1).float()[:n_blocks].unsqueeze(1)
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


def restore_nested_absmax(absmax_codes: torch.Tensor, nested_absmax: torch.Tensor, nested_quant_map: torch.Tensor,
                          nested_blocksize: int, nested_offset: float) -> torch.Tensor:
    """v1 double quantization: 8-bit codes of (absmax - offset), blockwise over ``nested_blocksize`` values."""
    codes = absmax_codes.reshape(-1).long()
    n = codes.numel()
    n_blocks = math.ceil(n / nested_blocksize)
    values = torch.nn.functional.pad(nested_quant_map.reshape(-1).float()[codes], (0, n_blocks * nested_blocksize - n))
    values = (values.view(n_blocks, nested_blocksize) * nested_absmax.reshape(-1).float()[:n_blocks].unsqueeze(1))
    # bitsandbytes adds the offset as a float32 scalar after the blockwise product
    return values.reshape(-1)[:n] + torch.tensor(float(nested_offset), dtype=torch.float32)


def is_nf4_key(name: str) -> bool:
    return NF4_MARKER in name or FP4_MARKER in name


def quantized_weight_keys(names: list[str] | set[str]) -> list[str]:
    """The weight keys that carry a packed bitsandbytes quant state (v1 or v2), in file order."""
    suffixes = (f".{QUANT_STATE_SUFFIX}", f".quant_state.{FP4_MARKER}")
    out = []
    for name in names:
        for suffix in suffixes:
            if name.endswith(suffix):
                out.append(name[: -len(suffix)])
    return out


def dequantize_state(tensors: Mapping[str, torch.Tensor], weight_key: str, path: str | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize ``weight_key`` from its v1 or v2 keys in ``tensors`` (a state dict or lazy mapping).

    ``dtype`` defaults to the quant state's own ``dtype`` field, as bitsandbytes' ``dequantize_4bit`` does.
    """
    blob_key = next((f"{weight_key}.quant_state.{m}" for m in (NF4_MARKER, FP4_MARKER)
                     if f"{weight_key}.quant_state.{m}" in tensors), None)
    if blob_key is None:
        raise FormatError(path, "no bitsandbytes quant state stored for this weight", tensor=weight_key)
    try:
        state = unpack_quant_state(tensors[blob_key])
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        out_dtype = dtype or getattr(torch, str(state.get("dtype", "float32")))
        absmax = tensors[f"{weight_key}.absmax"]
        quant_map = tensors[f"{weight_key}.quant_map"]
        if f"{weight_key}.nested_absmax" in tensors:
            absmax = restore_nested_absmax(absmax, tensors[f"{weight_key}.nested_absmax"],
                                           tensors[f"{weight_key}.nested_quant_map"],
                                           int(state["nested_blocksize"]), float(state["nested_offset"]))
        elif absmax.dtype == torch.uint8:
            raise KeyError(f"{weight_key}.nested_absmax")
        packed = tensors[weight_key]
    except KeyError as exc:
        raise FormatError(path, f"incomplete bitsandbytes quant state: missing {exc}", tensor=weight_key,
                          fix="the file is damaged or was written by an unknown tool") from None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise FormatError(path, f"unreadable bitsandbytes quant state: {exc}", tensor=weight_key) from None
    n = math.prod(shape)
    if packed.numel() * packed.element_size() != (n + 1) // 2 or absmax.numel() != math.ceil(n / blocksize) \
            or quant_map.numel() != 16:
        raise FormatError(path, f"NF4 sizes do not match shape {list(shape)} / blocksize {blocksize}",
                          tensor=weight_key, fix="the file is damaged; download it again")
    return dequantize_nf4(packed, absmax, shape, blocksize, quant_map, out_dtype)
