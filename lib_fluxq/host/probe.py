"""What the running WebUI can do, found by looking (signatures, attribute names, one tiny behaviour check), never by
its name or version string. ``probe()`` changes nothing; ``lib_fluxq.host.forge.install`` reads the result and
enables only the patches this host lacks.

Known shapes (NEO_NOTES §1): Forge dfdcbab6 ``load_torch_file(ckpt, safe_load=False, device=None)``,
``quants_mapping``, ``ParameterGGUF(tensor, requires_grad, no_init)`` built from a GGUF reader tensor and copying it,
LoRA merged into GGUF weights by ``backend.patcher.lora.LoraLoader`` (re-quantizes Q4_0/Q5_0/Q8_0 only), errors in
the generation thread kept as exception objects. Forge Neo 2.26: ``load_torch_file(ckpt, *, safe_load=True,
device=None, return_metadata=False)``, ``QUANTS_MAPPING`` keyed by the enum of its own vendored gguf
(``modules_forge.packages.gguf``, a second module object next to a plain ``import gguf``), ``ParameterGGUF(
torch_tensor, *, tensor_type, tensor_shape, no_init)`` sharing the reader's memory map, LoRA on GGUF forced to
on-the-fly fp16 (``dynamic_args.online_lora``), errors kept as text. reForge main / A1111: no ``backend.loader``.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Module attributes that bind the same WebUI function (FORGE_NOTES §4): every one present must point at the wrapper.
# Neo no longer binds load_torch_file in modules.sd_models; an absent binding is simply skipped.
BINDINGS: dict[str, tuple[str, ...]] = {
    "forge_model_reload": ("modules.sd_models", "modules.processing"),
    "forge_loader": ("backend.loader", "modules.sd_models"),
    "load_torch_file": ("backend.utils", "backend.loader", "modules.sd_models"),
}
GGUF_MAPPING_NAMES = ("QUANTS_MAPPING", "quants_mapping")


@dataclass
class Capabilities:
    """What this WebUI has. Every field is filled by looking at the host; nothing here is a guess from a version."""

    webui: bool = False                      # an A1111-family WebUI (``modules.paths`` imports)
    forge_loader: bool = False               # backend.loader.forge_loader + sd_models.forge_model_reload
    bindings: dict[str, tuple[str, ...]] = field(default_factory=dict)   # name -> modules binding it here
    load_torch_file_params: tuple[str, ...] = ()
    gguf_mapping_name: str | None = None     # where GGUF types are registered
    gguf_enum: Any = None                    # the GGMLQuantizationType the host's mapping is keyed by
    gguf_layout: str | None = None           # "reader-tensor" (Forge) / "torch-tensor" (Neo) ParameterGGUF constructor
    gguf_shares_storage: bool = False        # the host's ParameterGGUF (and its .to()) keep the reader's memory map
    lora_on_gguf: str = "none"               # "merge" (LoraLoader re-quantizes) / "online" (per-step fp16) / "none"
    select_takes_preset: bool = False        # main_entry.checkpoint_change / modules_change take a ``preset``
    gpu_weights: str | None = None           # "mb" (main_entry.total_vram) / "fraction" (setting_allocated_vram)
    error_style: str | None = None           # how the generation thread keeps an error: "exception" / "text"
    create_infotext: bool = False            # modules.processing.create_infotext (the image's parameters text)
    problems: list[str] = field(default_factory=list)   # what could not be probed (a patch stays off because of it)

    @property
    def returns_metadata(self) -> bool:
        return "return_metadata" in self.load_torch_file_params


def _module(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except Exception:   # absent, or fails to import outside the WebUI's start-up order
        return None


def _parameters(fn: Callable[..., Any] | None) -> tuple[str, ...]:
    if fn is None:
        return ()
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()


def original(fn: Any) -> Any:
    """The WebUI function under any fluxq wrapper (probing must see the host, not us)."""
    from lib_fluxq.host.patching import MARK
    while getattr(fn, MARK, None) is not None:
        fn = getattr(fn, MARK)
    return fn


def probe() -> Capabilities:
    caps = Capabilities(webui=_module("modules.paths") is not None)
    if not caps.webui:
        return caps
    for name, module_names in BINDINGS.items():
        present = tuple(m for m in module_names if getattr(_module(m), name, None) is not None)
        if present:
            caps.bindings[name] = present
    caps.forge_loader = "forge_loader" in caps.bindings and "forge_model_reload" in caps.bindings
    utils = _module("backend.utils")
    caps.load_torch_file_params = _parameters(original(getattr(utils, "load_torch_file", None)))
    _probe_gguf(caps)
    _probe_lora(caps)
    main_entry = _module("modules_forge.main_entry")
    if main_entry is not None:
        caps.select_takes_preset = "preset" in _parameters(getattr(main_entry, "checkpoint_change", None))
        caps.gpu_weights = gpu_weights_style(main_entry)
    caps.error_style = _error_style()
    processing = _module("modules.processing")
    caps.create_infotext = callable(getattr(processing, "create_infotext", None))
    return caps


def gpu_weights_style(main_entry: Any) -> str | None:
    """How this host's "GPU Weights" is set: MB through main_entry (Forge) or a 0..1 option (Neo)."""
    if hasattr(main_entry, "total_vram") and hasattr(main_entry, "refresh_memory_management_settings"):
        return "mb"
    shared, memory = _module("modules.shared"), _module("backend.memory_management")
    labels = getattr(getattr(shared, "opts", None), "data_labels", {}) or {}
    if "setting_allocated_vram" in labels and hasattr(memory, "total_vram"):
        return "fraction"
    return None


