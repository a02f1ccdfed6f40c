"""The Forge load hook: wraps Forge's model-loading functions (Forge has no "before load" callback).

What it does on each load (each part has its own setting in Settings -> fluxq, all on except the GPU Weights one):
- Flux/Chroma checkpoint without CLIP-L / T5-XXL / VAE: adds the matching files from "VAE / Text Encoder" folders,
  chosen by content (lib_fluxq.pairing); if none exist, stops at once with the exact files to download, instead of
  Forge's "You do not have CLIP state dict!" after reading the whole file.
- SD1.5/SDXL/SD3 checkpoint: leaves out selected Flux-only modules (Flux VAE, T5, lone CLIP-L) that break it.
- GGUF: tensors stay memory-mapped (Forge copies the whole file into RAM, then copies it again into the model).
- GGUF IQ4_NL / IQ4_XS: registered in backend.operations_gguf.quants_mapping, dequantized by lib_fluxq.
- GGUF + LoRA: re-quantization for every type (Forge does only Q4_0/Q5_0/Q8_0).

Every name is wrapped at every module that bound it at import time (FORGE_NOTES §4). Installing twice is a no-op.
Any exception raised by fluxq's own code falls through to Forge's original behaviour with one console line.
Only this module (and lib_fluxq/ui) imports Forge's ``modules`` / ``backend`` packages, lazily.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lib_fluxq.pairing import MissingComponentsError, choose_pairing, describe_file, describe_files

LOG_PREFIX = "[fluxq]"
SECTION = ("fluxq", "fluxq")
MARK = "__fluxq_original__"


@dataclass(frozen=True)
class Setting:
    key: str
    default: bool
    label: str


SETTINGS: tuple[Setting, ...] = (
    Setting("fluxq_pair_components", True,
            "Flux: add missing CLIP-L / T5-XXL / VAE from the 'VAE / Text Encoder' folders (chosen by content)"),
    Setting("fluxq_missing_check", True,
            "Flux: when a part is missing, stop before reading the checkpoint and say which files to download"),
    Setting("fluxq_drop_mismatched", True,
            "Leave out selected Flux-only VAE / text encoders when loading SD1.5 / SDXL / SD3 (and SD VAEs for Flux)"),
    Setting("fluxq_gguf_mmap", True, "GGUF: keep tensors memory-mapped instead of copying the file into RAM"),
    Setting("fluxq_gguf_iq4", True, "GGUF: load IQ4_NL / IQ4_XS files (needs a restart to change)"),
    Setting("fluxq_lora_requant", True, "GGUF + LoRA: re-quantize every type (Q2_K..Q6_K, Q4_1, Q5_1, IQ4), "
                                        "not only Q4_0/Q5_0/Q8_0"),
    Setting("fluxq_apply_gpu_weights", False, "Flux: set 'GPU Weights' to the advisor's value when a Flux model loads"),
)
_DEFAULTS = {s.key: s.default for s in SETTINGS}

# Module attributes that bind the same Forge function (FORGE_NOTES §4): all must point at the wrapper.
BINDINGS: dict[str, tuple[str, ...]] = {
    "forge_model_reload": ("modules.sd_models", "modules.processing"),
    "forge_loader": ("backend.loader", "modules.sd_models"),
    "load_torch_file": ("backend.utils", "backend.loader", "modules.sd_models"),
}

# What we changed, to restore on uninstall(): (kind, id(target), name) -> (target, original).
_installed: dict[tuple[str, int, Any], tuple[Any, Any]] = {}
_wrappers: dict[int, Callable[..., Any]] = {}   # id(original) -> its one wrapper, shared by all bindings
_callbacks_registered: list[bool] = []
_announced: list[bool] = []
last_plan: dict[str, Any] = {}       # what the last load did (for the UI / tests): added, dropped, missing


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


def is_forge() -> bool:
    """Forge (not A1111): ``modules_forge`` imports."""
    try:
        importlib.import_module("modules_forge")
    except ImportError:
        return False
    return True


def setting(key: str) -> bool:
    """Current value of one of our settings (its default until Forge's options know it)."""
    try:
        from modules import shared
        value = shared.opts.data.get(key, _DEFAULTS[key])
    except Exception:  # options not ready (early import, tests without a host)
        value = _DEFAULTS[key]
    return bool(value)


def _fallback(where: str, exc: BaseException) -> None:
    log(f"{where} failed ({type(exc).__name__}: {exc}); using Forge's own behaviour for this load")


# ---------------------------------------------------------------------------------------------------------------
# Installing


def install() -> bool:
    """Wrap Forge's loader functions and register GGUF extras. False (and nothing done) outside Forge."""
    if not is_forge():
        return False
    factories = {"forge_model_reload": _wrap_model_reload, "forge_loader": _wrap_forge_loader,
                 "load_torch_file": _wrap_load_torch_file}
    for name, module_names in BINDINGS.items():
        for module_name in module_names:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                _fallback(f"import {module_name}", exc)
                continue
            _wrap_binding(module, name, factories[name])
    try:
        _install_gguf_extras()
    except Exception as exc:
        _fallback("GGUF extras", exc)
    if _installed and not _announced:
        _announced.append(True)
        log(f"Forge load hook active ({sum(1 for k in _installed if k[0] == 'attr')} patches; Settings -> fluxq)")
    return True


def uninstall() -> None:
    """Put every original back (tests; also a manual off switch)."""
    for (kind, _, name), (target, original) in reversed(list(_installed.items())):
        if kind == "attr" and original is _ABSENT:
            delattr(target, name)
        elif kind == "attr":
            setattr(target, name, original)
        elif kind == "dict":
            if original is _ABSENT:
                target.pop(name, None)
            else:
                target[name] = original
    _installed.clear()
    _wrappers.clear()
    _callbacks_registered.clear()
    _announced.clear()


_ABSENT = object()


def _wrap_binding(module: Any, name: str, factory: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    current = getattr(module, name, None)
    if current is None or hasattr(current, MARK):
        return  # absent in this Forge version, or already ours: installing twice changes nothing
    wrapper = _wrappers.get(id(current))
    if wrapper is None:
        wrapper = factory(current)
        setattr(wrapper, MARK, current)
        _wrappers[id(current)] = wrapper
    _installed[("attr", id(module), name)] = (module, current)
    setattr(module, name, wrapper)


def _patch_attr(target: Any, name: str, value: Any) -> None:
    key = ("attr", id(target), name)
    if key not in _installed:
        # On a class, remember only what the class itself defines (an inherited method is restored by deleting).
        original = target.__dict__.get(name, _ABSENT) if isinstance(target, type) else getattr(target, name)
        _installed[key] = (target, original)
    setattr(target, name, value)


def _patch_item(mapping: dict[Any, Any], key: Any, value: Any) -> None:
    marker = ("dict", id(mapping), key)
    if marker not in _installed:
        _installed[marker] = (mapping, mapping.get(key, _ABSENT))
    mapping[key] = value


# ---------------------------------------------------------------------------------------------------------------
# forge_model_reload: nothing changes the load itself here (the hash Forge caches on must stay the user's); after a
# load, optional follow-ups.


def _wrap_model_reload(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forge_model_reload(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            sd_model, just_reloaded = result
            if just_reloaded and setting("fluxq_apply_gpu_weights") and is_flux_model(sd_model):
                apply_advised_gpu_weights(sd_model)
        except Exception as exc:
            _fallback("after-load step", exc)
        return result
    return forge_model_reload


def is_flux_model(sd_model: Any) -> bool:
    try:
        from backend.diffusion_engine.flux import Flux
    except Exception:
        return type(sd_model).__name__ == "Flux"
    return isinstance(sd_model, Flux)


def apply_advised_gpu_weights(sd_model: Any) -> None:
    """Set Forge's GPU Weights to the advisor's value (only when lib_fluxq.advisor provides one)."""
    try:
        advisor = importlib.import_module("lib_fluxq.advisor")
    except ImportError:
        log("GPU Weights setting is on, but this fluxq has no advisor yet; left unchanged")
        return
    advise = getattr(advisor, "gpu_weights_mb_for_loaded_model", None)
    if advise is None:
        log("GPU Weights setting is on, but the advisor offers no GPU Weights value; left unchanged")
        return
    megabytes = advise(sd_model)
    if megabytes is None:
        log("GPU Weights setting is on, but the advisor has no value for this model or device; left unchanged")
        return
    megabytes = int(megabytes)
    from modules import shared
    from modules_forge import main_entry
    shared.opts.set("forge_inference_memory", int(main_entry.total_vram) - megabytes)
    main_entry.refresh_memory_management_settings(model_memory=megabytes)
    log(f"GPU Weights set to {megabytes} MB (advisor)")


# ---------------------------------------------------------------------------------------------------------------
# forge_loader: pick / drop additional modules by content before Forge reads anything.


def _wrap_forge_loader(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forge_loader(sd: Any, additional_state_dicts: Any = None) -> Any:
        try:
            modules = plan_modules(sd, additional_state_dicts)
        except MissingComponentsError:
            raise
        except Exception as exc:
            _fallback("choosing VAE / text encoders", exc)
            return original(sd, additional_state_dicts=additional_state_dicts)
        return original(sd, additional_state_dicts=modules)
    return forge_loader


def module_folders() -> dict[str, str]:
    """The real 'VAE' and 'text_encoder' folders of this install (for the missing-files message)."""
    from modules import paths, shared
    folders = {"VAE": os.path.join(paths.models_path, "VAE"),
               "text_encoder": os.path.join(paths.models_path, "text_encoder")}
    for kind, option in (("VAE", "vae_dir"), ("text_encoder", "text_encoder_dir")):
        value = getattr(shared.cmd_opts, option, None)
        if isinstance(value, str):
            folders[kind] = value
    return folders


MODULE_EXTENSIONS = (".safetensors", ".gguf")   # the ones whose headers can be read cheaply


def available_modules() -> list[str]:
    """Files Forge lists under 'VAE / Text Encoder' (main_entry.module_list), plus files put into those folders
    since Forge last refreshed the list (so "download, then Generate again" works without a restart)."""
    from modules_forge import main_entry
    found = set(main_entry.module_list.values())
    for folder in module_folders().values():
        for root, _, names in os.walk(folder):
            found.update(os.path.join(root, n) for n in names if n.lower().endswith(MODULE_EXTENSIONS))
    return sorted(found)


def free_ram_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def plan_modules(checkpoint: Any, selected: Any) -> Any:
    """The additional module list to hand Forge for ``checkpoint`` (a path); ``selected`` unchanged when nothing
    needs doing. Raises MissingComponentsError when a Flux part is missing and the check is on."""
    last_plan.clear()
    pair, drop, check = (setting("fluxq_pair_components"), setting("fluxq_drop_mismatched"),
                         setting("fluxq_missing_check"))
    if not isinstance(checkpoint, str) or not (pair or drop or check):
        return selected
    selected_paths = list(selected) if isinstance(selected, (list, tuple)) else []
    contents = describe_file(checkpoint)
    if contents.family is None:
        return selected
    chosen = describe_files(selected_paths)
    unreadable = [p for p in selected_paths if p not in {c.path for c in chosen}]
    available = describe_files(available_modules()) if (pair or check) and contents.needs \
        else []
    plan = choose_pairing(contents, chosen, available, free_ram_bytes(), pair=pair, drop=drop)
    plan.modules.extend(unreadable)  # .ckpt/.pt modules we cannot read cheaply: Forge decides, as before
    last_plan.update(checkpoint=checkpoint, family=contents.family, added=dict(plan.added),
                     dropped=list(plan.dropped), missing=list(plan.missing), modules=list(plan.modules))
    for part, path in plan.added.items():
        log(f"{os.path.basename(checkpoint)}: adding {part} from {os.path.basename(path)}")
    for path in plan.dropped:
        log(f"{os.path.basename(checkpoint)} is {contents.family}: leaving out {os.path.basename(path)} "
            f"(does not fit this model)")
    if plan.missing and check:
        raise MissingComponentsError(checkpoint, plan.missing, module_folders(), family=contents.family)
    if not plan.added and not plan.dropped:
        return selected
    return plan.modules


# ---------------------------------------------------------------------------------------------------------------
# load_torch_file / GGUF: memory-mapped tensors, IQ4 types, LoRA re-quantization.


def _wrap_load_torch_file(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load_torch_file(ckpt: Any, safe_load: bool = False, device: Any = None) -> Any:
        on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
        if isinstance(ckpt, str) and ckpt.lower().endswith(".gguf") and on_cpu and setting("fluxq_gguf_mmap"):
            try:
                return load_gguf_mapped(ckpt)
            except Exception as exc:
                _fallback(f"memory-mapping {os.path.basename(ckpt)}", exc)
        return original(ckpt, safe_load=safe_load, device=device)
    return load_torch_file


def load_gguf_mapped(path: str) -> dict[str, Any]:
    """Like Forge's GGUF branch of load_torch_file, but each ParameterGGUF is a view of the file map (no copy).

    The map is private copy-on-write: Forge may write into a tensor (it does not today) without touching the file.
    """
    import gguf  # Forge's vendored gguf-py inside Forge
    import numpy as np
    import torch
    from backend.operations_gguf import ParameterGGUF

    reader = gguf.GGUFReader(path, "c")
    state_dict = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(np.asarray(tensor.data))
        parameter = torch.nn.Parameter.__new__(ParameterGGUF, data, requires_grad=False)
        ParameterGGUF.__init__(parameter, tensor)   # Forge's own bookkeeping: gguf_cls, real_shape, baked, dtype
        state_dict[str(tensor.name)] = parameter
    return state_dict


def _install_gguf_extras() -> None:
    import torch
    from backend import operations_gguf

    parameter_cls = operations_gguf.ParameterGGUF
    original_new = parameter_cls.__dict__["__new__"]
    original_new_fn = original_new.__func__ if isinstance(original_new, staticmethod) else original_new

    def sharing_new(cls: type, tensor: Any = None, requires_grad: bool = False, no_init: bool = False) -> Any:
        # Forge's .to()/copy_with_data builds the result with torch.tensor(data), a full copy even when the data
        # already is where it should be; with memory-mapping on, share the storage instead.
        if no_init and isinstance(tensor, torch.Tensor) and setting("fluxq_gguf_mmap"):
            return torch.Tensor._make_subclass(cls, tensor.detach(), requires_grad)
        return original_new_fn(cls, tensor, requires_grad=requires_grad, no_init=no_init)

    if not getattr(original_new_fn, MARK, None):
        sharing_new.__dict__[MARK] = original_new_fn
        _patch_attr(parameter_cls, "__new__", staticmethod(sharing_new))

    from lib_fluxq.host import forge_gguf
    if setting("fluxq_gguf_iq4"):
        for qtype, quant_cls in forge_gguf.extra_quant_classes().items():
            if qtype not in operations_gguf.quants_mapping:
                _patch_item(operations_gguf.quants_mapping, qtype, quant_cls)
    for quant_cls in list(operations_gguf.quants_mapping.values()):
        replacement = forge_gguf.requantizing_method(quant_cls)
        if replacement is not None:
            _patch_attr(quant_cls, "quantize_pytorch", replacement)


# ---------------------------------------------------------------------------------------------------------------
# Callbacks (registered by scripts/fluxq_hooks.py)


def add_settings() -> None:
    """on_ui_settings: one checkbox per behaviour in Settings -> fluxq."""
    from modules import shared
    for item in SETTINGS:
        shared.opts.add_option(item.key, shared.OptionInfo(item.default, item.label, section=SECTION))


def on_model_loaded(sd_model: Any) -> None:
    """on_model_loaded: one line saying what fluxq changed in this load."""
    if last_plan.get("added") or last_plan.get("dropped"):
        added = ", ".join(f"{k}={os.path.basename(v)}" for k, v in last_plan["added"].items()) or "nothing"
        dropped = ", ".join(os.path.basename(p) for p in last_plan["dropped"]) or "nothing"
        log(f"loaded {type(sd_model).__name__}: added {added}; left out {dropped}")


def register_callbacks() -> bool:
    """Install the wrapper and the callbacks. Returns False on A1111 (nothing registered there)."""
    if not install():
        return False
    if _callbacks_registered:
        return True   # a second import of the script (Forge reloads scripts) registers nothing twice
    _callbacks_registered.append(True)
    from modules import script_callbacks
    script_callbacks.on_ui_settings(add_settings, name="fluxq settings")
    script_callbacks.on_model_loaded(on_model_loaded, name="fluxq model loaded")
    return True


__all__ = ["BINDINGS", "SETTINGS", "add_settings", "install", "is_forge", "load_gguf_mapped", "on_model_loaded",
           "plan_modules", "register_callbacks", "setting", "uninstall"]
