"""Opt-in: "fluxq refine" inside a REAL Forge (FORGE_DIR=/path/to/stable-diffusion-webui-forge with its venv in venv/).

Skipped unless FORGE_DIR is set (prepare Forge as FORGE_NOTES §9 says). No model can be downloaded here, so the
tests build random-weight models (tests/real_forge.py): an SD1.5 checkpoint in the original single-file layout (UNet
``model.diffusion_model.*``, VAE ``first_stage_model.*``, CLIP-L ``cond_stage_model.transformer.text_model.*``; fp16,
~2 GB) from Forge's own UNet/VAE classes and its bundled runwayml configs, a random SD VAE as a user's "VAE / Text
Encoder" module, and (second test) the full-shape FLUX.1-dev Q2_K GGUF + T5-XXL Q2_K GGUF + CLIP-L + ae of
test_forge_real.py. Images are noise: these test the wiring, not image quality.

``test_real_forge_refine_switches_once_and_restores``: the first pass is the SD1.5 checkpoint under one name (fast;
the script does not care what made the image), the refine checkpoint the same file hard-linked under a second name,
so Forge really switches models. Checks: the requests succeed; images come back at first-pass size x scale (multiples
of 8); the infotext carries the ``fluxq refine`` keys; Forge's console shows exactly one refine model load per job
(two batches in the first job), with no additional modules for it while the first pass loaded the user's module; the
user's checkpoint and modules are back in /sdapi/v1/options afterwards and the next job loads them again; no
traceback through our code. Needs ~2.5 GB disk, ~13 GB RAM (Forge keeps SD1.5 in fp32 on CPU; peak RSS 12.1 GB
here) and about a minute on a 2-core CPU.

``test_real_forge_flux_then_sd15_refine``: the product's workflow — the user selected the Flux GGUF with clip_l,
t5xxl and ae as forge_additional_modules; one 64x64 Flux txt2img (1 step) with refine on (the SD1.5 checkpoint,
scale 1.5, faces on). Checks: the request succeeds; the image is 96x96; Forge's console shows the Flux load with the
three modules, then ONE load of the SD1.5 checkpoint with ``'additional_modules': []`` (the Flux ae/T5/CLIP-L must
not be merged into the SD model, Forge #2255); the user's checkpoint and modules are back afterwards; the infotext
has the refine keys; no traceback through our code. Needs ~8 GB disk and a few minutes on a 2-core CPU.

Model files live in pytest temp dirs and are removed afterwards, unless FLUXQ_FORGE_REFINE_DATA /
FLUXQ_FORGE_FLUX_REFINE_DATA name data dirs to keep them in for the next run.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lib_fluxq import refine as R
from tests.real_forge import (
    GB,
    SD15_FIRST,
    SD15_REFINE,
    api,
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
WIDTH, HEIGHT, SCALE = 64, 72, 1.5  # 72 x 1.5 = 108 → 112: the rounding to multiples of 8 is exercised too


def _decode(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def _txt2img(n_iter: int, refine: dict) -> tuple[dict, float]:
    payload = {"prompt": "portrait photo of a woman", "negative_prompt": "blurry", "width": WIDTH, "height": HEIGHT,
               "steps": 2, "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1,
               "batch_size": 1, "n_iter": n_iter, "alwayson_scripts": {"fluxq refine": {"args": [refine]}}}
    started = time.time()
    result = api("/sdapi/v1/txt2img", payload, timeout=1500)
    return result, time.time() - started


def _assert_refine_infotexts(result: dict, scale: float) -> None:
    for infotext in json.loads(result["info"])["infotexts"]:
        assert "fluxq refine: True" in infotext, infotext
        for key in ("checkpoint", "scale", "denoise", "steps", "family", "cfg", "faces"):
            assert f"{R.infotext_key(key)}: " in infotext, (key, infotext)
        assert f"{R.infotext_key('scale')}: {scale}" in infotext, infotext
        assert f"{R.infotext_key('family')}: sd15" in infotext, infotext


def test_real_forge_refine_switches_once_and_restores(tmp_path_factory: pytest.TempPathFactory) -> None:
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_REFINE_DATA", "forge_refine") as data_dir:
        started = time.time()
        files = build_sd15_models(data_dir)
        build_s = time.time() - started
        with running_forge(data_dir) as (forge, log_path):
            assert_clean_startup(log_path.read_text())
            modules = api("/sdapi/v1/sd-modules")
            user_vae = next(m["filename"] for m in modules if Path(m["filename"]).name == files["vae"].name)
            # the user's selection: first-pass checkpoint plus a VAE module (as a Flux user has ae/clip_l/t5 selected)
            api("/sdapi/v1/options", {"sd_model_checkpoint": SD15_FIRST, "forge_additional_modules": [user_vae]})
            before = api("/sdapi/v1/options")
            refine = {"enable": True, "checkpoint": SD15_REFINE, "scale": SCALE, "steps": 2, "denoise": 0.3,
                      "faces": True, "sampler": "Euler", "scheduler": "Automatic"}
            log_offset = len(log_path.read_text())
            with peak_rss(forge.pid) as rss:
                first, first_s = _txt2img(2, refine)
            log_job1 = log_path.read_text()[log_offset:]
            after = api("/sdapi/v1/options")
            log_offset += len(log_job1)
            with peak_rss(forge.pid) as rss2:  # a second job: does memory keep growing per job?
                second, second_s = _txt2img(1, refine)
            log_job2 = log_path.read_text()[log_offset:]
            log_text = log_path.read_text()

        report = {"build_models_s": round(build_s, 1), "job1_2_batches_s": round(first_s, 1),
                  "job2_1_batch_s": round(second_s, 1), "baseline_rss_gb": round(rss["baseline"] / GB, 2),
                  "peak_rss_gb_job1": round(rss["peak"] / GB, 2), "peak_rss_gb_job2": round(rss2["peak"] / GB, 2),
                  "checkpoint_gb": round(files["first"].stat().st_size / GB, 2),
                  "loads_job1": model_loads(log_job1), "loads_job2": model_loads(log_job2),
                  "pixel_range_job1": [_decode(e).getextrema() for e in first["images"]],
                  "refine_log": re.findall(r"^\[fluxq refine\].*$", log_text, flags=re.M)}
        print("REAL FORGE REFINE:", json.dumps(report, indent=1, ensure_ascii=False))

        expected_size = R.target_size(WIDTH, HEIGHT, SCALE)
        assert expected_size == (96, 112)
        for result, count in ((first, 2), (second, 1)):
            assert len(result["images"]) == count, log_text[-3000:]
            for encoded in result["images"]:
                assert _decode(encoded).size == expected_size
            _assert_refine_infotexts(result, SCALE)
        # each job: the user's checkpoint with its module for the first pass, then ONE switch to the refine
        # checkpoint with no additional modules, however many batches
        for log_job in (log_job1, log_job2):
            assert model_loads(log_job) == [(SD15_FIRST, [files["vae"].name]), (SD15_REFINE, [])], log_job[-3000:]
        assert len(re.findall(r"^\[fluxq refine\] image \d+/2: 64x72 → 96x112", log_job1, flags=re.M)) == 2
        # the user's selection is back after the job (and the second job's first pass loaded it again, above)
        for key in ("sd_model_checkpoint", "forge_additional_modules"):
            assert after[key] == before[key], (key, before[key], after[key])
        assert not our_tracebacks(log_text), our_tracebacks(log_text)
    sys.stdout.flush()


def _available_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


def test_real_forge_flux_then_sd15_refine(tmp_path_factory: pytest.TempPathFactory) -> None:
    width = height = 64
    scale = 1.5
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_FLUX_REFINE_DATA", "forge_flux_refine") as data_dir:
        started = time.time()
        flux = build_flux_models(data_dir)
        sd15 = build_sd15_models(data_dir)
        build_s = time.time() - started
        with running_forge(data_dir) as (forge, log_path):
            assert_clean_startup(log_path.read_text())
            by_name = {Path(m["filename"]).name: m["filename"] for m in api("/sdapi/v1/sd-modules")}
            user_modules = [by_name[flux[part].name] for part in ("clip", "t5", "ae")]
            # the user's selection: the Flux GGUF with its clip_l / t5xxl / ae modules, as the Flux UI preset has it
            api("/sdapi/v1/options", {"sd_model_checkpoint": flux["flux"].name,
                                      "forge_additional_modules": user_modules})
            before = api("/sdapi/v1/options")
            refine = {"enable": True, "checkpoint": sd15["refine"].name, "scale": scale, "steps": 2,
                      "denoise": 0.3, "faces": True, "sampler": "Euler", "scheduler": "Automatic"}
            payload = {"prompt": "portrait photo of a woman", "width": width, "height": height, "steps": 1,
                       "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler", "scheduler": "Simple",
                       "seed": 1, "alwayson_scripts": {"fluxq refine": {"args": [refine]}}}
            log_offset = len(log_path.read_text())
            least_available = {"bytes": _available_memory()}

            def at_peak() -> None:
                least_available["bytes"] = min(least_available["bytes"], _available_memory())

            job_started = time.time()
            with peak_rss(forge.pid, on_peak=at_peak) as rss:
                result = api("/sdapi/v1/txt2img", payload, timeout=1500)
            job_s = time.time() - job_started
            after = api("/sdapi/v1/options")
            log_job = log_path.read_text()[log_offset:]

        loads = model_loads(log_job)
        report = {"build_models_s": round(build_s, 1), "job_s": round(job_s, 1),
                  "model_load_times": re.findall(r"^Model loaded in .*$", log_job, flags=re.M),
                  "baseline_rss_gb": round(rss["baseline"] / GB, 2), "peak_rss_gb": round(rss["peak"] / GB, 2),
                  "least_mem_available_at_rss_peaks_gb": round(least_available["bytes"] / GB, 2),
                  "flux_gguf_gb": round(flux["flux"].stat().st_size / GB, 2),
                  "t5_gguf_gb": round(flux["t5"].stat().st_size / GB, 2),
                  "sd15_gb": round(sd15["refine"].stat().st_size / GB, 2), "loads": loads,
                  "refine_log": re.findall(r"^\[fluxq refine\].*$", log_job, flags=re.M)}
        print("REAL FORGE FLUX + REFINE:", json.dumps(report, indent=1, ensure_ascii=False))

        assert len(result["images"]) == 1, log_job[-3000:]
        expected_size = R.target_size(width, height, scale)
        assert expected_size == (96, 96)
        assert _decode(result["images"][0]).size == expected_size
        _assert_refine_infotexts(result, scale)
        # the Flux pass loads the GGUF with the user's modules, the refine ONE SD1.5 load with none of them
        assert [name for name, _ in loads] == [flux["flux"].name, sd15["refine"].name], log_job[-3000:]
        assert sorted(loads[0][1]) == sorted(flux[part].name for part in ("clip", "t5", "ae")), loads
        assert loads[1][1] == [], loads
        assert re.search(rf"^Loading Model: .*{re.escape(sd15['refine'].name)}.*'additional_modules': \[\]", log_job,
                         flags=re.M), log_job[-3000:]
        assert re.search(r"^\[fluxq refine\] image 1/1: 64x64 → 96x96 \(SD1\.5", log_job, flags=re.M), log_job[-3000:]
        for key in ("sd_model_checkpoint", "forge_additional_modules"):
            assert after[key] == before[key], (key, before[key], after[key])
        assert not our_tracebacks(log_job), our_tracebacks(log_job)
    sys.stdout.flush()
