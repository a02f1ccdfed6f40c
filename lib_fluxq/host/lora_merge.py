"""Merge-once LoRA for GGUF checkpoints on hosts that can only apply LoRA to GGUF weights on the fly (Forge Neo).

Neo forces "on-the-fly fp16 LoRA" for every GGUF checkpoint (main_entry.refresh_model_loading_parameters: "GGUF
requires fp16 LoRA ; overriding option"): each sampling step dequantizes each patched layer and adds the LoRA again.
Its patch mode cannot merge into GGUF weights: ``ModelPatcher.patch_weight_to_device`` casts the packed bytes to float
and ``utils.set_attr`` wraps the result in a plain Parameter (the GGUF class and its type are lost).

With the setting on, fluxq lets patch mode run for GGUF checkpoints and does the GGUF part itself, once per LoRA
change: bake → dequantize with the host's own class in float32 → the host's own ``merge_lora_to_weight`` (every
LoRA kind it knows) → re-quantize to the same GGML type with lib_fluxq → the host's ``bake_inner`` layout; the
original parameter is kept as the host's backup and put back (as the same object) when the LoRA is removed. Layers
the host offloads (partial loading) keep its per-step patches. Everything else goes to the host unchanged.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import torch

SETTING = "fluxq_lora_merge"
Backup = collections.namedtuple("Backup", ["weight", "inplace_update"])   # the fields the host's backups have
_stats = {"layers": 0, "seconds": 0.0}
_announced: dict[str, str] = {}


def available(caps: Any) -> str | None:
    """None when this host can take the patch (and needs it); else why not."""
    from lib_fluxq.host.probe import _module
    if caps.lora_on_gguf != "online":
        return "merge-once LoRA (this WebUI merges LoRAs into GGUF weights itself)"
    base, lora = _module("backend.patcher.base"), _module("backend.patcher.lora")
    patcher = getattr(base, "ModelPatcher", None)
    main_entry = _module("modules_forge.main_entry")
    needed = {"ModelPatcher.patch_weight_to_device": getattr(patcher, "patch_weight_to_device", None),
              "ModelPatcher.unpatch_model": getattr(patcher, "unpatch_model", None),
              "ModelPatcher.load": getattr(patcher, "load", None),
              "LowVramPatch": getattr(base, "LowVramPatch", None),
              "get_key_weight": getattr(base, "get_key_weight", None),
              "merge_lora_to_weight": getattr(lora, "merge_lora_to_weight", None),
              "refresh_model_loading_parameters": getattr(main_entry, "refresh_model_loading_parameters", None)}
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        return f"merge-once LoRA (this WebUI has no {', '.join(missing)})"
    return None


def install(setting: Callable[[str], bool], log: Callable[[str], None]) -> None:
    import importlib

    from lib_fluxq.host.patching import patch_attr, wrap_binding
    patcher = importlib.import_module("backend.patcher.base").ModelPatcher
    patch_attr(patcher, "patch_weight_to_device", _wrap_patch(patcher.patch_weight_to_device, setting, log))
    patch_attr(patcher, "unpatch_model", _wrap_unpatch(patcher.unpatch_model))
    patch_attr(patcher, "load", _wrap_load(patcher.load, log))
    main_entry = importlib.import_module("modules_forge.main_entry")
    wrap_binding(main_entry, "refresh_model_loading_parameters", lambda original: _wrap_refresh(original, setting, log))


def apply_mode(setting: Callable[[str], bool], log: Callable[[str], None] | None = None) -> None:
    """Neo's LoRA mode for the selected checkpoint, as its own refresh decided it, except that a GGUF checkpoint
    gets patch mode (merge once) when the setting is on and the user did not pick an "(fp16 LoRA)" option."""
    from backend.args import dynamic_args
    from modules import shared
    from modules.sd_models import model_data
    info = (getattr(model_data, "forge_loading_parameters", None) or {}).get("checkpoint_info")
    checkpoint = str(getattr(info, "filename", "") or "")
    if not checkpoint.lower().endswith(".gguf") or not setting(SETTING):
        return
    if str(shared.opts.data.get("forge_unet_storage_dtype", "")).endswith("(fp16 LoRA)"):
        return   # the user asked for on-the-fly LoRA themselves
    dynamic_args.online_lora = False
    if log is not None and _announced.get("checkpoint") != checkpoint:   # the host refreshes on every option change
        _announced["checkpoint"] = checkpoint
        log(f"{os.path.basename(checkpoint)}: LoRAs are merged once and re-quantized (Settings -> fluxq), not "
            "applied in fp16 at every step")


def _wrap_refresh(original: Callable[..., Any], setting: Callable[[str], bool],
                  log: Callable[[str], None]) -> Callable[..., Any]:
    @functools.wraps(original)
    def refresh_model_loading_parameters(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        try:
            apply_mode(setting, log)
        except Exception as exc:
            log(f"merge-once LoRA failed ({type(exc).__name__}: {exc}); the WebUI's own LoRA mode stays")
        return result
    return refresh_model_loading_parameters


def _quantized(weight: Any) -> bool:
    return getattr(weight, "gguf_cls", None) is not None and hasattr(weight, "copy_with_data")


def _wrap_patch(original: Callable[..., Any], setting: Callable[[str], bool],
                log: Callable[[str], None]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def patch_weight_to_device(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            arguments = signature.bind(self, *args, **kwargs).arguments
            key = arguments.get("key")
            from backend import utils
            weight = utils.get_attr(self.model, key)
        except Exception:
            return original(self, *args, **kwargs)
        if (arguments.get("return_weight") or key not in self.patches or not _quantized(weight)
                or self.use_online_lora(key) or not setting(SETTING)):
            return original(self, *args, **kwargs)
        try:
            merged = _merge_requantize(self, key, weight, arguments.get("device_to"))
        except Exception as exc:
            log(f"merging a LoRA into {key} failed ({type(exc).__name__}: {exc}); that layer gets it on the fly")
            _on_the_fly(self, key)
            return None
        if key not in self.backup:
            self.backup[key] = Backup(weight, False)   # the original object itself, put back by unpatch_model
        utils.set_attr_raw(self.model, key, merged)
        return None
    return patch_weight_to_device


def _on_the_fly(patcher: Any, key: str) -> None:
    """What the host's ModelPatcher.load does for an on-the-fly key: the layer merges the LoRA at each forward."""
    from backend import utils
    from backend.patcher import base
    module_name, _, param = key.rpartition(".")
    module = utils.get_attr(patcher.model, module_name)
    _, set_func, convert_func = base.get_key_weight(patcher.model, key)
    setattr(module, f"{param}_function", [base.LowVramPatch(key, patcher.patches, convert_func, set_func)])
    if hasattr(module, "parameters_manual_cast"):
        module.prev_parameters_manual_cast = module.parameters_manual_cast
        module.parameters_manual_cast = True


