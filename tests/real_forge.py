"""Shared helpers of the opt-in real-Forge tests (FORGE_DIR set; see FORGE_NOTES §9): start Forge CPU-only with the
API on 127.0.0.1 and a private --data-dir whose extensions/fluxq links to this repository, and build the random-weight
model files the tests load (a full-shape FLUX.1-dev Q2_K GGUF with T5-XXL / CLIP-L / ae, and an SD1.5 single-file
checkpoint). What is not Forge-specific lives in tests/real_webui.py (shared with the real-Neo tests)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import real_webui
from tests.real_webui import (  # noqa: F401  (re-exported for the real-Forge test files)
    GB,
    REPO,
    T,
    assert_clean_startup,
    model_data_dir,
    model_loads,
    our_tracebacks,
    peak_rss,
)

FORGE_DIR = os.environ.get("FORGE_DIR")
requires_forge = pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR to a prepared Forge checkout to run")
URL = "http://127.0.0.1:7860"  # no --port: an upstream bug breaks /sdapi/v1/cmd-flags with it (FORGE_NOTES §9)
FLUX_QTYPE = T.Q2_K       # no bake_inner in Forge: bytes stay in the file map through sampling too


def forge_python() -> str:
    return str(Path(FORGE_DIR or ".") / "venv" / "bin" / "python")


def api(path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    return real_webui.api(URL, path, payload, timeout)


def api_status(path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    return real_webui.api_status(URL, path, payload, timeout)


def forge_args(data_dir: Path) -> list[str]:
    return [forge_python(), "launch.py", "--always-cpu", "--api", "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check", "--do-not-download-clip",
            "--data-dir", str(data_dir),
            # gradio serves files only from allowed paths, which default to the data dir alone: without this, the
            # page's own script.js / javascript/*.js (Forge's checkout) answer 403 and Generate does nothing
            "--gradio-allowed-path", str(FORGE_DIR)]


@contextmanager
def running_forge(data_dir: Path, start_timeout: int = 240,
                  with_fluxq: bool = True) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Forge started on ``data_dir`` (extensions/fluxq → this repository; without it for ``with_fluxq=False``,
    "Forge alone"); yields (process, console log path)."""
    with real_webui.running_webui(forge_args(data_dir), str(FORGE_DIR), data_dir, URL, "forge",
                                  start_timeout, extension=with_fluxq) as running:
        yield running


def build_flux_models(data_dir: Path, qtype: T = FLUX_QTYPE) -> dict[str, Path]:
    """Full-shape random FLUX.1-dev GGUF ("flux") and T5-XXL GGUF ("t5") of ``qtype`` (Q2_K unless told), CLIP-L
    ("clip") and ae ("ae")."""
    models = data_dir / "models"
    files = {"flux": models / "Stable-diffusion" / f"flux1-dev-{qtype.name}.gguf",
             "t5": models / "text_encoder" / f"t5-v1_1-xxl-encoder-{qtype.name}.gguf",
             "clip": models / "text_encoder" / "clip_l.safetensors",
             "ae": models / "VAE" / "ae.safetensors"}
    real_webui.write_flux_gguf(files["flux"], qtype)
    real_webui.write_t5_gguf(files["t5"], qtype)
    real_webui.write_clip_and_ae(files["clip"], files["ae"], forge_python(),
                                 Path(FORGE_DIR) / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev")
    return files


SD15_FIRST, SD15_REFINE = "fluxq_first_sd15.safetensors", "fluxq_refine_sd15.safetensors"


def build_sd15_models(data_dir: Path) -> dict[str, Path]:
    """One random SD1.5 single-file checkpoint under two names ("first": SD15_FIRST, "refine": SD15_REFINE, a hard
    link) and a standalone random SD VAE ("vae"), built by Forge's own classes from its bundled runwayml configs."""
    checkpoints, vae_dir = data_dir / "models" / "Stable-diffusion", data_dir / "models" / "VAE"
    checkpoints.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    files = {"first": checkpoints / SD15_FIRST, "refine": checkpoints / SD15_REFINE,
             "vae": vae_dir / "fluxq_user_vae.safetensors"}
    real_webui.write_sd15(files["first"], files["vae"], forge_python(), Path(FORGE_DIR), "--always-cpu",
                          "packages_3rdparty")
    if not files["refine"].exists():
        os.link(files["first"], files["refine"])  # a second name without a second 2 GB
    return files
