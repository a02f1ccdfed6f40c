"""Quantized Linear layers that keep packed GGML weights and dequantize on the fly in forward."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from lib_fluxq.flux import FORGE_PREFIX
from lib_fluxq.quant import dequantize, get_format, resolve_qtype

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


class _WeightBuffers(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, ...], torch.Tensor] = {}


_weight_buffers = _WeightBuffers()


def shared_weight_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One grow-only buffer per (device, dtype, CUDA stream) and thread, viewed as ``shape``: the dequantized weight
    of every QuantLinear lands there, so a forward allocates nothing per layer. (On CPU a fresh 75-150 MB weight per
    call is above glibc's mmap threshold: new zeroed pages, page faults, every call.) Valid until the next
    QuantLinear of the same thread, dtype and device runs."""
    numel = 1
    for size in shape:
        numel *= int(size)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (device, dtype, stream)
    buffer = _weight_buffers.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _weight_buffers.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_weight_buffers() -> None:
    """Free this thread's shared weight buffers (e.g. after unloading a model)."""
    _weight_buffers.buffers.clear()


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored packed (uint8, GGML layout) and dequantized into ``x.dtype`` per call.

    The packed bytes are a non-float buffer, so ``module.to(dtype)`` leaves them alone while ``module.to(device)``
    moves them; the bias follows the input dtype at call time. Without autograd the weight is dequantized into the
    thread's shared buffer (``shared_weight_buffer``); when autograd may keep it for backward, into a fresh tensor.
    """

    def __init__(self, in_features: int, out_features: int, qtype: GGMLQuantizationType | str | int,
                 packed: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        fmt = get_format(qtype)
        if in_features % fmt.block_size:
            raise ValueError(f"{fmt.name}: in_features {in_features} is not a multiple of {fmt.block_size}")
        expected = fmt.packed_bytes(in_features * out_features)
        if packed.dtype != torch.uint8 or packed.numel() != expected:
            raise ValueError(f"{fmt.name} weight ({out_features}x{in_features}) needs {expected} packed bytes, "
                             f"got {packed.numel()} of {packed.dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.qtype = fmt.qtype
        self.register_buffer("packed_weight", packed.reshape(-1))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.packed_weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            weight = self.dequantized_weight(x.dtype)
        else:
            buffer = shared_weight_buffer(shape, x.dtype, self.packed_weight.device)
            weight = dequantize(self.packed_weight, self.qtype, shape, x.dtype, out=buffer)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"bias={self.bias is not None}")


def _packed_entry(entry: Any) -> tuple[GGMLQuantizationType, torch.Tensor, tuple[int, ...]] | None:
    """(qtype, packed bytes, torch shape) for a quantized GGUF tensor, None for plain tensors."""
    qtype = getattr(entry, "qtype", None)
    if qtype is None:
        return None
    return resolve_qtype(qtype), entry.data, tuple(entry.shape)


def _as_float(entry: Any) -> torch.Tensor:
    return entry.dequantize() if hasattr(entry, "dequantize") and hasattr(entry, "qtype") else entry


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Accept BFL keys with or without Forge/ComfyUI's ``model.diffusion_model.`` prefix."""
    if any(k.startswith(FORGE_PREFIX) for k in state_dict):
        return {k[len(FORGE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(FORGE_PREFIX)}
    return dict(state_dict)


def swap_quantized_linears(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> list[str]:
    """Replace every ``nn.Linear`` whose weight is quantized in ``state_dict`` by a QuantLinear over those bytes.

    ``state_dict`` maps BFL names (``double_blocks.0.img_attn.qkv.weight``, optionally prefixed) to GGUFTensor-like
    objects (``qtype``, ``data``, ``shape``, ``dequantize()``) or plain tensors. Linears with float weights get them
    copied in. The packed bytes are used as given (a memory-mapped view stays a view). Returns the swapped names.
    """
    entries = _strip_prefix(state_dict)
    swapped: list[str] = []
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in linears:
        weight_key, bias_key = f"{name}.weight", f"{name}.bias"
        if weight_key not in entries:
            if strict:
                raise KeyError(f"no weight for Linear '{name}' in the state dict (expected key '{weight_key}')")
            continue
        expected_shape = (linear.out_features, linear.in_features)
        bias = _as_float(entries[bias_key]) if bias_key in entries else None
        if (bias is None) != (linear.bias is None):
            has = "lacks" if bias is None else "has"
            raise ValueError(f"'{name}': the state dict {has} a bias and the model does not agree")
        packed = _packed_entry(entries[weight_key])
        if packed is not None and packed[0] not in _FLOAT_TYPES:
            qtype, data, shape = packed
            if shape != expected_shape:
                raise ValueError(f"'{weight_key}': shape {list(shape)} does not match the model's "
                                 f"{list(expected_shape)}")
            replacement = QuantLinear(linear.in_features, linear.out_features, qtype, data, bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            swapped.append(name)
            continue
        weight = _as_float(entries[weight_key])
        if tuple(weight.shape) != expected_shape:
            raise ValueError(f"'{weight_key}': shape {list(weight.shape)} does not match the model's "
                             f"{list(expected_shape)}")
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
    return swapped
