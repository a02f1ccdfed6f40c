"""The "fluxq refine" script against tests/forge_standin_processing.py (Forge dfdcbab6's processing API shape).

What must hold in a real Forge (FORGE_NOTES §7): one switch to the SD model per job (not per image or per batch),
no unload/reload churn between refine jobs, ``forge_additional_modules`` empty for the SD pass, the user's options
back afterwards (Flux reloads at the next generation), hires ``hr_additional_modules`` never None, every parameter in
the infotext and read back from it, and API args accepted by name.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file
from skimage import data as skdata

from lib_fluxq import refine as R
from tests import forge_standin_processing as standin

MODULES = ["/models/VAE/ae.safetensors", "/models/text_encoder/clip_l.safetensors",
           "/models/text_encoder/t5xxl_fp8.safetensors"]


# The key Forge/huggingface_guess and lib_fluxq.pairing tell SD1.5 from SDXL by: its input width is the UNet's
# cross-attention width (CLIP-L 768 for SD1.5; CLIP-L + OpenCLIP-G = 2048 for SDXL); 640 channels at that level.
UNET_ATTN2_K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def _flux_gguf(path) -> str:
    """A transformer-only Flux GGUF as city96 writes them (real tensor names, small widths)."""
    import gguf

    from tests.fixtures import random_flux_state_dict, recipe_qtype, write_gguf

    write_gguf(path, random_flux_state_dict(), recipe_qtype(gguf.GGMLQuantizationType.Q8_0))
    return str(path)


@pytest.fixture()
def checkpoints(tmp_path):
    """Real (tiny) files with the header keys and shapes of an SD1.5 and an SDXL checkpoint and of a Flux GGUF."""
    sd15 = tmp_path / "dreamshaper8.safetensors"
    save_file({UNET_ATTN2_K: torch.zeros(640, 768, dtype=torch.float16),
               "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(768)}, str(sd15))
    sdxl = tmp_path / "juggernautXL.safetensors"
    save_file({UNET_ATTN2_K: torch.zeros(640, 2048, dtype=torch.float16),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1280)}, str(sdxl))
    return {"flux": _flux_gguf(tmp_path / "flux1-schnell-Q4_0.gguf"), "sd15": str(sd15), "sdxl": str(sdxl)}


def _setup(checkpoints, forge=True, first_pass=None, sampler=None):
    record = standin.install(list(checkpoints.values()), MODULES, current=checkpoints["flux"],
                             selected_modules=MODULES, first_pass=first_pass, forge=forge, sampler=sampler)
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


def test_flux_is_released_before_the_sd_model_loads(checkpoints):
    """Issue 16 item 1: a Flux job with refine loaded SD *next to* Flux (peak +2.5 GB, 18 GB resident at rest).
    The refine runs in the txt2img job's postprocess, while that job still holds its sampler, whose model wrapper
    references the Flux engine (Forge: KDiffusionSampler ``model_wrap.inner_model = shared.sd_model``; cleared only
    by ``p.close()`` after process_images). The stand-in keeps that reference the same way and records which earlier
    models are still alive when a model loads."""
    record, host, script, runner, processing, shared = _setup(checkpoints)
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "faces": False}]}})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a portrait", width=512, height=768, seed=100)
    p.scripts, p.script_args = runner, args
    with contextlib.closing(p):  # as modules/api/api.py and modules/txt2img.py run a job
        processing.process_images(p)
    assert [(load["checkpoint"], load["still_loaded"]) for load in record.loads] == [
        ("flux1-schnell-Q4_0.gguf", []), ("dreamshaper8.safetensors", [])]
    # nothing of ours keeps the SD model either: the next generation loads Flux with SD already gone
    _txt2img(processing, runner, runner.init_script_args({}))
    assert (record.loads[-1]["checkpoint"], record.loads[-1]["still_loaded"]) == ("flux1-schnell-Q4_0.gguf", [])


@pytest.mark.parametrize("faces", [False, True])
def test_refined_png_parameters_are_the_first_pass_infotext(checkpoints, faces):
    """Issue 16 item 4: the refined image came back with the SD img2img's own PNG ``parameters`` (SD model, denoise,
    no Flux parameters, no fluxq keys). Forge writes ``image.info["parameters"]`` on every output image and the API
    and the image saver put it into the PNG: the refined image must carry the whole generation's infotext — with or
    without a face pass (whose paste makes a new image)."""
    photo = Image.fromarray(skdata.astronaut())
    record, host, script, runner, processing, shared = _setup(checkpoints, first_pass={100: photo})
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "scale": 1.0, "tiles": "off", "faces": faces}]}})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="astronaut", width=512, height=512, seed=100, steps=4,
                                                    cfg_scale=1.0, distilled_cfg_scale=3.5)
    p.scripts, p.script_args = runner, args
    processed = processing.process_images(p)
    assert sum(j["masked"] for j in record.jobs) == int(faces)
    parameters = processed.images[0].info["parameters"]
    assert parameters == processed.infotexts[0]
    assert "Model: flux1-schnell-Q4_0" in parameters and "Steps: 4" in parameters
    assert "fluxq refine: True" in parameters and "fluxq refine checkpoint: dreamshaper8" in parameters
    assert "Denoising strength" not in parameters and "Model: dreamshaper8" not in parameters
    # what the API returns: the PNG bytes Forge's encode_pil_to_base64 writes (every str in info as a text chunk)
    from PIL import PngImagePlugin

    png = io.BytesIO()
    meta = PngImagePlugin.PngInfo()
    for key, value in processed.images[0].info.items():
        if isinstance(key, str) and isinstance(value, str):
            meta.add_text(key, value)
    processed.images[0].save(png, format="PNG", pnginfo=meta)
    assert Image.open(io.BytesIO(png.getvalue())).info["parameters"] == parameters


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


def _lbp_face(image: np.ndarray) -> R.Box:
    """scikit-image's LBP cascade: an independent reference for where the face is."""
    from skimage import feature

    gray = np.asarray(Image.fromarray(image).convert("L"))
    hits = feature.Cascade(skdata.lbp_frontal_face_cascade_filename()).detect_multi_scale(
        img=gray, scale_factor=1.1, step_ratio=1, min_size=(60, 60), max_size=(300, 300))
    assert len(hits) == 1, hits
    return R.Box(hits[0]["c"], hits[0]["r"], hits[0]["width"], hits[0]["height"])


