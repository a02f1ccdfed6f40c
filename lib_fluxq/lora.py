"""LoRA on quantized weights: merge in float32, then re-quantize to the weight's own GGML type — for every type.

Host-free. Forge merges a LoRA into a GGUF weight by dequantize -> merge -> re-quantize, but can re-quantize only
Q4_0/Q5_0/Q8_0 and raises "Low bit LoRA ... not implemented yet" for every other type. The Forge hook
(lib_fluxq/host/forge.py) hands the merged float weight to ``requantize`` instead; the same functions serve the
standalone engine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib_fluxq.quant import QType, dequantize, get_format, quantize


def can_requantize(qtype: QType) -> bool:
    """True when fluxq has a quantizer for ``qtype`` (K-quants and IQ4 land after the legacy types)."""
    fmt = get_format(qtype)
    probe = torch.zeros(1, fmt.block_size)
    try:
        fmt.quantize_blocks(probe)
    except NotImplementedError:
        return False
    return True


def requantize(values: torch.Tensor, qtype: QType) -> torch.Tensor:
    """A float weight ``(out, in)`` -> packed GGML bytes ``(out, row_bytes)`` of ``qtype``, on ``values``' device.

    Uses the reference quantization (what ggml_quantize_chunk produces without an importance matrix), so a weight
    that went through a LoRA merge is as close to the merged values as a fresh conversion of them would be.
    """
    fmt = get_format(qtype)
    if values.dim() < 1 or values.shape[-1] % fmt.block_size:
        raise ValueError(f"{fmt.name}: a row of {values.shape[-1] if values.dim() else 1} values is not a multiple of "
                         f"the block size {fmt.block_size}; this weight cannot be stored as {fmt.name}")
    return quantize(values.detach().float(), fmt.qtype)


def merge_lora(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, alpha: float | None = None,
               strength: float = 1.0) -> torch.Tensor:
    """``W + strength * (alpha / rank) * up @ down`` in float32 (kohya/diffusers convention; alpha None = rank)."""
    rank = down.shape[0]
    scale = strength * ((alpha if alpha is not None else rank) / rank)
    delta = up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, -1)
    return weight.float() + scale * delta.reshape(weight.shape)


def merge_and_requantize(packed: torch.Tensor, qtype: QType, shape: Sequence[int], up: torch.Tensor,
                         down: torch.Tensor, alpha: float | None = None, strength: float = 1.0) -> torch.Tensor:
    """Packed weight + LoRA -> packed weight of the same type and byte size."""
    weight = dequantize(packed.reshape(-1), qtype, shape, torch.float32)
    merged = merge_lora(weight, up, down, alpha, strength)
    return requantize(merged, qtype)
