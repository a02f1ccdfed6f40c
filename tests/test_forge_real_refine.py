"""Opt-in: "fluxq refine" inside a REAL Forge (FORGE_DIR=/path/to/stable-diffusion-webui-forge with its venv in venv/).

Skipped unless FORGE_DIR is set (prepare Forge as FORGE_NOTES §9 says). No model can be downloaded here, so the
test builds one SD1.5 checkpoint with random weights in the original single-file layout (UNet
``model.diffusion_model.*``, VAE ``first_stage_model.*``, CLIP-L ``cond_stage_model.transformer.text_model.*``; fp16,
~2 GB) from Forge's own UNet/VAE classes and its bundled runwayml configs, and a random SD VAE as the user's
"VAE / Text Encoder" module. The first pass is that SD1.5 checkpoint under one name (a Flux first pass would take
many minutes on CPU; the script does not care what made the image), the refine checkpoint the same file hard-linked
under a second name, so Forge really switches models. Images are noise: this tests the wiring, not image quality.

Checks: the requests succeed; images come back at first-pass size x scale (multiples of 8); the infotext carries the
``fluxq refine`` keys; Forge's console shows exactly one refine model load per job (two batches in the first job),
with no additional modules for it while the first pass loaded the user's module; the user's checkpoint and modules
are back in /sdapi/v1/options afterwards and the next job loads them again; no traceback through our code.
Needs ~2.5 GB disk (removed afterwards unless FLUXQ_FORGE_REFINE_DATA names a data dir to keep), ~13 GB RAM (Forge
keeps SD1.5 in fp32 on CPU; peak RSS 12.1 GB here) and about a minute on a 2-core CPU.
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from lib_fluxq import refine as R
from tests.real_forge import FORGE_DIR, GB, api, forge_python, our_tracebacks, peak_rss, requires_forge, running_forge

pytestmark = requires_forge

# Forge's UNet takes ldm-style config (what huggingface_guess detects for SD1.5); its VAE class already has the ldm
# key names, so both state dicts are saved as they are under the single-file prefixes.
_BUILD_SD15 = r"""
import sys
repo, checkpoint_out, vae_out = sys.argv[1:4]
sys.argv[1:] = ['--always-cpu']  # Forge's backend parses argv at import; CPU-only torch here
sys.path[:0] = ['.', 'packages_3rdparty']  # Forge's root and its vendored gguf
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.nn.vae import IntegratedAutoencoderKL
torch.manual_seed(0)
sd = {}
unet = IntegratedUNet2DConditionModel(
    in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    num_heads=8, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_linear_in_transformer=False, context_dim=768, adm_in_channels=None).half()
sd.update({'model.diffusion_model.' + k: v.contiguous() for k, v in unet.state_dict().items()})
del unet
vae_config = IntegratedAutoencoderKL.load_config(repo + '/vae')
vae = IntegratedAutoencoderKL.from_config(vae_config).half()
sd.update({'first_stage_model.' + k: v.contiguous() for k, v in vae.state_dict().items()})
clip = CLIPTextModel(CLIPTextConfig.from_pretrained(repo + '/text_encoder')).half()
for k, v in clip.state_dict().items():
    sd['cond_stage_model.transformer.' + k] = v.contiguous()
