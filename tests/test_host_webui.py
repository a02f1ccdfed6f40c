"""The tab's side of the host layer on each WebUI shape: "Use this" on Forge (GPU Weights in MB) and Neo (a UI preset,
GPU Weights as a 0..1 fraction), model folders from --vae-dir (Forge) or --vae-dirs lists (Neo), and an A1111-like
host without Forge's loader (reForge main, A1111): the extension loads, says once what needs Forge's loader, and
the tab is built and works."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

from lib_fluxq.host import forge as hook
from lib_fluxq.host import patching
from lib_fluxq.ui.host import WebUIHost, current_host
from tests import hook_hosts
from tests import webui_standin as webui
from tests.hook_hosts import Host

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["forge", "neo"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Host]:
    installed = hook_hosts.install(request.param, tmp_path / "models")
    try:
        yield installed
    finally:
        hook.uninstall()
        installed.standin.remove()


def test_use_this_selects_checkpoint_modules_and_gpu_weights(host: Host) -> None:
    parts = host.put("clip_l", "t5xxl", "ae")
    checkpoint = host.flux_gguf()
    host.select(host.sdxl(), [])          # the user had SDXL selected
    hook.register_callbacks()
    opts = host.opts()
    opts.data["forge_preset"] = "flux"
    ui_host = current_host()
    assert isinstance(ui_host, WebUIHost) and ui_host.can_apply and ui_host.name == "forge"
    assert ui_host.advisor_host == host.name   # the tab plans with the advisor's figures for this host
    saved = opts.saved
    modules = [parts["clip_l"], parts["t5xxl"], parts["ae"]]
    message = ui_host.apply(checkpoint, modules, 6000)
    assert opts.sd_model_checkpoint == os.path.basename(checkpoint)
    assert sorted(opts.forge_additional_modules) == sorted(modules)
    assert opts.saved > saved
    params = host.loading_parameters()
    assert params["checkpoint_info"].filename == checkpoint and sorted(params["additional_modules"]) == sorted(modules)
    if host.name == "forge":
        assert ui_host.applied_gpu_weights_mb(6000) == 6000
        assert opts.forge_inference_memory == host.m["modules_forge.main_entry"].total_vram - 6000
        assert "GPU Weights 6000 MB" in message
    else:
        # Neo: remembered for the UI preset; GPU Weights is a fraction in 5 % steps, rounded down (6000/8192 = 0.73)
        assert opts.data["forge_checkpoint_flux"] == os.path.basename(checkpoint)
        assert sorted(opts.data["forge_additional_modules_flux"]) == sorted(modules)
        assert opts.setting_allocated_vram == 0.70
        memory = host.m["backend.memory_management"]
        assert abs(memory.SETTING_RESERVED_VRAM - 0.30 * memory.total_vram * 1024 * 1024) < 1
        assert ui_host.applied_gpu_weights_mb(6000) == int(0.70 * 8192)
        assert "GPU Weights 0.70 (5734 MB of 8192 MB)" in message and "UI preset 'flux'" in message
    assert message.startswith("Selected: checkpoint flux-Q4_0.gguf; modules ")
    processed = host.m["modules.processing"].process_images()
    assert type(processed.sd_model).__name__ == "Flux"
    assert sorted(host.split_log()[-1]) == sorted(modules)


def test_use_this_names_a_checkpoint_the_host_does_not_list(host: Host, tmp_path: Path) -> None:
    hook.register_callbacks()
    outside = tmp_path / "elsewhere" / "flux.gguf"
    outside.parent.mkdir()
    outside.write_bytes(b"GGUF")
    message = current_host().apply(str(outside), [], None)
    assert message.startswith("The WebUI does not list flux.gguf as a checkpoint")
    assert os.path.join(str(host.models), "Stable-diffusion") in message


def test_folders_from_the_hosts_own_options(host: Host, tmp_path: Path) -> None:
    extra_vae, extra_te = tmp_path / "more_vae", tmp_path / "more_te"
    for folder in (extra_vae, extra_te):
        folder.mkdir()
    (extra_vae / "ae.safetensors").write_bytes(b"x")
    (extra_te / "t5.gguf").write_bytes(b"x")
    cmd_opts = host.m["modules.shared"].cmd_opts
    if host.name == "forge":
        cmd_opts.vae_dir, cmd_opts.text_encoder_dir = str(extra_vae), str(extra_te)
    else:
        cmd_opts.vae_dirs, cmd_opts.text_encoder_dirs = [str(tmp_path / "none"), str(extra_vae)], [str(extra_te)]
    ui_host = current_host()
    files = ui_host.module_files()
    assert str(extra_vae / "ae.safetensors") in files and str(extra_te / "t5.gguf") in files
    assert {str(extra_vae), str(extra_te), str(host.models / "VAE")} <= set(ui_host.scan_paths())
    folders = ui_host.folders()
    assert folders["text_encoder"] == str(extra_te)
    assert folders["VAE"] == (str(extra_vae) if host.name == "forge" else str(tmp_path / "none"))
    assert hook.module_folders()["text_encoder"] == str(extra_te)


# ---------------------------------------------------------------------------------------------------------------
# No Forge loader: A1111, reForge main


@pytest.fixture(params=["a1111", "reforge"])
def bare(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, types.ModuleType]]:
    m = webui.install_a1111(tmp_path / "models")
    if request.param == "reforge":   # reForge main: a modules_forge package, but ldm_patched instead of backend/
        sys.modules["modules_forge"] = types.ModuleType("modules_forge")
        sys.modules["modules_forge"].__path__ = []
    try:
        yield m
    finally:
        hook.uninstall()
        webui.remove((*webui.A1111_MODULES, "modules_forge"))


def _run_script(name: str) -> types.ModuleType:
    """Load one of scripts/*.py by path, as the WebUI does."""
    spec = importlib.util.spec_from_file_location(f"fluxq_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_forge_loader_the_extension_loads_and_says_so_once(bare: dict[str, types.ModuleType],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _run_script("fluxq_hooks")
    _run_script("fluxq_hooks")     # the WebUI may load scripts twice (reload)
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert lines == [f"[fluxq] {hook.NEEDS_LOADER}"]
    assert patching.installed() == {}
    assert bare["modules.script_callbacks"].callbacks.ui_settings == []


def test_without_forge_loader_the_tab_works(bare: dict[str, types.ModuleType], tmp_path: Path) -> None:
    """The tab's machine / advisor / inspect parts on an A1111-like host: built from the WebUI's own script entry."""
    from tests import fixtures
    models = Path(bare["modules.paths"].models_path)
    flux = models / "Stable-diffusion" / "flux-Q4_0.gguf"
    fixtures.write_gguf(flux, fixtures.random_flux_state_dict(), fixtures.recipe_qtype(gguf.GGMLQuantizationType.Q4_0))
    _run_script("fluxq_tab")
    (on_ui_tabs,) = bare["modules.script_callbacks"].callbacks.ui_tabs
    (blocks, title, elem_id), = on_ui_tabs()
    assert title == "Flux Quant" and elem_id == "fluxq_tab" and blocks is not None
    ui_host = current_host()
    assert isinstance(ui_host, WebUIHost) and not ui_host.can_apply and ui_host.name == "a1111"
    assert str(models / "Stable-diffusion") in ui_host.scan_paths()
    assert ui_host.applied_gpu_weights_mb(6000) is None
    message = ui_host.apply(str(flux), [], 6000)
    assert "no Forge model loader" in message and "\n" not in message
    from lib_fluxq.ui import handlers
    reports = handlers.scan_models(ui_host.scan_paths())
    (report,) = [r for r in reports if os.path.basename(r.path) == flux.name]
    assert report.status == "ok" and report.level == "Q4_0"
