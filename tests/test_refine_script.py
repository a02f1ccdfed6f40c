"""The "fluxq refine" script against tests/forge_standin_processing.py (Forge dfdcbab6's processing API shape).

What must hold in a real Forge (FORGE_NOTES §7): one switch to the SD model per job (not per image or per batch),
no unload/reload churn between refine jobs, ``forge_additional_modules`` empty for the SD pass, the user's options
back afterwards (Flux reloads at the next generation), hires ``hr_additional_modules`` never None, every parameter in
the infotext and read back from it, and API args accepted by name.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_fluxq import refine as R
from tests import forge_standin_processing as standin

skdata = pytest.importorskip("skimage.data")

MODULES = ["/models/VAE/ae.safetensors", "/models/text_encoder/clip_l.safetensors",
           "/models/text_encoder/t5xxl_fp8.safetensors"]


@pytest.fixture()
def checkpoints(tmp_path):
    """Real (tiny) safetensors files whose keys say SD1.5 / SDXL, and a Flux GGUF name for the first pass."""
    sd15 = tmp_path / "dreamshaper8.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(2)}, str(sd15))
    sdxl = tmp_path / "juggernautXL.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(sdxl))
    return {"flux": str(tmp_path / "flux1-schnell-Q4_0.gguf"), "sd15": str(sd15), "sdxl": str(sdxl)}


def _setup(checkpoints, forge=True, first_pass=None):
    record = standin.install(list(checkpoints.values()), MODULES, current=checkpoints["flux"],
                             selected_modules=MODULES, first_pass=first_pass, forge=forge)
    host = importlib.import_module("lib_fluxq.host.refine_host")
    from modules import processing, scripts, shared  # the stand-in

    script = host.FluxqRefineScript()
    defaults = [getattr(R.RefineSettings(), n) for n in R.SETTING_NAMES]
    runner = scripts.ScriptRunner([script], [defaults])
    return record, host, script, runner, processing, shared


def _txt2img(processing, runner, script_args, **kw):
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a portrait", width=512, height=768, seed=100,
                                                    steps=4, cfg_scale=1.0, sampler_name="Euler", scheduler="Simple",
                                                    **kw)
    p.scripts, p.script_args = runner, script_args
    return processing.process_images(p)


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    standin.uninstall()


def test_one_model_switch_per_job_and_no_flux_modules_in_the_sd_pass(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints)
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "faces": False}]}})
    processed = _txt2img(processing, runner, args, n_iter=3, batch_size=2)

    # loads: Flux for the first pass, then the SD model ONCE for all 6 images (x tiles)
    assert [load["checkpoint"] for load in record.loads] == ["flux1-schnell-Q4_0.gguf", "dreamshaper8.safetensors"]
    assert record.loads[0]["modules"] == ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp8.safetensors"]
    assert record.loads[1]["modules"] == []  # forge_additional_modules emptied for the SD pass
    assert record.unloads == 0  # no unload/reload churn between refine jobs
    refine_jobs = [j for j in record.jobs if j["kind"] == "StableDiffusionProcessingImg2Img"]
    tiles = len(R.plan_tiles(1024, 1536, 512, 512, 64))
    assert len(refine_jobs) == 6 * tiles
    assert all(j["checkpoint"] == "dreamshaper8.safetensors" and j["modules"] == [] for j in refine_jobs)
    assert all(j["cfg"] == 7.5 and j["denoise"] == 0.3 and j["size"] == (512, 512) for j in refine_jobs)
    assert {j["seed"] for j in refine_jobs} == set(processed.all_seeds)
    assert [im.size for im in processed.images] == [(1024, 1536)] * 6
    assert len(record.saved) == 6 and all(s["suffix"] == "-fluxq-refine" for s in record.saved)

    # the user's options are back; the next generation reloads Flux with its modules, once
    assert shared.opts.sd_model_checkpoint.startswith("flux1-schnell-Q4_0.gguf")
    assert shared.opts.forge_additional_modules == MODULES
    _txt2img(processing, runner, runner.init_script_args({}))
    assert [load["checkpoint"] for load in record.loads][-1] == "flux1-schnell-Q4_0.gguf"
    assert len(record.loads) == 3


def test_sdxl_refine_is_one_pass_with_sdxl_cfg_and_face_pass_on_a_real_face(checkpoints):
    face = Image.fromarray(skdata.astronaut()).resize((512, 512))
    record, host, script, runner, processing, shared = _setup(checkpoints, first_pass={100: face})
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "juggernautXL",
                                                               "scale": 2.0}]}})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="astronaut", width=512, height=512, seed=100, steps=4)
    p.scripts, p.script_args = runner, args
    processed = processing.process_images(p)
    jobs = [j for j in record.jobs if j["kind"] == "StableDiffusionProcessingImg2Img"]
    whole, faces = [j for j in jobs if not j["masked"]], [j for j in jobs if j["masked"]]
    assert [j["size"] for j in whole] == [(1024, 1024)]  # SDXL at 1024²: no tiles
    assert whole[0]["cfg"] == 5.0
    assert len(faces) == 1 and faces[0]["denoise"] == 0.4
    w, h = faces[0]["size"]
    assert w % 8 == 0 and h % 8 == 0 and 0.8 < w * h / 1024 ** 2 < 1.2  # SDXL inpaints at its native area
    assert processed.images[0].size == (1024, 1024)
    assert [load["checkpoint"] for load in record.loads][-1] == "juggernautXL.safetensors"


def test_hires_without_hr_additional_modules_no_longer_crashes(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x", enable_hr=True, hr_additional_modules=None)
    p.scripts, p.script_args = None, []
    with pytest.raises(TypeError, match="not iterable"):  # the stand-in reproduces Forge's bug without the script
        processing.process_images(p)
    for hr_checkpoint, expected in ((None, ["Use same choices"]), ("dreamshaper8", [])):
        p = processing.StableDiffusionProcessingTxt2Img(prompt="x", enable_hr=True, hr_additional_modules=None,
                                                        hr_checkpoint_name=hr_checkpoint)
        p.scripts, p.script_args = runner, runner.init_script_args({})  # refine itself off
        processing.process_images(p)
        assert p.hr_additional_modules == expected


def test_infotext_round_trip_through_the_first_pass_infotext(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints)
    from modules import infotext_utils

    chosen = {"enable": True, "checkpoint": "dreamshaper8", "denoise": 0.35, "steps": 12, "prompt": "sharp, detailed",
              "tiles": "off", "faces": False, "face_max": 3, "keep_originals": True}
    processed = _txt2img(processing, runner, runner.init_script_args({"fluxq refine": {"args": [chosen]}}))
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    back = R.settings_from_infotext(params)
    expected = R.settings_from_args(chosen)
    resolved = {"family": "sd15", "cfg": 7.5, "face_size": 512}  # what 'auto'/0 resolved to, written explicitly
    assert back == R.RefineSettings(**{**vars(expected), **resolved})
    for name in R.SETTING_NAMES:
        assert R.infotext_key(name) in params
    # keep_originals: the unrefined image follows the refined one
    assert [im.size for im in processed.images] == [(1024, 1536), (512, 768)]

    # the UI's paste table: every setting has a key; 'enable' switches off for an infotext without refine
    components = {name: object() for name in R.SETTING_NAMES}
    fields = host.infotext_fields_for(components)
    assert len(fields) == len(R.SETTING_NAMES)
    enable = dict((c, k) for c, k in fields)[components["enable"]]
    assert enable(params) is True and enable({"Steps": "20"}) is False


def test_api_args_by_name_equal_positional(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints)
    named = {"enable": True, "checkpoint": "juggernautXL", "denoise": 0.25, "faces": False, "scale": 1.5}
    by_name = runner.init_script_args({"fluxq refine": {"args": [named]}})
    positional = runner.init_script_args(
        {"fluxq refine": {"args": [getattr(R.settings_from_args(named), n) for n in R.SETTING_NAMES]}})
    results = []
    for args in (by_name, positional):
        before = len(record.jobs)
        _txt2img(processing, runner, args)
        results.append([(j["size"], j["cfg"], j["denoise"]) for j in record.jobs[before:]
                        if j["kind"] == "StableDiffusionProcessingImg2Img"])
    assert results[0] == results[1] == [((768, 1152), 5.0, 0.25)]
    with pytest.raises(R.RefineError, match="unknown fluxq refine arg"):
        script.process(None, {"denoize": 0.2})


def test_bad_checkpoint_fails_before_the_first_pass(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints)
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "nope"}]}})
    with pytest.raises(R.RefineError, match="not found"):
        _txt2img(processing, runner, args)
    assert not [j for j in record.jobs if j["kind"] == "StableDiffusionProcessingImg2Img"]
    flux = {"enable": True, "checkpoint": "flux1-schnell", "family": "sd15"}
    args = runner.init_script_args({"fluxq refine": {"args": [flux]}})
    # a .gguf cannot be sniffed; with an explicit family it is accepted by name — but 'auto' is refused clearly
    with pytest.raises(R.RefineError, match="set the refine family"):
        _txt2img(processing, runner, runner.init_script_args(
            {"fluxq refine": {"args": [{"enable": True, "checkpoint": "flux1-schnell"}]}}))


def test_a1111_shape_has_no_forge_modules_override(checkpoints):
    record, host, script, runner, processing, shared = _setup(checkpoints, forge=False)
    assert host.IS_FORGE is False
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "faces": False, "tiles": "off"}]}})
    processed = _txt2img(processing, runner, args)
    assert [im.size for im in processed.images] == [(1024, 1536)]
    assert [load["checkpoint"] for load in record.loads] == ["flux1-schnell-Q4_0.gguf", "dreamshaper8.safetensors"]
    assert shared.opts.sd_model_checkpoint.startswith("flux1-schnell-Q4_0.gguf")
    assert "forge_additional_modules" not in shared.opts.data


def test_refined_pixels_come_from_the_img2img_result(checkpoints):
    """With the identity stand-in sampler, the refined image is the Lanczos upscale of the first pass, exactly."""
    src = Image.fromarray((np.random.default_rng(0).random((768, 512, 3)) * 255).astype(np.uint8))
    record, host, script, runner, processing, shared = _setup(checkpoints, first_pass={100: src})
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "faces": False, "tiles": "off"}]}})
    processed = _txt2img(processing, runner, args)
    expected = src.resize((1024, 1536), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(processed.images[0]), np.asarray(expected))
