"""Where the tab runs: the standalone app, Forge, or A1111 — folders to scan and write, and "Use this".

Only this module (besides lib_fluxq/host/) touches the WebUI's ``modules`` / ``modules_forge`` packages, lazily.
Forge functions used (FORGE_NOTES §3, §5): ``main_entry.refresh_models``, ``checkpoint_change``, ``modules_change``,
``refresh_model_loading_parameters``, ``refresh_memory_management_settings``.
"""

from __future__ import annotations

import importlib
import os

from lib_fluxq.catalog import FOLDERS

MODEL_SUBFOLDERS = (*FOLDERS.values(), "Lora")
MODULE_EXTENSIONS = (".safetensors", ".gguf")


class StandaloneHost:
    """``python -m lib_fluxq ui --models DIR``: DIR is a WebUI-style models folder (Stable-diffusion/, VAE/, ...)."""

    name = "standalone"
    can_apply = False

    def __init__(self, models_dir: str) -> None:
        self.models_dir = os.path.abspath(models_dir)

    def folders(self) -> dict[str, str]:
        return {sub: os.path.join(self.models_dir, sub) for sub in MODEL_SUBFOLDERS}

    def scan_paths(self) -> list[str]:
        return [self.models_dir]

    def module_files(self) -> list[str]:
        """Text encoder / VAE files a checkpoint can be paired with."""
        found = []
        for kind in ("text_encoder", "VAE"):
            folder = self.folders().get(kind)
            if folder and os.path.isdir(folder):
                for root, _, names in os.walk(folder):
                    found += [os.path.join(root, n) for n in names if n.lower().endswith(MODULE_EXTENSIONS)]
        return sorted(found)

    def applied_gpu_weights_mb(self, gpu_weights_mb: int | None) -> int | None:
        """The GPU Weights (MB) ``apply`` sets in the host's own slider; None where there is none."""
        return None

    def apply(self, checkpoint: str, modules: list[str], gpu_weights_mb: int | None) -> str:
        return ("Standalone app: nothing to switch here. In Forge's Flux Quant tab this button selects the checkpoint, "
                "the text encoders / VAE and GPU Weights for you, and sets the txt2img size.")


class ForgeHost(StandaloneHost):
    name = "forge"
    can_apply = True

    def __init__(self) -> None:
        from modules import paths
        super().__init__(paths.models_path)

    def folders(self) -> dict[str, str]:
        from modules import shared
        folders = super().folders()
        for kind, option in (("Stable-diffusion", "ckpt_dir"), ("VAE", "vae_dir"),
                             ("text_encoder", "text_encoder_dir"), ("Lora", "lora_dir")):
            value = getattr(shared.cmd_opts, option, None)
            if isinstance(value, str) and value:
                folders[kind] = value
        return folders

    def scan_paths(self) -> list[str]:
        # the model folders themselves (some may live outside models/ through --ckpt-dir, --vae-dir, ...)
        return sorted(set(self.folders().values()))

    def applied_gpu_weights_mb(self, gpu_weights_mb: int | None) -> int | None:
        if gpu_weights_mb is None:
            return None
        from modules_forge import main_entry
        return max(0, min(int(gpu_weights_mb), int(main_entry.total_vram)))

    def apply(self, checkpoint: str, modules: list[str], gpu_weights_mb: int | None) -> str:
        from modules import sd_models, shared
        from modules_forge import main_entry
        main_entry.refresh_models()   # files downloaded since start become selectable
        info = sd_models.get_closet_checkpoint_match(os.path.basename(checkpoint))
        if info is None:
            return f"Forge does not list {os.path.basename(checkpoint)} as a checkpoint; press the refresh button " \
                   f"next to Checkpoint, or move the file into {self.folders()['Stable-diffusion']}"
        # the value Forge's own Checkpoint dropdown holds (sd_models.checkpoint_tiles): a title with " [hash]" is
        # not among its choices, and after a reload the dropdown would show nothing
        value = info.short_title if shared.opts.sd_checkpoint_dropdown_use_short else info.name
        main_entry.checkpoint_change(value, save=True, refresh=False)
        main_entry.modules_change([os.path.basename(m) for m in modules], save=True, refresh=False)
        main_entry.refresh_model_loading_parameters()
        done = [f"checkpoint {value}", f"modules {', '.join(os.path.basename(m) for m in modules) or 'none'}"]
        megabytes = self.applied_gpu_weights_mb(gpu_weights_mb)
        if megabytes is not None:
            main_entry.refresh_memory_management_settings(model_memory=megabytes)
            done.append(f"GPU Weights {megabytes} MB")
        return ("Selected in Forge: " + "; ".join(done) + ". The model loads at the next Generate. Checkpoint and "
                "VAE / Text Encoder at the top show it after a page reload; GPU Weights is set in its slider now, "
                "but a page reload can put Forge's slider back to the value the page was built with (check it, or "
                "press Use this again).")


class A1111Host(ForgeHost):
    name = "a1111"
    can_apply = False

    def applied_gpu_weights_mb(self, gpu_weights_mb: int | None) -> int | None:
        return None

    def apply(self, checkpoint: str, modules: list[str], gpu_weights_mb: int | None) -> str:
        return "AUTOMATIC1111 cannot run Flux; use Forge for Flux (the advisor, inspector and converter work here)."


def current_host(models_dir: str | None = None) -> StandaloneHost:
    """The host this process runs in: Forge, A1111, or standalone (with ``models_dir``)."""
    if models_dir is not None:
        return StandaloneHost(models_dir)
    for module, host in (("modules_forge", ForgeHost), ("modules.paths", A1111Host)):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return host()
    return StandaloneHost(os.path.join(os.getcwd(), "models"))
