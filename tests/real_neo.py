"""Shared helpers of the opt-in real-Neo tests (NEO_DIR set to a Forge Neo checkout with its venv in venv/, prepared
as NEO_NOTES §4 says): start Neo CPU-only with the API on 127.0.0.1:7861 (7860 is left to a real Forge) and a
private --data-dir whose extensions/fluxq links to this repository — or without fluxq ("Neo alone":
``--disable-extra-extensions`` loads only Neo's built-in extensions from the same data dir) — and build the
random-weight model files: full-shape FLUX.1-dev GGUFs (Q4_0, IQ4_XS, Q5_1), a city96-style T5-XXL Q4_0 GGUF,
CLIP-L and ae (Neo's own transformers / diffusers from its bundled configs), an SD1.5 single-file checkpoint (Neo's
own UNet / VAE classes) and a kohya-style FLUX.1 LoRA. What is not Neo-specific lives in tests/real_webui.py."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import real_webui
from tests.real_webui import T

NEO_DIR = os.environ.get("NEO_DIR")
requires_neo = pytest.mark.skipif(not NEO_DIR, reason="set NEO_DIR to a prepared Forge Neo checkout to run")
PORT = 7861
URL = f"http://127.0.0.1:{PORT}"
LORA_NAME = "fluxq_test_lora"


def neo_python() -> str:
    return str(Path(NEO_DIR or ".") / "venv" / "bin" / "python")


def neo_commit() -> str:
    """What NEO_DIR is: its git HEAD when it is a checkout, else its version file's release."""
    head = subprocess.run(["git", "-C", str(NEO_DIR), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        return head.stdout.strip()
    version = Path(NEO_DIR or ".") / "modules_forge" / "forge_version.py"
    found = re.search(r'release\s*=\s*"([^"]+)"', version.read_text()) if version.exists() else None
    return f"release {found.group(1)}" if found else "unknown"


def api(path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    return real_webui.api(URL, path, payload, timeout)


def api_status(path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    return real_webui.api_status(URL, path, payload, timeout)


def neo_args(data_dir: Path, with_fluxq: bool) -> list[str]:
    args = [neo_python(), "launch.py", "--cpu", "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check", "--api",
            "--server-name", "127.0.0.1", "--port", str(PORT), "--data-dir", str(data_dir),
            # gradio serves files only from allowed paths (the page's own script.js and javascript/*.js)
            "--gradio-allowed-path", str(NEO_DIR)]
    return args if with_fluxq else [*args, "--disable-extra-extensions"]


@contextmanager
def running_neo(data_dir: Path, with_fluxq: bool = True,
                start_timeout: int = 240) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Neo started on ``data_dir``; yields (process, console log path) and stops it afterwards."""
    name = "neo" if with_fluxq else "neo-alone"
    with real_webui.running_webui(neo_args(data_dir, with_fluxq), str(NEO_DIR), data_dir, URL, name,
                                  start_timeout) as running:
        yield running


def build_neo_models(data_dir: Path) -> dict[str, Path]:
    """Every file the real-Neo tests load (kept between runs when the data dir is; built once otherwise)."""
    models = data_dir / "models"
    files = {"q4_0": models / "Stable-diffusion" / "flux1-dev-Q4_0.gguf",
             "iq4_xs": models / "Stable-diffusion" / "flux1-dev-IQ4_XS.gguf",
             "q5_1": models / "Stable-diffusion" / "flux1-dev-Q5_1.gguf",
             "sd15": models / "Stable-diffusion" / "fluxq_sd15.safetensors",
             "t5": models / "text_encoder" / "t5-v1_1-xxl-encoder-Q4_0.gguf",
             "clip": models / "text_encoder" / "clip_l.safetensors",
             "ae": models / "VAE" / "ae.safetensors",
             "sd_vae": models / "VAE" / "fluxq_user_vae.safetensors",
             "lora": models / "Lora" / f"{LORA_NAME}.safetensors"}
    for key, qtype in (("q4_0", T.Q4_0), ("iq4_xs", T.IQ4_XS), ("q5_1", T.Q5_1)):
        real_webui.write_flux_gguf(files[key], qtype)
    real_webui.write_t5_gguf(files["t5"], T.Q4_0)
    real_webui.write_clip_and_ae(files["clip"], files["ae"], neo_python(),
                                 Path(NEO_DIR) / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev")
    real_webui.write_sd15(files["sd15"], files["sd_vae"], neo_python(), Path(NEO_DIR), "--cpu",
                          os.path.join("modules_forge", "packages"))
    real_webui.write_flux_lora(files["lora"])
    return files


def seconds_per_step(log_text: str) -> float | None:
    """The sampler's last tqdm rate in this log ("100%|...| 1/1 [03:02<00:00, 182.45s/it]"); Neo's "Total progress"
    bar (which also counts the VAE) starts with its label and is left out."""
    bars = re.findall(r"(?:^|\r|\n|\x1b\[A)\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*?(\d+(?:\.\d+)?)(s/it|it/s)\]", log_text)
    if not bars:
        return None
    value, unit = bars[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value)
