"""Opt-in: issue 16 items 3, 5 and 7 inside a REAL Forge (FORGE_DIR=/path/to/stable-diffusion-webui-forge with its venv
in venv/; FORGE_NOTES §9). Skipped unless FORGE_DIR is set.

Uses the random-weight files of tests/real_forge.py (full-shape FLUX.1-dev Q2_K GGUF, T5-XXL Q2_K GGUF, CLIP-L, ae,
an SD1.5 checkpoint; ~8 GB of disk, kept when FLUXQ_FORGE_HOST_DATA names a data dir):

- SD1.5 after Flux (16.3): one Flux image with clip_l / t5xxl / ae selected, then SD1.5 with those still selected →
  an image whose infotext names no Flux module, and Forge's "Loading Model:" line for SD1.5 lists none.
- Pairing off (16.5): "add missing CLIP-L / T5 / VAE" off, all three files present, nothing selected → Forge's own
  500 "You do not have CLIP state dict!", no download text anywhere.
- Missing parts (16.7): a Flux GGUF with its parts nowhere on disk → one line in the API answer and one in the
  console, before the checkpoint is read.
Several minutes and ~8 GB RAM on a 2-core CPU: run under flock /tmp/fluxq-bigmem.lock.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.real_forge import (
    GB,
    URL,
    api,
    api_status,
    assert_clean_startup,
    build_flux_models,
    build_sd15_models,
    model_data_dir,
    model_loads,
    our_tracebacks,
    peak_rss,
    requires_forge,
    running_forge,
)

pytestmark = requires_forge
FLUX = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5,
        "sampler_name": "Euler", "scheduler": "Simple", "seed": 1}
SD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "cfg_scale": 7.0, "sampler_name": "Euler",
      "scheduler": "Automatic", "seed": 1}


def test_real_forge_sd15_after_flux_names_no_flux_module(tmp_path_factory: pytest.TempPathFactory) -> None:
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_HOST_DATA", "forge_host") as data_dir:
        flux, sd15 = build_flux_models(data_dir), build_sd15_models(data_dir)
        with running_forge(data_dir, start_timeout=900) as (forge, log_path):
            assert_clean_startup(log_path.read_text())
            by_name = {Path(m["filename"]).name: m["filename"] for m in api("/sdapi/v1/sd-modules")}
            selection = [by_name[flux[k].name] for k in ("clip", "t5", "ae")]
            api("/sdapi/v1/options", {"sd_model_checkpoint": flux["flux"].name, "forge_additional_modules": selection})
            offset = len(log_path.read_text())
            started = time.time()
            with peak_rss(forge.pid) as rss:
                first = api("/sdapi/v1/txt2img", FLUX, timeout=3000)
                flux_s = time.time() - started
                api("/sdapi/v1/options", {"sd_model_checkpoint": sd15["first"].name})   # modules stay selected
                second = api("/sdapi/v1/txt2img", SD, timeout=3000)
            total_s = time.time() - started
            options = api("/sdapi/v1/options")
            log = log_path.read_text()[offset:]
    flux_info, sd_info = (json.loads(r["info"])["infotexts"][0] for r in (first, second))
    loads = model_loads(log)
    print("REAL FORGE 16.3:", json.dumps({"flux_s": round(flux_s, 1), "total_s": round(total_s, 1),
                                          "peak_rss_gb": round(rss["peak"] / GB, 2), "loads": loads,
                                          "flux_infotext": flux_info, "sd_infotext": sd_info}, indent=1))
    assert re.findall(r"Module \d+: ([^,\n]+)", flux_info) == [Path(p).stem for p in selection]
    assert "Module" not in sd_info, sd_info
    assert loads[-1] == (sd15["first"].name, []), loads
    assert sorted(options["forge_additional_modules"]) == sorted(selection)   # the user's selection is kept
    assert not our_tracebacks(log), our_tracebacks(log)


def test_real_forge_pairing_off_is_forges_own_error(tmp_path_factory: pytest.TempPathFactory) -> None:
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_HOST_DATA", "forge_host") as data_dir:
        flux = build_flux_models(data_dir)
        with running_forge(data_dir, start_timeout=900) as (forge, log_path):
            assert_clean_startup(log_path.read_text())
            api("/sdapi/v1/options", {"sd_model_checkpoint": flux["flux"].name, "forge_additional_modules": [],
                                      "fluxq_pair_components": False})
            try:
                offset = len(log_path.read_text())
                started = time.time()
                with peak_rss(forge.pid) as rss:
                    status, body = api_status("/sdapi/v1/txt2img", FLUX, timeout=3000)
                seconds = time.time() - started
                log = log_path.read_text()[offset:]
            finally:   # the data dir's config keeps options: the next test must find pairing on
                api("/sdapi/v1/options", {"fluxq_pair_components": True})
    print("REAL FORGE 16.5:", json.dumps({"status": status, "body": body, "seconds": round(seconds, 1),
                                          "peak_rss_gb": round(rss["peak"] / GB, 2)}, indent=1))
    assert status == 500 and "You do not have CLIP state dict!" in json.dumps(body), body
    for text in (json.dumps(body), log):
        assert "Download" not in text and "picks them up" not in text
    assert not [line for line in log.splitlines() if line.startswith("[fluxq]")], log[-3000:]


def test_real_forge_missing_parts_are_one_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_HOST_DATA", "forge_host") as data_dir:
        flux = build_flux_models(data_dir)
        lonely = tmp_path / "lonely"
        os.makedirs(lonely / "models" / "Stable-diffusion")
        os.link(flux["flux"], lonely / "models" / "Stable-diffusion" / flux["flux"].name)
        with running_forge(lonely, start_timeout=900) as (forge, log_path):
            assert_clean_startup(log_path.read_text())
            api("/sdapi/v1/options", {"sd_model_checkpoint": flux["flux"].name, "forge_additional_modules": []})
            offset = len(log_path.read_text())
            started = time.time()
            status, body = api_status("/sdapi/v1/txt2img", FLUX, timeout=600)
            seconds = time.time() - started
            log = log_path.read_text()[offset:]
    print("REAL FORGE 16.7:", json.dumps({"status": status, "body": body, "seconds": round(seconds, 1),
                                          "console": log, "url": URL}, indent=1))
    assert status == 500 and "\n" not in body["detail"] and "ae.safetensors" in body["detail"], body
    printed = [line for line in log.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in printed), log
    assert [line for line in printed if line.startswith("[fluxq]")] == [f"[fluxq] {body['detail']}"], printed
    assert not any(line.startswith("Loading Model:") for line in printed)   # stopped before reading the file
