"""Where the tab runs: the standalone app or a WebUI — folders to scan and write, and "Use this".

One WebUI class for Forge, Forge Neo, reForge and A1111: what it can do comes from lib_fluxq.host (probe / webui),
which looks at the running host (``--vae-dir`` or ``--vae-dirs``; ``checkpoint_change`` with or without a UI
preset; GPU Weights in MB or as Neo's 0..1 fraction). Without Forge's model loader "Use this" only says so.
"""

from __future__ import annotations

import os

from lib_fluxq.catalog import FOLDERS

MODEL_SUBFOLDERS = (*FOLDERS.values(), "Lora")
MODULE_EXTENSIONS = (".safetensors", ".gguf")


class StandaloneHost:
    """``python -m lib_fluxq ui --models DIR``: DIR is a WebUI-style models folder (Stable-diffusion/, VAE/, ...)."""

    name = "standalone"
    can_apply = False
    advisor_host = "forge"   # the advisor's host profile; the standalone app plans for Forge, as `advise` does

    def __init__(self, models_dir: str) -> None:
        self.models_dir = os.path.abspath(models_dir)

    def folders(self) -> dict[str, str]:
        return {sub: os.path.join(self.models_dir, sub) for sub in MODEL_SUBFOLDERS}

    def scan_paths(self) -> list[str]:
        return [self.models_dir]

    def _module_folders(self) -> list[str]:
        return [self.folders()[kind] for kind in ("text_encoder", "VAE") if kind in self.folders()]

    def module_files(self) -> list[str]:
        """Text encoder / VAE files a checkpoint can be paired with."""
        found: set[str] = set()
        for folder in self._module_folders():
            if os.path.isdir(folder):
                for root, _, names in os.walk(folder):
                    found.update(os.path.join(root, n) for n in names if n.lower().endswith(MODULE_EXTENSIONS))
        return sorted(found)

    def applied_gpu_weights_mb(self, gpu_weights_mb: int | None) -> int | None:
        """The GPU Weights (MB) ``apply`` sets in the host's own setting; None where there is none."""
        return None

    def lora_on_gguf(self) -> str | None:
        """How LoRA reaches GGUF weights here (the tab's LoRA advice): "requant" (fluxq re-quantizes every type),
        "online" (the WebUI applies LoRA in fp16 at every step), "off" (the WebUI merges LoRAs and fluxq's
        re-quantization is off: only Q8_0 / Q5_0 / Q4_0 take one), "none" (no Flux loader); None: no WebUI."""
        return None

    def apply(self, checkpoint: str, modules: list[str], gpu_weights_mb: int | None) -> str:
        return ("Standalone app: nothing to switch here. In Forge's Flux Quant tab this button selects the checkpoint, "
                "the text encoders / VAE and GPU Weights for you, and sets the txt2img size.")


