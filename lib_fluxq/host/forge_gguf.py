"""GGUF quant classes in the shape Forge's / Neo's ``backend.operations_gguf`` expects, backed by lib_fluxq.quant.

Forge calls ``gguf_cls.bake(parameter)`` once (at the first move to the compute device),
``gguf_cls.dequantize_pytorch(parameter)`` per forward and ``gguf_cls.quantize_pytorch(merged, parameter)`` after a
LoRA merge (parameter = a ParameterGGUF: ``.data`` the bytes, ``.shape`` the logical shape, ``.computation_dtype``,
``.baked``, ``.gguf_cls``).

Two roles:
- **The forward path** (``install_forward_path``, Settings -> fluxq "dequantize every GGUF type with fluxq"): the host's
  type table maps every type fluxq knows to a ``FluxqQuant`` class. Its bake only reshapes, so the bytes stay in GGML
  layout and a memory-mapped file stays mapped (Forge's own bake of Q4_0 / Q4_1 / Q8_0 / Q4_K rewrites every weight
  into new memory while the mapped pages stay resident: the file held twice). Its dequantization is fluxq's: exact
  float32 rounded once to the compute dtype (Forge's rounds the scales to bf16/fp16 first and computes in half
  precision), into a reused scratch buffer inside a layer's forward on CPU. With the setting off, the bake hands the
  parameter to the host's own class (``parameter.gguf_cls`` switches), so a parameter's class always says its layout.
- **LoRA re-quantization** for the host classes that cannot (``requantizing_method``), and one console line per LoRA
  refresh saying what was re-quantized (``lora_refresh_wrapper``).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from lib_fluxq.host.forge import MARK, _fallback, log, setting
from lib_fluxq.lora import can_requantize, requantize
from lib_fluxq.quant import FORMATS, dequantize

_FLOAT_NAMES = ("F32", "F16", "BF16")
FORWARD_SETTING = "fluxq_gguf_forward"


# ---------------------------------------------------------------------------------------------------------------
# Scratch for the dequantized weight inside a layer's forward


class _ForwardState(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


_forward = _ForwardState()


def forward_scope(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a host layer's ``forward``: dequantizations inside it may use the shared weight buffer, because the
    weight is consumed by that layer's op before the next layer dequantizes (outside a forward, e.g. when the host
    turns a GGUF embedding into a lasting Parameter, a fresh tensor is returned)."""
    @functools.wraps(forward)
    def scoped(self: Any, *args: Any, **kwargs: Any) -> Any:
        _forward.depth += 1
        try:
            return forward(self, *args, **kwargs)
        finally:
            _forward.depth -= 1
    scoped.__dict__[MARK] = forward
    return scoped