# zero final-norm bias → NaN images downstream (FORGE_NOTES §9)
key = 'cond_stage_model.transformer.text_model.final_layer_norm.bias'
sd[key] = torch.full_like(sd[key], 0.01)
save_file(sd, checkpoint_out)
torch.manual_seed(1)
user_vae = IntegratedAutoencoderKL.from_config(vae_config).half()  # a standalone SD VAE (ldm names, no prefix)
save_file({k: v.contiguous() for k, v in user_vae.state_dict().items()}, vae_out)
"""

FIRST, REFINE = "fluxq_first_sd15.safetensors", "fluxq_refine_sd15.safetensors"
WIDTH, HEIGHT, SCALE = 64, 72, 1.5  # 72 x 1.5 = 108 → 112: the rounding to multiples of 8 is exercised too


def _build_models(data_dir: Path) -> dict[str, Path]:
    checkpoints, vae_dir = data_dir / "models" / "Stable-diffusion", data_dir / "models" / "VAE"
    checkpoints.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    files = {"first": checkpoints / FIRST, "refine": checkpoints / REFINE,
             "vae": vae_dir / "fluxq_user_vae.safetensors"}
    if not files["first"].exists() or not files["vae"].exists():
        repo = Path(FORGE_DIR) / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
        subprocess.run([forge_python(), "-c", _BUILD_SD15, str(repo), str(files["first"]), str(files["vae"])],
                       cwd=FORGE_DIR, check=True, timeout=900)
    if not files["refine"].exists():
        os.link(files["first"], files["refine"])  # a second name without a second 2 GB
    return files


def _model_loads(log_text: str) -> list[tuple[str, list[str]]]:
    """(checkpoint file name, additional modules) of every "Loading Model:" line Forge printed (forge_model_reload)."""
    loads = []
    for match in re.finditer(r"^Loading Model: \{'checkpoint_info': \{'filename': '([^']*)'.*?'additional_modules': "
                             r"(\[[^\]]*\])", log_text, flags=re.M):
        loads.append((Path(match.group(1)).name, [Path(m).name for m in ast.literal_eval(match.group(2))]))
    return loads


def _decode(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def _txt2img(n_iter: int, refine: dict) -> tuple[dict, float]:
    payload = {"prompt": "portrait photo of a woman", "negative_prompt": "blurry", "width": WIDTH, "height": HEIGHT,
               "steps": 2, "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1,
               "batch_size": 1, "n_iter": n_iter, "alwayson_scripts": {"fluxq refine": {"args": [refine]}}}
    started = time.time()
    result = api("/sdapi/v1/txt2img", payload, timeout=1500)
    return result, time.time() - started


def test_real_forge_refine_switches_once_and_restores(tmp_path_factory: pytest.TempPathFactory) -> None:
    own_data = "FLUXQ_FORGE_REFINE_DATA" not in os.environ  # a given data dir keeps its models for the next run
    data_dir = Path(os.environ.get("FLUXQ_FORGE_REFINE_DATA") or tmp_path_factory.mktemp("forge_refine"))
    try:
        started = time.time()
        files = _build_models(data_dir)
        build_s = time.time() - started
        with running_forge(data_dir) as (forge, log_path):
            startup = log_path.read_text()
            assert not our_tracebacks(startup), our_tracebacks(startup)
            assert not re.search(r"Error (loading|running|executing).*fluxq", startup), startup[-3000:]
            modules = api("/sdapi/v1/sd-modules")
            user_vae = next(m["filename"] for m in modules if Path(m["filename"]).name == files["vae"].name)
            # the user's selection: first-pass checkpoint plus a VAE module (as a Flux user has ae/clip_l/t5 selected)
            api("/sdapi/v1/options", {"sd_model_checkpoint": FIRST, "forge_additional_modules": [user_vae]})
            before = api("/sdapi/v1/options")
            refine = {"enable": True, "checkpoint": REFINE, "scale": SCALE, "steps": 2, "denoise": 0.3,
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
                  "loads_job1": _model_loads(log_job1), "loads_job2": _model_loads(log_job2),
                  "pixel_range_job1": [_decode(e).getextrema() for e in first["images"]],
                  "refine_log": re.findall(r"^\[fluxq refine\].*$", log_text, flags=re.M)}
        print("REAL FORGE REFINE:", json.dumps(report, indent=1, ensure_ascii=False))

        expected_size = R.target_size(WIDTH, HEIGHT, SCALE)
        assert expected_size == (96, 112)
        for result, count in ((first, 2), (second, 1)):
            assert len(result["images"]) == count, log_text[-3000:]
            for encoded in result["images"]:
                assert _decode(encoded).size == expected_size
            info = json.loads(result["info"])
            for infotext in info["infotexts"]:
                assert "fluxq refine: True" in infotext, infotext
                for key in ("checkpoint", "scale", "denoise", "steps", "family", "cfg", "faces"):
                    assert f"{R.infotext_key(key)}: " in infotext, (key, infotext)
                assert f"{R.infotext_key('scale')}: {SCALE}" in infotext and f"{R.infotext_key('family')}: sd15" \
                    in infotext, infotext
        # each job: the user's checkpoint with its module for the first pass, then ONE switch to the refine
        # checkpoint with no additional modules, however many batches
        for log_job in (log_job1, log_job2):
            assert _model_loads(log_job) == [(FIRST, [files["vae"].name]), (REFINE, [])], log_job[-3000:]
        assert len(re.findall(r"^\[fluxq refine\] image \d+/2: 64x72 → 96x112", log_job1, flags=re.M)) == 2
        # the user's selection is back after the job (and the second job's first pass loaded it again, above)
        for key in ("sd_model_checkpoint", "forge_additional_modules"):
            assert after[key] == before[key], (key, before[key], after[key])
        assert not our_tracebacks(log_text), our_tracebacks(log_text)
    finally:
        if own_data:  # 2 GB per run; pytest would keep the last three temp dirs
            shutil.rmtree(data_dir / "models", ignore_errors=True)
    sys.stdout.flush()
