"""The load hook for Forge-family WebUIs (Forge dfdcbab6, Forge Neo): wraps the host's model loading (it has no
"before load" callback) and adds only what the running host lacks.

``install()`` first probes the host (lib_fluxq.host.probe: signatures, attribute names, one tiny behaviour check),
then enables the patches this host needs and says once at startup which ones it skipped and why. What each does
(each has its own switch in Settings -> fluxq; the section lists only the ones that apply on this host):
- Flux/Chroma checkpoint without CLIP-L / T5-XXL / VAE: adds the matching files from "VAE / Text Encoder" folders,
  chosen by content (lib_fluxq.pairing); if none exist, stops at once with the exact files to download, instead of
  the host's "You do not have CLIP state dict!" after reading the whole file.
- SD1.5/SDXL/SD3 checkpoint: leaves out selected Flux-only modules (Flux VAE, T5, lone CLIP-L) that break it, and
  out of the image's infotext and the host's "Loading Model:" line too.
- GGUF memory-mapping (hosts that copy the file into RAM, i.e. Forge; Neo maps it itself).
- GGUF IQ4_NL / IQ4_XS registered in the host's type table, keyed by the host's own gguf enum.
- GGUF forward: every type dequantized by fluxq (exact, into a reused buffer) without the host's bake copy of
  Q4_0 / Q4_1 / Q8_0 / Q4_K (lib_fluxq/host/forge_gguf.py).
- GGUF + LoRA: re-quantization for every type where the host merges LoRA into GGUF weights (Forge re-quantizes
  only Q4_0/Q5_0/Q8_0), with one console line per refresh; where the host applies LoRA to GGUF on the fly every
  step (Neo), an optional merge-once.
- A missing part is one line in the UI and one in the console (lib_fluxq.host.user_errors).

Every wrapper takes ``*args, **kwargs``, hands them on unchanged and returns what it got back. Any exception raised
by fluxq's own code falls back to the host's own behaviour with one console line. Only lib_fluxq/host and
lib_fluxq/ui import the WebUI's ``modules`` / ``backend`` packages, lazily.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lib_fluxq.host import user_errors, webui
from lib_fluxq.host.patching import MARK, installed, patch_attr, patch_item, restore_all, wrap_binding
from lib_fluxq.host.probe import Capabilities, probe
from lib_fluxq.pairing import MissingComponentsError, choose_pairing, describe_file, describe_files

LOG_PREFIX = "[fluxq]"
SECTION = ("fluxq", "fluxq")
NEEDS_LOADER = ("fluxq: this WebUI has no Forge model loader (backend.loader.forge_loader), so Flux loading, pairing "
                "and the GGUF extras are off here; the Flux Quant tab (machine, advisor, inspect, convert, compare) "
                "and the refine script work")


@dataclass(frozen=True)
class Setting:
    key: str
    default: bool
    label: str
    patch: str = "load"     # the patch it switches; the setting is listed only where that patch is active


SETTINGS: tuple[Setting, ...] = (
    Setting("fluxq_pair_components", True,
            "Flux: add missing CLIP-L / T5-XXL / VAE from the 'VAE / Text Encoder' folders (chosen by content)"),
    Setting("fluxq_missing_check", True,
            "Flux: when a part is missing and none is on disk, stop before reading the checkpoint and say which files "
            "to download (with the setting above on)"),
    Setting("fluxq_drop_mismatched", True,
            "Leave out selected Flux-only VAE / text encoders when loading SD1.5 / SDXL / SD3 (and SD VAEs for Flux)"),
    Setting("fluxq_gguf_mmap", True, "GGUF: keep tensors memory-mapped instead of copying the file into RAM", "mmap"),
    Setting("fluxq_gguf_iq4", True, "GGUF: load IQ4_NL / IQ4_XS files (needs a restart to change)", "iq4"),
    Setting("fluxq_gguf_forward", True, "GGUF: dequantize every type with fluxq (exact; no second copy of Q4_0 / "
                                        "Q4_1 / Q8_0 / Q4_K in RAM); applies at the next model load", "gguf_forward"),
    Setting("fluxq_lora_requant", True, "GGUF + LoRA: re-quantize every type (Q2_K..Q6_K, Q4_1, Q5_1, IQ4), "
                                        "not only Q4_0/Q5_0/Q8_0", "lora_requant"),
    Setting("fluxq_lora_merge", False, "GGUF + LoRA: merge the LoRA once and re-quantize, instead of applying it "
                                       "in fp16 at every step", "lora_merge"),
    Setting("fluxq_apply_gpu_weights", False, "Flux: set 'GPU Weights' to the advisor's value when a Flux model loads",
            "gpu_weights"),
)
_DEFAULTS = {s.key: s.default for s in SETTINGS}

# What a skipped patch means for the user, said once at startup.
SKIP_REASONS = {
    "mmap": "GGUF memory-mapping (this WebUI keeps GGUF files mapped itself)",
    "lora_requant": "LoRA re-quantization (this WebUI does not merge LoRAs into GGUF weights)",
    "quiet_errors": "one-line missing-part errors (this WebUI's generation thread has an unknown shape)",
    "infotext": "infotext without left-out modules (no processing.create_infotext)",
    "gpu_weights": "advised GPU Weights (no GPU Weights setting found)",
}


@dataclass
class _State:
    caps: Capabilities | None = None
    active: set[str] = field(default_factory=set)         # patches in place
    skipped: dict[str, str] = field(default_factory=dict)  # patch -> why not
    callbacks: bool = False
    announced: bool = False


_state = _State()
last_plan: dict[str, Any] = {}       # what the last load did (for the UI / tests): added, dropped, missing


@dataclass
class _LoadedWith:
    """The modules the current model was really loaded with, where that differs from the user's selection."""

    model: Any            # weakref to the loaded model
    selected: list[str]   # the user's selection at load time
    modules: list[str]    # what the loader got


