"""Torch quantization kernels, one per GGML block layout (the reference algorithms, no importance matrix).

Each kernel takes ``(n_blocks, block_size)`` float32 and returns ``(n_blocks, type_size)`` uint8 in GGML layout.
"""

from __future__ import annotations

import torch


def quant_f32(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.uint8)


def quant_f16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float16).contiguous().view(torch.uint8)


def quant_bf16(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).contiguous().view(torch.uint8)


def _not_yet(name: str):
    def kernel(values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"quantization to {name} is not implemented yet")
    return kernel


quant_q8_0 = _not_yet("Q8_0")
quant_q6_k = _not_yet("Q6_K")
quant_q5_k = _not_yet("Q5_K")
quant_q5_1 = _not_yet("Q5_1")
quant_q5_0 = _not_yet("Q5_0")
quant_q4_k = _not_yet("Q4_K")
quant_q4_1 = _not_yet("Q4_1")
quant_q4_0 = _not_yet("Q4_0")
quant_q3_k = _not_yet("Q3_K")
quant_q2_k = _not_yet("Q2_K")
quant_iq4_nl = _not_yet("IQ4_NL")
quant_iq4_xs = _not_yet("IQ4_XS")
