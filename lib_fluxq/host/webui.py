"""The WebUI facts and actions the rest of fluxq needs, the same on every host: options, model folders, the files
under "VAE / Text Encoder", selecting a checkpoint with its modules, GPU Weights in MB.

Each function looks at what the running host has (Forge dfdcbab6 or Neo, see lib_fluxq.host.probe) and adapts:
``--vae-dir`` (a string, Forge) or ``--vae-dirs`` (a list, Neo); ``checkpoint_change(name, save, refresh)`` or
``checkpoint_change(name, preset, save, refresh)``; GPU Weights as MB through ``main_entry`` or as Neo's 0..1 option
``setting_allocated_vram``. WebUI packages are imported lazily, inside the functions.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Any

# folder kind -> (cmd_opts attribute holding one folder, attribute holding a list of folders)
FOLDER_OPTIONS: dict[str, tuple[str, str]] = {
    "Stable-diffusion": ("ckpt_dir", "ckpt_dirs"),
    "VAE": ("vae_dir", "vae_dirs"),
    "text_encoder": ("text_encoder_dir", "text_encoder_dirs"),
    "Lora": ("lora_dir", "lora_dirs"),
}
MODULE_EXTENSIONS = (".safetensors", ".gguf")   # the ones whose headers can be read cheaply
GPU_WEIGHTS_STEP = 0.05   # Neo's GPU Weights slider step (modules/shared_options.py)


def option(key: str, default: Any = None) -> Any:
    """An option's current value (``default`` until the WebUI's options know it)."""
    try:
        from modules import shared
        return shared.opts.data.get(key, default)
    except Exception:   # options not ready (early import, tests without a host)
        return default


def models_path() -> str:
    from modules import paths
    return paths.models_path


def extra_folders(kind: str) -> list[str]:
    """Folders given on the command line for ``kind`` (both the Forge and the Neo spelling)."""
    from modules import shared
    single, many = FOLDER_OPTIONS[kind]
    found: list[str] = []
    for value in (getattr(shared.cmd_opts, single, None), getattr(shared.cmd_opts, many, None)):
        values = value if isinstance(value, (list, tuple)) else [value]
        found += [os.fspath(v) for v in values if isinstance(v, (str, os.PathLike)) and os.fspath(v)]
    return found


def folder(kind: str) -> str:
    """Where a file of ``kind`` goes in this install: the first command-line folder, else models/<kind>."""
    extra = extra_folders(kind)
    return extra[0] if extra else os.path.join(models_path(), kind)


def folders(kinds: tuple[str, ...] = tuple(FOLDER_OPTIONS)) -> dict[str, str]:
    return {kind: folder(kind) for kind in kinds}


def all_folders(kind: str) -> list[str]:
    """Every folder the host scans for ``kind`` (models/<kind> and the command-line ones)."""
    return list(dict.fromkeys([os.path.join(models_path(), kind), *extra_folders(kind)]))


def available_modules() -> list[str]:
    """Files the host lists under "VAE / Text Encoder" (main_entry.module_list), plus files put into those folders
    since it last refreshed the list (so "download, then Generate again" works without a restart)."""
    found: set[str] = set()
    try:
        from modules_forge import main_entry
        found.update(str(p) for p in main_entry.module_list.values())
    except Exception:
        pass
    for kind in ("VAE", "text_encoder"):
        for top in all_folders(kind):
            for root, _, names in os.walk(top):
                found.update(os.path.join(root, n) for n in names if n.lower().endswith(MODULE_EXTENSIONS))
    return sorted(found)


def current_preset() -> str | None:
    """The WebUI's "UI Preset" (Forge: sd / xl / flux / all; Neo: sd / xl / flux / klein / ...)."""
    value = option("forge_preset")
    return value if isinstance(value, str) and value else None


def select_takes_preset() -> bool:
    """Neo's checkpoint_change / modules_change take the UI preset (and remember the choice for it)."""
    from modules_forge import main_entry
    return "preset" in inspect.signature(main_entry.checkpoint_change).parameters


def _call_with_preset(fn: Any, first: Any, **kwargs: Any) -> Any:
    """``fn(first, save=..., refresh=...)``, adding the current UI preset where the host's signature has one (Neo
    remembers the choice per preset; without it a page reload shows the preset's older choice)."""
    if "preset" in inspect.signature(fn).parameters:
        kwargs["preset"] = current_preset()
    return fn(first, **kwargs)


def select(checkpoint: str, module_names: list[str]) -> None:
    """Make ``checkpoint`` (a value of the host's Checkpoint dropdown) and exactly ``module_names`` (basenames) the
    selection, saved to the config; the model loads at the next generation, as when the user picks them."""
    from modules_forge import main_entry
    _call_with_preset(main_entry.checkpoint_change, checkpoint, save=True, refresh=False)
    _call_with_preset(main_entry.modules_change, list(module_names), save=True, refresh=False)
    main_entry.refresh_model_loading_parameters()


def refresh_lists() -> None:
    """Re-scan checkpoints and modules (files downloaded since start become selectable)."""
    from modules_forge import main_entry
    main_entry.refresh_models()


# ---------------------------------------------------------------------------------------------------------------
# GPU Weights: MB on Forge (main_entry.total_vram - forge_inference_memory), a 0..1 fraction of total VRAM on Neo.


def gpu_weights_style() -> str | None:
    from lib_fluxq.host.probe import gpu_weights_style as style
    try:
        from modules_forge import main_entry
    except Exception:
        return None
    return style(main_entry)


def total_vram_mb() -> int | None:
    style = gpu_weights_style()
    if style == "mb":
        from modules_forge import main_entry
        return int(main_entry.total_vram)
    if style == "fraction":
        from backend import memory_management
        return int(memory_management.total_vram)
    return None


def gpu_weights_for(megabytes: int) -> tuple[int, float | None]:
    """What setting GPU Weights to ``megabytes`` really sets here: (MB, Neo's fraction or None). Neo's slider moves
    in 5 % steps, so the fraction is rounded DOWN to one (never more weights on the GPU than advised)."""
    total = total_vram_mb()
    if total is None or total <= 0:
        raise RuntimeError("this WebUI has no GPU Weights setting fluxq knows")
    megabytes = max(0, min(int(megabytes), total))
    if gpu_weights_style() == "mb":
        return megabytes, None
    steps = int(megabytes / total / GPU_WEIGHTS_STEP + 1e-9)
    fraction = round(steps * GPU_WEIGHTS_STEP, 2)
    return int(fraction * total), fraction


def set_gpu_weights(megabytes: int) -> int:
    """Set the host's GPU Weights; returns the MB really set."""
    applied, fraction = gpu_weights_for(megabytes)
    if fraction is None:
        from modules_forge import main_entry
        main_entry.refresh_memory_management_settings(model_memory=applied)   # sets forge_inference_memory too
    else:
        from modules import shared
        shared.opts.set("setting_allocated_vram", fraction)   # its onchange re-reserves VRAM (initialize_util)
        shared.opts.save(shared.config_filename)              # as the Settings page's Apply does
    return applied


def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