def _wrap_load(original: Callable[..., Any], log: Callable[[str], None]) -> Callable[..., Any]:
    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        before = dict(_stats)
        result = original(*args, **kwargs)
        layers = _stats["layers"] - before["layers"]
        if layers:
            seconds = _stats["seconds"] - before["seconds"]
            log(f"LoRA merged into {layers} GGUF layers and re-quantized in {seconds:.1f} s (once, until the LoRAs "
                "change)")
        return result
    return load


def _reads_ggml_layout(gguf_cls: type) -> bool:
    from lib_fluxq.host.forge_gguf import FluxqQuant
    return issubclass(gguf_cls, FluxqQuant)


def _merge_requantize(patcher: Any, key: str, weight: Any, device_to: Any) -> Any:
    from backend.patcher import lora

    from lib_fluxq.lora import requantize
    from lib_fluxq.quant import FORMATS
    started = time.perf_counter()
    weight.gguf_cls.bake(weight)              # what the host does before the first forward anyway
    gguf_cls = weight.gguf_cls                # after the bake: a bake may hand the parameter to another class
    qtype = next(q for q in FORMATS if q.name == gguf_cls.qtype.name)
    device = device_to if device_to is not None else weight.device
    reader = weight.copy_with_data(weight.data.to(device))
    if _reads_ggml_layout(gguf_cls):
        reader.computation_dtype = torch.float32   # exact values from GGML bytes at any output dtype
    # else: a host class whose bake wrote its computation dtype into the bytes (Q4_0 scales, ...) reads them back
    # only in that dtype: the LoRA then lands on the weight as the host itself computes with it
    # an own float32 copy: the host's merge adds in place, and a dequantizer may hand out a reused buffer
    values = gguf_cls.dequantize_pytorch(reader).to(torch.float32, copy=True).reshape(tuple(weight.shape))
    values = lora.merge_lora_to_weight(patcher.patches[key], values, key, computation_dtype=torch.float32)
    packed = requantize(values, qtype)
    merged = weight.copy_with_data(packed.reshape(-1, gguf_cls.type_size).to(device))
    gguf_cls.bake_inner(merged)               # the host's layout for its dequantizer (scales, nibble order)
    merged.baked = True
    _stats["layers"] += 1
    _stats["seconds"] += time.perf_counter() - started
    return merged


def _wrap_unpatch(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def unpatch_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            unpatch = signature.bind(self, *args, **kwargs).arguments.get("unpatch_weights", True)
        except TypeError:
            unpatch = False
        if unpatch:
            from backend import utils
            # our backups are GGUF parameters: the host's restore would wrap them in a plain Parameter
            for key in [k for k, b in self.backup.items() if _quantized(b.weight) and not b.inplace_update]:
                utils.set_attr_raw(self.model, key, self.backup.pop(key).weight)
        return original(self, *args, **kwargs)
    return unpatch_model


def merged_so_far() -> dict[str, float]:
    """Layers merged and the seconds it took (for the console line)."""
    return dict(_stats)