class WebUIHost(StandaloneHost):
    """The WebUI this process runs in. ``can_apply``: it has Forge's model loader and its model selection."""

    def __init__(self) -> None:
        from lib_fluxq.host import probe, webui
        self._webui = webui
        caps = probe.probe()
        self.can_apply = caps.forge_loader and webui.has_module("modules_forge.main_entry")
        self.name = "forge" if caps.forge_loader else "a1111"
        # Neo's traits (GPU Weights as a fraction, its own torch-tensor GGUF parameters) pick the advisor's Neo
        # figures: its RAM peaks and what it runs (Kontext, Klein, SVDQuant)
        self.advisor_host = "neo" if caps.gpu_weights == "fraction" or caps.gguf_layout == "torch-tensor" else "forge"
        super().__init__(webui.models_path())

    def folders(self) -> dict[str, str]:
        folders = super().folders()
        for kind in self._webui.FOLDER_OPTIONS:
            extra = self._webui.extra_folders(kind)
            if extra:
                folders[kind] = extra[0]   # where a download of this kind goes (the first folder the user gave)
        return folders

    def _all_folders(self) -> dict[str, list[str]]:
        kinds = dict.fromkeys(MODEL_SUBFOLDERS)
        return {kind: self._webui.all_folders(kind) if kind in self._webui.FOLDER_OPTIONS
                else [os.path.join(self.models_dir, kind)] for kind in kinds}

    def _module_folders(self) -> list[str]:
        every = self._all_folders()
        return every["text_encoder"] + every["VAE"]

    def scan_paths(self) -> list[str]:
        # the model folders themselves (some may live outside models/ through --ckpt-dir(s), --vae-dir(s), ...)
        return sorted({f for folders in self._all_folders().values() for f in folders})

    def applied_gpu_weights_mb(self, gpu_weights_mb: int | None) -> int | None:
        if gpu_weights_mb is None or not self.can_apply or self._webui.gpu_weights_style() is None:
            return None
        return self._webui.gpu_weights_for(gpu_weights_mb)[0]

    def lora_on_gguf(self) -> str | None:
        from lib_fluxq.host import forge, probe
        caps = forge.capabilities() or probe.probe()
        if not caps.forge_loader or caps.lora_on_gguf not in ("merge", "online"):
            return "none"
        if caps.lora_on_gguf == "online":
            return "online"
        active = "lora_requant" in forge.active_patches() and forge.setting("fluxq_lora_requant")
        return "requant" if active else "off"

    def apply(self, checkpoint: str, modules: list[str], gpu_weights_mb: int | None) -> str:
        if not self.can_apply:
            return ("This WebUI has no Forge model loader, so it cannot run Flux: use Forge or Forge Neo for Flux "
                    "(the advisor, inspector, converter and comparison work here).")
        from modules import sd_models, shared
        webui = self._webui
        webui.refresh_lists()   # files downloaded since start become selectable
        info = sd_models.get_closet_checkpoint_match(os.path.basename(checkpoint))
        if info is None:
            return (f"The WebUI does not list {os.path.basename(checkpoint)} as a checkpoint; press the refresh "
                    f"button next to Checkpoint, or move the file into {self.folders()['Stable-diffusion']}")
        # the value the host's own Checkpoint dropdown holds (sd_models.checkpoint_tiles): a title with " [hash]" is
        # not among its choices, and after a reload the dropdown would show nothing
        value = info.short_title if getattr(shared.opts, "sd_checkpoint_dropdown_use_short", False) else info.name
        names = [os.path.basename(m) for m in modules]
        webui.select(value, names)
        done = [f"checkpoint {value}", f"modules {', '.join(names) or 'none'}"]
        preset = webui.current_preset()
        if preset is not None and webui.select_takes_preset():
            done.append(f"remembered for the UI preset '{preset}'")
        reload_note = ("Checkpoint and VAE / Text Encoder at the top show it after a page reload")
        if gpu_weights_mb is not None and webui.gpu_weights_style() is not None:
            applied, fraction = webui.gpu_weights_for(gpu_weights_mb)
            webui.set_gpu_weights(gpu_weights_mb)
            if fraction is None:
                done.append(f"GPU Weights {applied} MB")
                reload_note += ("; GPU Weights is set in its slider now, but a page reload can put Forge's slider back "
                                "to the value the page was built with (check it, or press Use this again)")
            else:
                done.append(f"GPU Weights {fraction:.2f} ({applied} MB of {webui.total_vram_mb()} MB)")
                reload_note += "; GPU Weights (Settings) shows the new fraction after a page reload"
        return "Selected: " + "; ".join(done) + ". The model loads at the next Generate. " + reload_note + "."


def current_host(models_dir: str | None = None) -> StandaloneHost:
    """The host this process runs in: a WebUI (Forge, Neo, reForge, A1111) or standalone (with ``models_dir``)."""
    if models_dir is not None:
        return StandaloneHost(models_dir)
    from lib_fluxq.host import webui
    if webui.has_module("modules.paths"):
        return WebUIHost()
    return StandaloneHost(os.path.join(os.getcwd(), "models"))
