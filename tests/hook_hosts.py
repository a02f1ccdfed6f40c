"""One driver over the Forge and Neo stand-ins (tests/forge_standin.py mirrors Forge dfdcbab6, tests/neo_standin.py
mirrors Neo 2.26 @f95f632), so every hook test runs the same user steps against both: put model files into the
folders, pick a checkpoint and modules as the top bar does, generate through the UI path (the generation thread and
the page's error box), through the API path, or directly."""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from tests import fixtures
from tests import forge_standin as forge
from tests import neo_standin as neo
from tests import webui_standin as webui

T = gguf.GGMLQuantizationType
STANDINS: dict[str, types.ModuleType] = {"forge": forge, "neo": neo}
COMPONENT_FILES: dict[str, tuple[str, Callable[[], dict[str, torch.Tensor]]]] = {
    "clip_l": ("text_encoder/clip_l.safetensors", lambda: forge.clip_l_state_dict()),
    "t5xxl": ("text_encoder/t5xxl_fp8_e4m3fn.safetensors", lambda: forge.t5xxl_state_dict(torch.float8_e4m3fn)),
    "ae": ("VAE/ae.safetensors", lambda: forge.vae_state_dict(16)),
    "sd_vae": ("VAE/sdxl_vae.safetensors", lambda: forge.vae_state_dict(4)),
}


@dataclass
class Host:
    name: str
    standin: types.ModuleType
    m: dict[str, types.ModuleType]

    @property
    def models(self) -> Path:
        return Path(self.m["modules.paths"].models_path)

    def put(self, *names: str) -> dict[str, str]:
        """Write the named component files into the model folders (and refresh the host's lists)."""
        out = {n: forge.write(self.models / COMPONENT_FILES[n][0], COMPONENT_FILES[n][1]()) for n in names}
        self.m["modules_forge.main_entry"].refresh_models()
        return out

    def flux_gguf(self, qtype: T = T.Q4_0, name: str | None = None) -> str:
        path = self.models / "Stable-diffusion" / (name or f"flux-{qtype.name}.gguf")
        fixtures.write_gguf(path, fixtures.random_flux_state_dict(), fixtures.recipe_qtype(qtype))
        return str(path)

    def sdxl(self) -> str:
        return forge.write(self.models / "Stable-diffusion" / "sdxl.safetensors",
                           forge.sd_checkpoint_state_dict("sdxl"))

    def select(self, checkpoint: str | None, modules: list[str]) -> None:
        self.m["modules_forge.main_entry"].select(checkpoint, modules)

    def generate(self, checkpoint: str | None, modules: list[str]) -> Any:
        """Select, then one process_images (exceptions propagate)."""
        self.select(checkpoint, modules)
        return self.m["modules.processing"].process_images()

    def ui_run(self) -> str | None:
        """Generate in the page: the generation thread runs it; the error box text, or None."""
        main_thread, processing = self.m["modules_forge.main_thread"], self.m["modules.processing"]
        return webui.gradio_error_box(lambda: main_thread.run_and_wait_result(lambda: [processing.process_images()]))

    def ui_generate(self, checkpoint: str | None, modules: list[str]) -> str | None:
        self.select(checkpoint, modules)
        return self.ui_run()

    def api_run(self) -> tuple[int, dict[str, Any]]:
        return webui.api_request(self.m["modules.processing"].process_images)

    def split_log(self) -> list[list[str]]:
        return self.m["backend.loader"].split_log

    def loading_parameters(self) -> dict[str, Any]:
        return self.m["modules.sd_models"].model_data.forge_loading_parameters

    def paste(self, infotext: str) -> dict[str, Any]:
        return self.m["modules.infotext_utils"].parse_generation_parameters(infotext)

    def opts(self) -> Any:
        return self.m["modules.shared"].opts

    def gguf_mapping(self) -> dict[Any, Any]:
        operations = self.m["backend.operations_gguf"]
        return getattr(operations, "QUANTS_MAPPING", None) or operations.quants_mapping

    def host_enum(self) -> Any:
        return self.m["backend.operations_gguf"].gguf.GGMLQuantizationType


def install(name: str, models: Path) -> Host:
    standin = STANDINS[name]
    return Host(name, standin, standin.install(models))