def _probe_gguf(caps: Capabilities) -> None:
    operations = _module("backend.operations_gguf")
    if operations is None:
        return
    caps.gguf_mapping_name = next((n for n in GGUF_MAPPING_NAMES if isinstance(getattr(operations, n, None), dict)),
                                  None)
    host_gguf = getattr(operations, "gguf", None)   # the gguf module the host's own code uses
    caps.gguf_enum = getattr(host_gguf, "GGMLQuantizationType", None)
    if caps.gguf_mapping_name is None or caps.gguf_enum is None:
        caps.problems.append("no GGUF type table (quants_mapping / QUANTS_MAPPING) found in backend.operations_gguf")
        return
    parameter_cls = getattr(operations, "ParameterGGUF", None)
    params = _parameters(getattr(parameter_cls, "__init__", None))
    if "tensor_type" in params and "tensor_shape" in params:
        caps.gguf_layout = "torch-tensor"
    elif "requires_grad" in params:
        caps.gguf_layout = "reader-tensor"
    else:
        caps.problems.append(f"unknown ParameterGGUF constructor {params}")
        return
    try:
        caps.gguf_shares_storage = _parameter_shares_storage(parameter_cls, caps.gguf_layout, caps.gguf_enum)
    except Exception as exc:   # a constructor we do not understand: leave memory handling to the host
        caps.problems.append(f"ParameterGGUF check failed ({type(exc).__name__}: {exc})")
        caps.gguf_shares_storage = True


def _parameter_shares_storage(parameter_cls: type, layout: str, enum: Any) -> bool:
    """Build one tiny ParameterGGUF the way the host's loader does and see whether it (and its ``.to()`` copy, what
    the model load does) still points at the reader's memory: if so, the host keeps GGUF files memory-mapped."""
    import numpy as np
    import torch

    values = np.arange(4, dtype=np.float32)
    source = torch.from_numpy(values)
    if layout == "torch-tensor":
        built = parameter_cls(source, tensor_type=enum.F32, tensor_shape=torch.Size([4]))
    else:
        reader_tensor = types.SimpleNamespace(data=values, tensor_type=enum.F32, shape=np.array([4]), name="probe")
        built = parameter_cls(reader_tensor)
    moved = built.to(device="cpu")
    return built.data_ptr() == source.data_ptr() and moved.data_ptr() == source.data_ptr()


def _probe_lora(caps: Capabilities) -> None:
    lora = _module("backend.patcher.lora")
    if lora is not None and hasattr(lora, "LoraLoader"):
        caps.lora_on_gguf = "merge"     # Forge: merge into the dequantized weight, then gguf_cls.quantize_pytorch
        return
    args = _module("backend.args")
    if hasattr(getattr(args, "dynamic_args", None), "online_lora"):
        caps.lora_on_gguf = "online"    # Neo: GGUF checkpoints get per-step fp16 LoRA (main_entry forces it)


def _error_style() -> str | None:
    main_thread = _module("modules_forge.main_thread")
    task_cls = getattr(main_thread, "Task", None)
    if task_cls is None or not hasattr(main_thread, "last_exception"):
        return None
    try:
        task = task_cls(0, None, (), {})
    except Exception:
        return None
    # Forge keeps the exception object (call_queue formats it); Neo keeps "Type: message" text.
    return "exception" if hasattr(task, "exception") else "text"