def _iou(a: R.Box, b: R.Box) -> float:
    def polygon(box):
        return np.array([[box.x, box.y], [box.right, box.y], [box.right, box.bottom], [box.x, box.bottom]],
                        np.float32)

    inter, _ = cv2.intersectConvexConvex(polygon(a), polygon(b))
    return inter / (a.w * a.h + b.w * b.h - inter)


def test_face_pass_through_forge_masking_on_a_textured_photo(checkpoints, capsys):
    """The whole host path, with a stand-in that honours the mask as Forge does. The inpaint "model" inverts the
    colours of all it gets; Forge composites its init image back outside its mask, the script pastes through its
    own feathered mask. On the astronaut photo: the face comes back inverted in place (position and orientation:
    template matching finds it at offset 0; a shifted or mirrored paste differs by the texture's one-pixel
    difference), and everything outside the face box grown by dilation + 3 x blur is the photo, bit for bit."""
    photo = skdata.astronaut()  # 512x512: scale 1 keeps the size, so the whole-image pass's input is the photo
    src = photo.astype(np.float64)
    record, host, script, runner, processing, shared = _setup(
        checkpoints, first_pass={100: Image.fromarray(photo)},
        sampler=lambda image, job: ImageOps.invert(image) if job["masked"] else image)
    dilation, blur = 4, 4
    args = runner.init_script_args({"fluxq refine": {"args": [{
        "enable": True, "checkpoint": "dreamshaper8", "scale": 1.0, "tiles": "off", "face_dilation": dilation,
        "face_blur": blur}]}})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="astronaut", width=512, height=512, seed=100, steps=4)
    p.scripts, p.script_args = runner, args
    out = np.asarray(processing.process_images(p).images[0], np.float64)

    assert sum(j["masked"] for j in record.jobs) == 1
    x, y, w, h = map(int, re.search(r"face at (\d+),(\d+) (\d+)x(\d+)", capsys.readouterr().out).groups())
    found, reference = R.Box(x, y, w, h), _lbp_face(photo)
    assert _iou(found, reference) >= 0.5, (found, reference)

    reach = dilation + 3 * blur
    outside = np.ones(src.shape[:2], bool)
    outside[max(0, y - reach):y + h + reach, max(0, x - reach):x + w + reach] = False
    assert np.array_equal(out[outside], src[outside])

    margin = 8
    core = R.Box(x + margin, y + margin, w - 2 * margin, h - 2 * margin)
    inverted_back = 255 - out[core.y:core.bottom, core.x:core.right]
    error = float(np.abs(inverted_back - src[core.y:core.bottom, core.x:core.right]).mean())
    shifted = float(np.abs(src[core.y:core.bottom, core.x + 1:core.right + 1]
                           - src[core.y:core.bottom, core.x:core.right]).mean())
    assert error < shifted / 3, (error, shifted)
    window = photo[core.y - 6:core.bottom + 6, core.x - 6:core.right + 6]
    scores = cv2.matchTemplate(window, inverted_back.astype(np.uint8), cv2.TM_SQDIFF_NORMED)
    assert cv2.minMaxLoc(scores)[2] == (6, 6)


