"""GGUF quant classes in the shape Forge's ``backend.operations_gguf`` expects, backed by lib_fluxq.quant.

Forge calls ``gguf_cls.bake(parameter)`` once, ``gguf_cls.dequantize_pytorch(parameter)`` per forward and
``gguf_cls.quantize_pytorch(merged, parameter)`` after a LoRA merge (parameter = a ParameterGGUF: ``.data`` the
bytes, ``.shape`` the logical shape, ``.computation_dtype``, ``.baked``). Our classes keep the bytes in plain GGML
layout ("baking" only reshapes), so dequantization and re-quantization are exactly lib_fluxq's.
"""

from __future__ import annotations

from typing import Any

import torch

from lib_fluxq.host.forge import MARK, _fallback, setting
from lib_fluxq.lora import can_requantize, requantize
from lib_fluxq.quant import FORMATS, dequantize

_FLOAT_NAMES = ("F32", "F16", "BF16")


class FluxqQuant:
    """Base of the generated per-type classes (one per GGML type Forge does not map)."""

    qtype: Any
    block_size: int
    type_size: int

    @classmethod
    def bake(cls, parameter: Any) -> None:
        if getattr(parameter, "baked", False):
            return
        parameter.data = parameter.data.reshape(-1).view(torch.uint8).reshape(-1, cls.type_size)
        parameter.baked = True

    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        """GGML layout is already what our dequantizer reads: nothing to precompute."""

    @classmethod
    def dequantize_pytorch(cls, parameter: Any) -> torch.Tensor:
        cls.bake(parameter)
        dtype = getattr(parameter, "computation_dtype", torch.float16)
        return dequantize(parameter.data.reshape(-1), cls.qtype, tuple(parameter.shape), dtype)

    @classmethod
    def quantize_pytorch(cls, data: torch.Tensor, parent: Any) -> Any:
        parent.data = requantize(data, cls.qtype).reshape(-1, cls.type_size)
        parent.baked = True
        return parent


def extra_quant_classes(qtype_enum: Any = None) -> dict[Any, type]:
    """A Forge-compatible class for every quantized type in our table (IQ4_NL, IQ4_XS, ...), keyed by
    ``qtype_enum``: the GGMLQuantizationType the host's type table uses (Neo's vendored gguf is a second module
    object whose enum members never equal a plain ``import gguf``'s); default: the gguf-py ``import gguf`` gives."""
    if qtype_enum is None:
        import gguf
        qtype_enum = gguf.GGMLQuantizationType

    classes: dict[Any, type] = {}
    for qtype, fmt in FORMATS.items():
        if qtype.name in _FLOAT_NAMES or not hasattr(qtype_enum, qtype.name):
            continue
        key = qtype_enum[qtype.name]
        classes[key] = type(qtype.name, (FluxqQuant,), {"qtype": qtype, "block_size": fmt.block_size,
                                                        "type_size": fmt.type_size})
    return classes


def forge_lacks_quantizer(quant_cls: type) -> bool:
    """True when Forge's class inherits the abstract ``quantize_blocks_pytorch`` (its LoRA path raises)."""
    for owner in quant_cls.__mro__:
        if "quantize_blocks_pytorch" in owner.__dict__:
            return bool(getattr(owner.__dict__["quantize_blocks_pytorch"], "__isabstractmethod__", False))
    return True


def requantizing_method(quant_cls: type) -> classmethod | None:
    """A ``quantize_pytorch`` for a Forge quant class that cannot re-quantize, or None when nothing is needed.

    It quantizes the merged weight with lib_fluxq (GGML layout) and then lets Forge's own ``bake_inner`` turn it
    into the layout Forge's dequantizer reads. Falls back to Forge's method (its clear NotImplementedError) when
    the setting is off or fluxq has no quantizer for the type yet.
    """
    if issubclass(quant_cls, FluxqQuant) or not forge_lacks_quantizer(quant_cls):
        return None
    own = quant_cls.__dict__.get("quantize_pytorch")
    if own is not None and getattr(getattr(own, "__func__", None), MARK, None) is not None:
        return None  # already ours
    original = quant_cls.quantize_pytorch   # bound to quant_cls
    qtype = FORMATS_BY_NAME.get(getattr(getattr(quant_cls, "qtype", None), "name", ""))
    if qtype is None:
        return None

    def quantize_pytorch(cls: type, data: torch.Tensor, parent: Any) -> Any:
        if not (setting("fluxq_lora_requant") and can_requantize(qtype)):
            return original(data, parent)
        try:
            packed = requantize(data, qtype)
        except Exception as exc:
            _fallback(f"re-quantizing a LoRA-merged {qtype.name} weight", exc)
            return original(data, parent)
        parent.data = packed.reshape(-1, cls.type_size)
        cls.bake_inner(parent)   # Forge's own layout for its dequantizer (e.g. fp16 scales, nibble order)
        parent.baked = True
        return parent

    quantize_pytorch.__dict__[MARK] = original
    return classmethod(quantize_pytorch)


FORMATS_BY_NAME = {qtype.name: qtype for qtype in FORMATS}