def _weight_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The thread's shared CPU weight buffer viewed as ``shape``, or None where a fresh tensor is needed.

    CPU only: there a fresh 75-150 MB tensor per layer and step is above glibc's mmap threshold, so every call maps
    and page-faults new zeroed memory; the CUDA caching allocator already reuses blocks, and Forge's async mover
    stream may still be reading the previous weight while the next one is dequantized."""
    if _forward.depth == 0 or device.type != "cpu" or torch.is_grad_enabled():
        return None
    numel = 1
    for size in shape:
        numel *= size
    key = (device, dtype)
    buffer = _forward.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _forward.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


# ---------------------------------------------------------------------------------------------------------------
# fluxq's quant classes


class FluxqQuant:
    """Base of the generated per-type classes: GGML layout, fluxq's dequantizer and quantizer.

    ``host_cls`` is the host's own class for the type (None where the host has none, e.g. IQ4 on Forge): with the
    forward setting off, baking hands the parameter to it.
    """

    qtype: Any
    block_size: int
    type_size: int
    host_cls: Any = None

    @classmethod
    def bake(cls, parameter: Any) -> None:
        if getattr(parameter, "baked", False):
            return
        if cls.host_cls is not None and not setting(FORWARD_SETTING):
            parameter.gguf_cls = cls.host_cls
            cls.host_cls.bake(parameter)
            return
        # A view: the bytes stay where they are (a memory-mapped file stays mapped, nothing is copied).
        parameter.data = parameter.data.reshape(-1).view(torch.uint8).reshape(-1, cls.type_size)
        parameter.baked = True

    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        """GGML layout is already what our dequantizer reads: nothing to precompute."""

    @classmethod
    def dequantize_pytorch(cls, parameter: Any) -> torch.Tensor:
        cls.bake(parameter)
        if parameter.gguf_cls is not cls:   # handed to the host's class just now
            return parameter.gguf_cls.dequantize_pytorch(parameter)
        dtype = getattr(parameter, "computation_dtype", torch.float16)
        shape = tuple(int(size) for size in parameter.shape)   # the host builds it from numpy integers
        data = parameter.data
        return dequantize(data.reshape(-1), cls.qtype, shape, dtype,
                          out=_weight_buffer(shape, dtype, data.device))

    @classmethod
    def quantize_pytorch(cls, data: torch.Tensor, parent: Any) -> Any:
        """Re-quantize a LoRA-merged weight. The host merged into what ``dequantize_pytorch`` gave it, i.e. the weight
        rounded to the computation dtype; the merge is redone on the exact weight (exact + (merged - rounded)), so
        the result is as close to the true merged weight as a fresh quantization of it."""
        started = time.perf_counter()
        if parent.baked and parent.data.dtype == torch.uint8 and tuple(data.shape) == tuple(parent.shape):
            packed, shape = parent.data.reshape(-1), tuple(int(size) for size in parent.shape)
            dtype = getattr(parent, "computation_dtype", torch.float16)
            exact = dequantize(packed, cls.qtype, shape, torch.float32)
            data = exact + (data.float() - dequantize(packed, cls.qtype, shape, dtype).float())
        parent.data = requantize(data, cls.qtype).reshape(-1, cls.type_size)
        parent.baked = True
        _requantized(cls.qtype.name, time.perf_counter() - started)
        return parent


def quant_classes(qtype_enum: Any = None, host_mapping: dict[Any, Any] | None = None,
                  only_missing: bool = False) -> dict[Any, type]:
    """A host-compatible ``FluxqQuant`` class for every quantized type in our table, keyed by ``qtype_enum`` (the
    GGMLQuantizationType the host's type table uses: Forge's / Neo's vendored gguf, whose enum members never equal a
    plain ``import gguf``'s; default: ``import gguf``'s). ``host_mapping``'s class for a type becomes its
    ``host_cls``; ``only_missing`` keeps the types the host has no class for."""
    if qtype_enum is None:
        import gguf
        qtype_enum = gguf.GGMLQuantizationType
    host_mapping = host_mapping or {}
    classes: dict[Any, type] = {}
    for qtype, fmt in FORMATS.items():
        if qtype.name in _FLOAT_NAMES or not hasattr(qtype_enum, qtype.name):
            continue
        key = qtype_enum[qtype.name]
        host_cls = host_mapping.get(key)
        if isinstance(host_cls, type) and issubclass(host_cls, FluxqQuant):
            if not (only_missing and host_cls.host_cls is not None):
                classes[key] = host_cls   # installed before: the same class again
            continue
        if only_missing and host_cls is not None:
            continue
        classes[key] = type(qtype.name, (FluxqQuant,), {"qtype": qtype, "block_size": fmt.block_size,
                                                        "type_size": fmt.type_size, "host_cls": host_cls})
    return classes


def extra_quant_classes(qtype_enum: Any = None) -> dict[Any, type]:
    """A class for every quantized type in our table, without host classes behind them (the caller registers the
    ones the host's table lacks: IQ4_NL, IQ4_XS on Forge / Neo)."""
    return quant_classes(qtype_enum)


def install_lora_report(operations_gguf: Any, patch_attr: Callable[[Any, str, Any], None]) -> None:
    """Wrap the host's LoRA refresh (``backend.patcher.lora.LoraLoader.refresh``) with the console line."""
    import importlib
    try:
        lora = importlib.import_module(operations_gguf.__name__.rsplit(".", 1)[0] + ".patcher.lora")
    except Exception:
        return
    loader_cls = getattr(lora, "LoraLoader", None)
    if loader_cls is not None:
        target, refresh = loader_cls, loader_cls.__dict__.get("refresh")
    else:
        target, refresh = lora, getattr(lora, "refresh", None)
    if refresh is not None and MARK not in getattr(refresh, "__dict__", {}):
        patch_attr(target, "refresh", lora_refresh_wrapper(refresh))


def host_classes(mapping: dict[Any, Any]) -> list[type]:
    """The host's own quant classes behind ``mapping`` (behind our classes where the forward path replaced them)."""
    classes = []
    for quant_cls in mapping.values():
        if isinstance(quant_cls, type) and issubclass(quant_cls, FluxqQuant):
            quant_cls = quant_cls.host_cls
        if quant_cls is not None and quant_cls not in classes:
            classes.append(quant_cls)
    return classes


def install_forward_path(operations: Any, mapping: dict[Any, Any], qtype_enum: Any,
                         patch_attr: Callable[[Any, str, Any], None],
                         patch_item: Callable[[dict[Any, Any], Any, Any], None], add_missing: bool = True) -> int:
    """Serve every GGUF type fluxq knows through ``FluxqQuant`` classes in the host's type table ``mapping``
    (``operations_gguf.quants_mapping`` on Forge, ``QUANTS_MAPPING`` on Neo), and let the host's GGUF layers'
    forwards use the shared weight buffer. Whether a parameter takes fluxq's path or the host's is decided when it
    is baked (Settings -> fluxq, so switching applies at the next model load). Returns how many types it serves.

    ``patch_attr`` / ``patch_item`` are the hook's reversible patchers (uninstall puts everything back)."""
    classes = quant_classes(qtype_enum, mapping)
    if not add_missing:
        classes = {key: quant_cls for key, quant_cls in classes.items() if quant_cls.host_cls is not None}
    for key, quant_cls in classes.items():
        if mapping.get(key) is not quant_cls:
            patch_item(mapping, key, quant_cls)
    operations_module = _host_operations(operations)
    gguf_ops = getattr(operations_module, "ForgeOperationsGGUF", None) if operations_module else None
    for layer_name in ("Linear", "Conv2d", "Embedding"):
        layer = getattr(gguf_ops, layer_name, None)
        forward = getattr(layer, "__dict__", {}).get("forward")
        if forward is not None and MARK not in getattr(forward, "__dict__", {}):
            patch_attr(layer, "forward", forward_scope(forward))
    return len(classes)


def _host_operations(operations_gguf: Any) -> Any:
    """``backend.operations`` (its ForgeOperationsGGUF layers call ``dequantize_tensor``), None when absent."""
    import importlib
    try:
        return importlib.import_module(operations_gguf.__name__.rsplit(".", 1)[0] + ".operations")
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------------
# LoRA: re-quantization for host classes without a quantizer, and the console line


_tally: Counter[str] = Counter()
_tally_seconds: list[float] = [0.0]


def _requantized(type_name: str, seconds: float) -> None:
    _tally[type_name] += 1
    _tally_seconds[0] += seconds


def requantization_summary() -> str | None:
    """The console line for what was re-quantized since the last call (None when nothing was), and reset."""
    if not _tally:
        return None
    parts = ", ".join(f"{count} {name} layer{'s' if count != 1 else ''}" for name, count in sorted(_tally.items()))
    line = f"LoRA merged and re-quantized: {parts} in {_tally_seconds[0]:.1f} s"
    _tally.clear()
    _tally_seconds[0] = 0.0
    return line


def lora_refresh_wrapper(refresh: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the host's LoRA refresh (``LoraLoader.refresh``): after it returns, one console line says which GGUF
    types were re-quantized, how many layers, how long (nothing when no LoRA touched a quantized weight)."""
    @functools.wraps(refresh)
    def refresh_and_report(*args: Any, **kwargs: Any) -> Any:
        requantization_summary()   # drop anything counted outside a refresh
        try:
            return refresh(*args, **kwargs)
        finally:
            line = requantization_summary()
            if line:
                log(line)
    refresh_and_report.__dict__[MARK] = refresh
    return refresh_and_report


def forge_lacks_quantizer(quant_cls: type) -> bool:
    """True when the host's class inherits the abstract ``quantize_blocks_pytorch`` (its LoRA path raises)."""
    for owner in quant_cls.__mro__:
        if "quantize_blocks_pytorch" in owner.__dict__:
            return bool(getattr(owner.__dict__["quantize_blocks_pytorch"], "__isabstractmethod__", False))
    return True


def requantizing_method(quant_cls: type) -> classmethod | None:
    """A ``quantize_pytorch`` for a host quant class that cannot re-quantize, or None when nothing is needed.

    It quantizes the merged weight with lib_fluxq (GGML layout) and then lets the host's own ``bake_inner`` turn it
    into the layout the host's dequantizer reads (Forge rewrites Q4_1 / Q4_K there). Falls back to the host's method
    (its clear NotImplementedError) when the setting is off or fluxq has no quantizer for the type yet.
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
        started = time.perf_counter()
        try:
            packed = requantize(data, qtype)
        except Exception as exc:
            _fallback(f"re-quantizing a LoRA-merged {qtype.name} weight", exc)
            return original(data, parent)
        parent.data = packed.reshape(-1, cls.type_size)
        cls.bake_inner(parent)   # the host's own layout for its dequantizer (e.g. fp16 scales, nibble order)
        parent.baked = True
        _requantized(qtype.name, time.perf_counter() - started)
        return parent

    quantize_pytorch.__dict__[MARK] = original
    return classmethod(quantize_pytorch)


FORMATS_BY_NAME = {qtype.name: qtype for qtype in FORMATS}