_loaded: list[_LoadedWith] = []


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


def is_forge() -> bool:
    """A WebUI with Forge's model loader (Forge, Neo)."""
    caps = _state.caps or probe()
    return caps.forge_loader


def capabilities() -> Capabilities | None:
    """What ``install`` found (None before it ran)."""
    return _state.caps


def active_patches() -> frozenset[str]:
    return frozenset(_state.active)


def setting(key: str) -> bool:
    """Current value of one of our settings (its default until the WebUI's options know it)."""
    return bool(webui.option(key, _DEFAULTS[key]))


def _fallback(where: str, exc: BaseException) -> None:
    log(f"{where} failed ({type(exc).__name__}: {exc}); using the WebUI's own behaviour for this load")


# ---------------------------------------------------------------------------------------------------------------
# Installing


def install() -> bool:
    """Probe the host, then patch what it lacks. False (and nothing patched) without Forge's loader."""
    if _state.caps is not None:
        return _state.caps.forge_loader   # installing twice changes nothing
    caps = probe()
    if not caps.webui:
        return False   # not inside a WebUI (tests, the standalone app): nothing to remember
    _state.caps = caps
    if not caps.forge_loader:
        if not _state.announced:
            _state.announced = True
            log(NEEDS_LOADER)
        return False
    for module_name in caps.bindings["forge_model_reload"]:
        if wrap_binding(importlib.import_module(module_name), "forge_model_reload", _wrap_model_reload):
            _state.active.add("load")
    steps: tuple[tuple[str, Callable[[Capabilities], str | None]], ...] = (
        ("mmap", _install_mmap), ("iq4", _install_iq4), ("gguf_forward", _install_gguf_forward),
        ("lora_requant", _install_lora_requant),
        ("lora_merge", _install_lora_merge), ("quiet_errors", _install_quiet_errors),
        ("infotext", _install_infotext), ("gpu_weights", _check_gpu_weights))
    for name, step in steps:
        try:
            reason = step(caps)
        except Exception as exc:
            reason = f"{name} could not be installed ({type(exc).__name__}: {exc})"
        if reason is None:
            _state.active.add(name)
        else:
            _state.skipped[name] = reason
    _announce(caps)
    return True


def _announce(caps: Capabilities) -> None:
    if _state.announced:
        return
    _state.announced = True
    log(f"Forge load hook active ({len(installed())} patches; Settings -> fluxq)")
    if _state.skipped:
        log("not needed or not possible here: " + "; ".join(_state.skipped.values()))
    for problem in caps.problems:
        log(f"probe: {problem}")