def test_standin_keeps_the_init_image_outside_the_mask_as_forge_does(checkpoints):
    """The stand-in's own masking (what the face test above relies on): a masked img2img changes only what the
    doubled mask covers; mask 0 keeps the init pixel exactly, mask >= 128 takes the sampler's."""
    record, host, script, runner, processing, shared = _setup(
        checkpoints, sampler=lambda image, job: Image.new("RGB", image.size, (255, 0, 255)))
    init = Image.fromarray(skdata.astronaut()).resize((256, 256))
    mask = np.zeros((256, 256), np.uint8)
    mask[100:160, 80:200] = 255
    mask[100:160, 60:80] = 100  # a soft edge: 2 x 100 = 200 of 255 taken from the sampler
    job = processing.StableDiffusionProcessingImg2Img(init_images=[init], width=256, height=256, mask=
                                                      Image.fromarray(mask), mask_blur=0, inpaint_full_res=False)
    result = np.asarray(processing.process_images(job).images[0], np.float64)
    base = np.asarray(init, np.float64)
    assert np.array_equal(result[mask == 0], base[mask == 0])
    assert np.array_equal(result[mask == 255], np.broadcast_to([255, 0, 255], result[mask == 255].shape))
    soft = result[mask == 100]
    expected = base[mask == 100] + (np.array([255, 0, 255]) - base[mask == 100]) * 200 / 255
    assert np.abs(soft - expected).max() <= 1.5


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
    # the Flux GGUF is refused by its header, before the first pass, even with a family set by hand
    for flux in ({"enable": True, "checkpoint": "flux1-schnell"}, {"enable": True, "checkpoint": "flux1-schnell",
                                                                    "family": "sd15"}):
        with pytest.raises(R.RefineError, match=r"flux1-schnell-Q4_0\.gguf: is a FLUX\.1 .* model; .*SD1\.5 or SDXL"):
            _txt2img(processing, runner, runner.init_script_args({"fluxq refine": {"args": [flux]}}))
    assert not [j for j in record.jobs if j["kind"] == "StableDiffusionProcessingImg2Img"]


def test_dropdown_offers_sd_checkpoints_only(checkpoints, tmp_path):
    """Issue 16 item 6: the refine checkpoint dropdown listed the Flux GGUFs. Now: SD1.5 / SDXL by header, plus
    files without a header to read (.ckpt: the family must then be set); never Flux, a VAE or a damaged file."""
    ckpt = tmp_path / "old-sd15.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 a pickle zip")
    vae = tmp_path / "sdxl_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3, dtype=torch.float16)}, str(vae))
    damaged = tmp_path / "half-downloaded.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    files = {**checkpoints, "ckpt": str(ckpt), "vae": str(vae), "damaged": str(damaged)}
    record, host, script, runner, processing, shared = _setup(files)
    offered = sorted(title.split(" [")[0] for title in host.checkpoint_titles())
    assert offered == ["dreamshaper8.safetensors", "juggernautXL.safetensors", "old-sd15.ckpt"]

    # the header is read once per file version, not at every UI build
    calls = []
    real = R.checkpoint_family
    host.R.checkpoint_family = lambda path: calls.append(path) or real(path)
    try:
        host.checkpoint_titles()
        assert calls == []
    finally:
        host.R.checkpoint_family = real

    # a .ckpt cannot be classified: 'auto' asks for the family, an explicit one is used
    with pytest.raises(R.RefineError, match="set the refine family"):
        _txt2img(processing, runner, runner.init_script_args(
            {"fluxq refine": {"args": [{"enable": True, "checkpoint": "old-sd15.ckpt"}]}}))
    processed = _txt2img(processing, runner, runner.init_script_args(
        {"fluxq refine": {"args": [{"enable": True, "checkpoint": "old-sd15.ckpt", "family": "sd15",
                                    "faces": False, "tiles": "off"}]}}))
    assert processed.images[0].size == (1024, 1536)


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


def test_host_that_rounds_the_img2img_size_still_gives_the_planned_size(checkpoints):
    """The Neo 2.26 copy in exo101/sd-webui-forge-neo-v3 rounds every job's size to multiples of 64: a 64x64 Flux
    image refined at scale 1.5 came back 128x128 from a real Neo. The refined image has the planned size."""
    record, host, script, runner, processing, shared = _setup(checkpoints)
    process_images = processing.process_images

    def rounding(p):
        if type(p).__name__ == "StableDiffusionProcessingImg2Img":
            p.width, p.height = (max((v + 32) // 64 * 64, 64) for v in (p.width, p.height))
        return process_images(p)

    processing.process_images = rounding
    args = runner.init_script_args({"fluxq refine": {"args": [{"enable": True, "checkpoint": "dreamshaper8",
                                                               "scale": 1.5, "faces": False}]}})
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", width=64, height=64, seed=1, steps=1,
                                                    cfg_scale=1.0, sampler_name="Euler", scheduler="Simple")
    p.scripts, p.script_args = runner, args
    processed = rounding(p)
    refine_jobs = [j for j in record.jobs if j["kind"] == "StableDiffusionProcessingImg2Img"]
    assert [j["size"] for j in refine_jobs] == [(128, 128)]   # what the host really rendered
    assert [im.size for im in processed.images] == [R.target_size(64, 64, 1.5)] == [(96, 96)]