def uninstall() -> None:
    """Put every original back (tests; also a manual off switch)."""
    restore_all()
    _state.caps = None
    _state.active.clear()
    _state.skipped.clear()
    _state.callbacks = False
    _state.announced = False
    _loaded.clear()


# ---------------------------------------------------------------------------------------------------------------
# forge_model_reload: decide the module list before the host hashes, prints and loads; afterwards, optional steps.


def _wrap_model_reload(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forge_model_reload(*args: Any, **kwargs: Any) -> Any:
        try:
            swap = _plan_reload()
        except MissingComponentsError:
            raise
        except Exception as exc:
            _fallback("choosing VAE / text encoders", exc)
            swap = None
        if swap is None:
            result = original(*args, **kwargs)
        else:
            data, user_parameters, planned = swap
            data.forge_loading_parameters = planned   # what the host prints ("Loading Model:") and loads
            try:
                result = original(*args, **kwargs)
            finally:
                if data.forge_loading_parameters is planned:
                    data.forge_loading_parameters = user_parameters
            # the host cached the load under the planned parameters; the next call compares the user's
            if data.forge_hash == str(planned):
                data.forge_hash = str(user_parameters)
        _after_load(result, swap)
        return result
    return forge_model_reload


def _plan_reload() -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """(model_data, the user's loading parameters, the ones to load with) when the modules change; None otherwise
    (also when the host will return its cached model). Raises the user error when a part is missing."""
    from modules import sd_models
    data = sd_models.model_data
    parameters = getattr(data, "forge_loading_parameters", None)
    if not isinstance(parameters, dict) or getattr(data, "forge_hash", None) == str(parameters):
        return None
    checkpoint = getattr(parameters.get("checkpoint_info"), "filename", None)
    if not isinstance(checkpoint, str):
        return None      # the host raises its own "no model" error
    selected = parameters.get("additional_modules")
    modules = plan_modules(checkpoint, selected)
    if modules is selected:
        return None
    return data, parameters, dict(parameters, additional_modules=modules)


def _after_load(result: Any, swap: Any) -> None:
    try:
        sd_model, just_reloaded = result
    except (TypeError, ValueError):
        return
    if not just_reloaded:
        return
    _loaded.clear()
    if swap is not None:
        _, user_parameters, planned = swap
        _loaded.append(_LoadedWith(weakref.ref(sd_model), list(user_parameters.get("additional_modules") or []),
                                   list(planned["additional_modules"])))
    try:
        if "gpu_weights" in _state.active and setting("fluxq_apply_gpu_weights") and is_flux_model(sd_model):
            apply_advised_gpu_weights(sd_model)
    except Exception as exc:
        _fallback("after-load step", exc)


def is_flux_model(sd_model: Any) -> bool:
    try:
        from backend.diffusion_engine.flux import Flux
    except Exception:
        return type(sd_model).__name__ == "Flux"
    return isinstance(sd_model, Flux)


def apply_advised_gpu_weights(sd_model: Any) -> None:
    """Set the host's GPU Weights to the advisor's value (only when lib_fluxq.advisor provides one)."""
    advisor = importlib.import_module("lib_fluxq.advisor")
    advise = getattr(advisor, "gpu_weights_mb_for_loaded_model", None)
    megabytes = advise(sd_model) if advise is not None else None
    if megabytes is None:
        log("GPU Weights setting is on, but the advisor has no value for this model or device; left unchanged")
        return
    log(f"GPU Weights set to {webui.set_gpu_weights(int(megabytes))} MB (advisor)")


def _check_gpu_weights(caps: Capabilities) -> str | None:
    return None if caps.gpu_weights else SKIP_REASONS["gpu_weights"]


# ---------------------------------------------------------------------------------------------------------------
# Choosing the modules: pick / drop by content before the host reads anything.


def module_folders() -> dict[str, str]:
    """The real 'VAE' and 'text_encoder' folders of this install (for the missing-files message)."""
    return webui.folders(("VAE", "text_encoder"))


def available_modules() -> list[str]:
    return webui.available_modules()


def free_ram_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def plan_modules(checkpoint: Any, selected: Any) -> Any:
    """The additional module list to hand the loader for ``checkpoint`` (a path); ``selected`` itself when nothing
    needs doing. Raises the user error (a MissingComponentsError) when a Flux part is missing, pairing is on, no
    file provides it and the check is on. With pairing off, a missing part is left to the host's own error."""
    last_plan.clear()
    pair, drop, check = (setting("fluxq_pair_components"), setting("fluxq_drop_mismatched"),
                         setting("fluxq_missing_check"))
    if not isinstance(checkpoint, str) or not (pair or drop):
        return selected
    selected_paths = list(selected) if isinstance(selected, (list, tuple)) else []
    contents = describe_file(checkpoint)
    if contents.family is None:
        return selected
    chosen = describe_files(selected_paths)
    unreadable = [p for p in selected_paths if p not in {c.path for c in chosen}]
    available = describe_files(available_modules()) if pair and contents.needs else []
    plan = choose_pairing(contents, chosen, available, free_ram_bytes(), pair=pair, drop=drop)
    plan.modules.extend(unreadable)  # .ckpt/.pt modules we cannot read cheaply: the host decides, as before
    last_plan.update(checkpoint=checkpoint, family=contents.family, added=dict(plan.added),
                     dropped=list(plan.dropped), missing=list(plan.missing), modules=list(plan.modules))
    if plan.missing and pair and check:
        error = user_errors.user_error_class()(checkpoint, plan.missing, module_folders(), family=contents.family)
        if not user_errors.ui_task_running():   # the UI path prints it once itself (user_errors)
            log(str(error))
        raise error
    name = os.path.basename(checkpoint)
    for part, path in plan.added.items():
        log(f"{name}: adding {part} from {os.path.basename(path)}")
    for path in plan.dropped:
        log(f"{name} is {contents.family}: leaving out {os.path.basename(path)} (does not fit this model)")
    if not plan.added and not plan.dropped:
        return selected
    return plan.modules


def loaded_modules_now() -> list[str] | None:
    """The modules the current model was really loaded with, when fluxq changed them and the user's selection is
    still the one it was loaded for; None otherwise."""
    if not _loaded:
        return None
    from modules import shared
    record = _loaded[0]
    current = getattr(shared, "sd_model", None)
    if current is None or record.model() is not current:
        return None
    if list(webui.option("forge_additional_modules", []) or []) != record.selected:
        return None
    return list(record.modules)


# ---------------------------------------------------------------------------------------------------------------
# Infotext: the image's parameters name the modules really loaded (Forge/Neo read the user's selection).


def _install_infotext(caps: Capabilities) -> str | None:
    if not caps.create_infotext:
        return SKIP_REASONS["infotext"]
    processing = importlib.import_module("modules.processing")
    wrap_binding(processing, "create_infotext", _wrap_create_infotext)
    return None


def _wrap_create_infotext(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_infotext(*args: Any, **kwargs: Any) -> Any:
        try:
            modules = loaded_modules_now()
        except Exception as exc:
            _fallback("infotext modules", exc)
            modules = None
        if modules is None:
            return original(*args, **kwargs)
        from modules import shared
        data = shared.opts.data
        users = data.get("forge_additional_modules")
        data["forge_additional_modules"] = modules   # only while the host writes "Module 1: ..." (no save, no event)
        try:
            return original(*args, **kwargs)
        finally:
            if data.get("forge_additional_modules") is modules:
                data["forge_additional_modules"] = users
    return create_infotext


# ---------------------------------------------------------------------------------------------------------------
# GGUF: memory-mapped tensors (hosts that copy), IQ4 types, LoRA re-quantization.


def _install_mmap(caps: Capabilities) -> str | None:
    if caps.gguf_layout is None:
        return "GGUF memory-mapping (unknown GGUF parameter layout)"
    if caps.gguf_shares_storage:
        return SKIP_REASONS["mmap"]
    if caps.gguf_layout != "reader-tensor" or "load_torch_file" not in caps.bindings:
        return "GGUF memory-mapping (this WebUI copies GGUF files in a way fluxq does not know)"
    import torch
    operations = importlib.import_module("backend.operations_gguf")
    parameter_cls = operations.ParameterGGUF
    original_new = parameter_cls.__dict__["__new__"]
    original_new_fn = original_new.__func__ if isinstance(original_new, staticmethod) else original_new

    def sharing_new(cls: type, tensor: Any = None, requires_grad: bool = False, no_init: bool = False) -> Any:
        # Forge's .to()/copy_with_data builds the result with torch.tensor(data), a full copy even when the data
        # already is where it should be; with memory-mapping on, share the storage instead.
        if no_init and isinstance(tensor, torch.Tensor) and setting("fluxq_gguf_mmap"):
            return torch.Tensor._make_subclass(cls, tensor.detach(), requires_grad)
        return original_new_fn(cls, tensor, requires_grad=requires_grad, no_init=no_init)

    sharing_new.__dict__[MARK] = original_new_fn
    patch_attr(parameter_cls, "__new__", staticmethod(sharing_new))
    for module_name in caps.bindings["load_torch_file"]:
        wrap_binding(importlib.import_module(module_name), "load_torch_file", _wrap_load_torch_file)
    return None


def _wrap_load_torch_file(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_torch_file(*args: Any, **kwargs: Any) -> Any:
        mapped = None
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            arguments = {}   # a call the host itself will refuse: its own error, untouched
        ckpt, device = next(iter(arguments.values()), None), arguments.get("device")
        on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
        if isinstance(ckpt, str) and ckpt.lower().endswith(".gguf") and on_cpu and setting("fluxq_gguf_mmap"):
            try:
                mapped = load_gguf_mapped(ckpt)
            except Exception as exc:
                _fallback(f"memory-mapping {os.path.basename(ckpt)}", exc)
        if mapped is None:
            return original(*args, **kwargs)
        return (mapped, None) if arguments.get("return_metadata") else mapped   # GGUF has no safetensors metadata
    return load_torch_file


def load_gguf_mapped(path: str) -> dict[str, Any]:
    """Like Forge's GGUF branch of load_torch_file, but each ParameterGGUF is a view of the file map (no copy).

    The map is private copy-on-write: Forge may write into a tensor (it does not today) without touching the file.
    """
    import numpy as np
    import torch
    operations = importlib.import_module("backend.operations_gguf")
    parameter_cls = operations.ParameterGGUF
    reader = operations.gguf.GGUFReader(path, "c")   # the host's own gguf copy (its enum keys the type table)
    state_dict = {}
    for tensor in reader.tensors:
        data = torch.from_numpy(np.asarray(tensor.data))
        parameter = torch.nn.Parameter.__new__(parameter_cls, data, requires_grad=False)
        parameter_cls.__init__(parameter, tensor)   # Forge's own bookkeeping: gguf_cls, real_shape, baked, dtype
        state_dict[str(tensor.name)] = parameter
    return state_dict


def gguf_mapping() -> dict[Any, Any]:
    caps = _state.caps or probe()
    operations = importlib.import_module("backend.operations_gguf")
    return getattr(operations, caps.gguf_mapping_name or "quants_mapping")


def _install_iq4(caps: Capabilities) -> str | None:
    if caps.gguf_mapping_name is None or caps.gguf_enum is None:
        return "IQ4 types (no GGUF type table found)"
    if not setting("fluxq_gguf_iq4"):
        return "IQ4 types (switched off in Settings -> fluxq)"
    from lib_fluxq.host import forge_gguf
    mapping = gguf_mapping()
    added = 0
    for qtype, quant_cls in forge_gguf.extra_quant_classes(caps.gguf_enum).items():
        if qtype not in mapping:
            patch_item(mapping, qtype, quant_cls)
            added += 1
    return None if added else "IQ4 types (this WebUI registers them itself)"


def _install_gguf_forward(caps: Capabilities) -> str | None:
    """Every GGUF type through fluxq's dequantizer (lib_fluxq/host/forge_gguf.py); the setting is read per bake."""
    if caps.gguf_mapping_name is None or caps.gguf_enum is None:
        return "fluxq's GGUF forward path (no GGUF type table found)"
    from lib_fluxq.host import forge_gguf
    operations = importlib.import_module("backend.operations_gguf")
    forge_gguf.install_forward_path(operations, gguf_mapping(), caps.gguf_enum, patch_attr, patch_item,
                                    add_missing=False)
    return None


def _install_lora_requant(caps: Capabilities) -> str | None:
    if caps.lora_on_gguf != "merge":
        return SKIP_REASONS["lora_requant"]
    from lib_fluxq.host import forge_gguf
    for quant_cls in forge_gguf.host_classes(gguf_mapping()):   # the host's classes, also behind ours
        replacement = forge_gguf.requantizing_method(quant_cls)
        if replacement is not None:
            patch_attr(quant_cls, "quantize_pytorch", replacement)
    forge_gguf.install_lora_report(importlib.import_module("backend.operations_gguf"), patch_attr)
    return None


def _install_lora_merge(caps: Capabilities) -> str | None:
    from lib_fluxq.host import lora_merge
    reason = lora_merge.available(caps)
    if reason is None:
        lora_merge.install(setting, log)
    return reason


def _lora_mode_changed() -> None:
    """onchange of the merge-once setting: the LoRA mode of the selected checkpoint follows at once."""
    from lib_fluxq.host import lora_merge
    try:
        from backend.args import dynamic_args
        from modules_forge import main_entry
        main_entry.refresh_model_loading_parameters()   # the host's own mode first (ours follows when on)
        if not setting(lora_merge.SETTING):
            log(f"LoRA mode back to the WebUI's own (on the fly: {bool(dynamic_args.online_lora)})")
    except Exception as exc:
        _fallback("switching the LoRA mode", exc)


# ---------------------------------------------------------------------------------------------------------------
# One-line user errors (lib_fluxq.host.user_errors)


def _install_quiet_errors(caps: Capabilities) -> str | None:
    if caps.error_style is None:
        return SKIP_REASONS["quiet_errors"]
    main_thread = importlib.import_module("modules_forge.main_thread")
    patch_attr(main_thread.Task, "work", user_errors.wrap_task_work(main_thread.Task.work))
    # Forge prints the message itself right after the traceback (print(e)); Neo prints only the traceback.
    proxy = user_errors.quiet_traceback_module(host_prints_message=caps.error_style == "exception", log=log)
    patch_attr(main_thread, "traceback", proxy)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Callbacks (registered by scripts/fluxq_hooks.py)


def visible_settings() -> tuple[Setting, ...]:
    """The settings whose behaviour is active on this host."""
    return tuple(s for s in SETTINGS if s.patch in _state.active or (s.patch == "iq4" and "iq4" in _state.skipped
                                                                       and "switched off" in _state.skipped["iq4"]))


def add_settings() -> None:
    """on_ui_settings: one checkbox per behaviour in Settings -> fluxq."""
    from modules import shared
    onchange = {"fluxq_lora_merge": _lora_mode_changed}
    for item in visible_settings():
        shared.opts.add_option(item.key, shared.OptionInfo(item.default, item.label, section=SECTION,
                                                           onchange=onchange.get(item.key)))


def on_model_loaded(sd_model: Any) -> None:
    """on_model_loaded: one line saying what fluxq changed in this load."""
    if last_plan.get("added") or last_plan.get("dropped"):
        added = ", ".join(f"{k}={os.path.basename(v)}" for k, v in last_plan["added"].items()) or "nothing"
        dropped = ", ".join(os.path.basename(p) for p in last_plan["dropped"]) or "nothing"
        log(f"loaded {type(sd_model).__name__}: added {added}; left out {dropped}")


def register_callbacks() -> bool:
    """Install the hook and its callbacks. False on a WebUI without Forge's loader (one console line says so)."""
    if not install():
        return False
    if _state.callbacks:
        return True   # a second import of the script (the WebUI reloads scripts) registers nothing twice
    _state.callbacks = True
    from modules import script_callbacks
    script_callbacks.on_ui_settings(add_settings, name="fluxq settings")
    script_callbacks.on_model_loaded(on_model_loaded, name="fluxq model loaded")
    return True


__all__ = ["MARK", "SETTINGS", "active_patches", "add_settings", "capabilities", "install", "is_forge",
           "load_gguf_mapped", "loaded_modules_now", "on_model_loaded", "plan_modules", "register_callbacks",
           "setting", "uninstall"]
