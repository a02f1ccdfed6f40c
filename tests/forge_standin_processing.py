"""A stand-in for exactly the part of the WebUI processing API the "fluxq refine" script uses.

Mirrors lllyasviel/stable-diffusion-webui-forge at commit dfdcbab6 (2025-06-26):
- modules/processing.py ``process_images``: stored_opts → drop an unknown checkpoint override → ``set_config`` →
  ``manage_model_and_prompt_cache`` → sample → restore when ``override_settings_restore_afterwards``; hires fix's
  ``'Use same choices' not in hr_additional_modules``.
- modules/sysinfo.py ``set_config``: checkpoint/module changes go through main_entry and refresh the loading
  parameters, which sets ``processing.need_global_unload``.
- modules/sd_models.py ``forge_model_reload``: reloads only when the loading parameters' hash changes.
- modules_forge/main_entry.py: ``checkpoint_change``, ``modules_change`` (by basename),
  ``refresh_model_loading_parameters``.
- modules/scripts.py: Script, AlwaysVisible, per-script ``p.script_args[args_from:args_to]``.
- modules/api/api.py ``init_script_args``: alwayson args copied over the UI defaults, index by index.
``forge=False`` gives A1111 1.10's shape: no modules_forge, no ``forge_additional_modules`` option (setting it raises
KeyError, as Options.set does there), options restored by setattr. Written from reading those sources, not copied.
The "sampler" is deterministic: img2img samples ``sampler(init image resized to the job size, job)`` (default: that
image unchanged) and, for a masked job, composites the init image back outside the mask exactly as Forge's
``StableDiffusionProcessingImg2Img.init`` / ``apply_overlay`` do (mask blur by cv2.GaussianBlur, overlay mask =
mask x 2 clipped, alpha composite); txt2img returns a given first-pass image per seed. Output images carry their own
infotext in ``info["parameters"]`` as Forge's process_images_inner sets it (``enable_pnginfo``). Every load, unload
and job is recorded.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

STANDIN_OF = "lllyasviel/stable-diffusion-webui-forge@dfdcbab6"
MODULE_NAMES = ("modules", "modules.scripts", "modules.processing", "modules.shared", "modules.sd_models",
                "modules.images", "modules.sysinfo", "modules.infotext_utils", "modules_forge",
                "modules_forge.main_entry")


@dataclass
class Record:
    loads: list[dict[str, Any]] = field(default_factory=list)  # each real (re)load: checkpoint + modules
    unloads: int = 0  # memory_management.unload_all_models() calls
    jobs: list[dict[str, Any]] = field(default_factory=list)  # every process_images call
    saved: list[dict[str, Any]] = field(default_factory=list)


class Options:
    def __init__(self, data: dict[str, Any], forge: bool) -> None:
        object.__setattr__(self, "data", dict(data))
        object.__setattr__(self, "defaults", dict(data))
        object.__setattr__(self, "forge", forge)

    def get_default(self, key: str) -> Any:
        return self.defaults.get(key)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        if self.data.get(key) == value:
            return False
        if key not in self.defaults:
            raise KeyError(key)  # Options.set looks up data_labels[key]
        self.data[key] = value
        return True

    def __getattr__(self, key: str) -> Any:
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in self.defaults:
            raise KeyError(key)
        self.data[key] = value


class Model:
    """A loaded checkpoint (Forge's engine object: it holds the weights, so while it is referenced they stay in RAM)."""

    def __init__(self, sd_checkpoint_info: CheckpointInfo, additional_modules: list[str]) -> None:
        self.sd_checkpoint_info = sd_checkpoint_info
        self.additional_modules = additional_modules


class Sampler:
    """sd_samplers_kdiffusion.KDiffusionSampler: ``model_wrap.inner_model = shared.sd_model`` at creation; the job
    keeps it in ``p.sampler`` until ``p.close()``."""

    def __init__(self, model: Model) -> None:
        self.model_wrap = types.SimpleNamespace(inner_model=model)


class CheckpointInfo:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.name = os.path.basename(filename)
        self.model_name = os.path.splitext(self.name)[0]
        self.hash = "%08x" % (abs(hash(self.name)) % 16 ** 8)
        self.title = f"{self.name} [{self.hash}]"
        self.short_title = f"{self.model_name} [{self.hash}]"
        self.ids = [self.model_name, self.name, self.title, self.short_title]


def install(checkpoints: list[str], modules: list[str], current: str, selected_modules: list[str],
            first_pass: dict[int, Image.Image] | None = None, forge: bool = True,
            sampler: Callable[[Image.Image, dict[str, Any]], Image.Image] | None = None) -> Record:
    """Put the stand-in ``modules`` (and ``modules_forge`` when ``forge``) into sys.modules; returns the record.
    ``sampler(image, job)`` is the img2img "model": it gets the init image at the job size and the job's record."""
    uninstall()
    record = Record()
    mods = {name: types.ModuleType(name) for name in MODULE_NAMES if forge or not name.startswith("modules_forge")}
    for name, module in mods.items():
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, module)
    shared, sd_models, processing = mods["modules.shared"], mods["modules.sd_models"], mods["modules.processing"]
    scripts, images, sysinfo = mods["modules.scripts"], mods["modules.images"], mods["modules.sysinfo"]
    infotext_utils = mods["modules.infotext_utils"]

    # ---- shared
    data = {"sd_model_checkpoint": None, "samples_save": True, "samples_format": "png", "enable_pnginfo": True,
            "overlay_inpaint": True}
    if forge:
        data["forge_additional_modules"] = []
    shared.opts = Options(data, forge)
    shared.state = types.SimpleNamespace(interrupted=False, skipped=False)
    shared.sd_upscalers = [types.SimpleNamespace(name=n, data_path=None, scaler=None)
                           for n in ("None", "Lanczos", "Nearest")]
    shared.sd_model = None

    # ---- sd_models
    infos = [CheckpointInfo(path) for path in checkpoints]
    sd_models.checkpoints_list = {info.title: info for info in infos}
    sd_models.checkpoint_aliases = {alias: info for info in infos for alias in info.ids}

    def get_closet_checkpoint_match(search: str) -> CheckpointInfo | None:
        if not search:
            return None
        if search in sd_models.checkpoint_aliases:
            return sd_models.checkpoint_aliases[search]
        found = sorted([i for i in infos if search in i.title], key=lambda i: len(i.title))
        return found[0] if found else None

    sd_models.get_closet_checkpoint_match = get_closet_checkpoint_match
    sd_models.model_data = types.SimpleNamespace(forge_loading_parameters={}, forge_hash="", sd_model=None)

    def select_checkpoint() -> CheckpointInfo | None:
        return get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint") or "")

    sd_models.select_checkpoint = select_checkpoint

    loaded: list[tuple[str, weakref.ref]] = []  # every model object ever loaded, to see which are still alive

    def forge_model_reload() -> tuple[Any, bool]:
        md = sd_models.model_data
        current_hash = str(md.forge_loading_parameters)
        if md.forge_hash == current_hash:
            return md.sd_model, False
        info = md.forge_loading_parameters["checkpoint_info"]
        if info is None:
            raise ValueError("You do not have any model!")
        if md.sd_model is not None:  # Forge drops its own references and collects before loading the next model
            md.sd_model = shared.sd_model = None
            gc.collect()
        model = Model(sd_checkpoint_info=info,
                      additional_modules=list(md.forge_loading_parameters.get("additional_modules") or []))
        names = [os.path.basename(m) for m in model.additional_modules]
        # still_loaded: earlier models something else still references while this one loads (both in RAM)
        record.loads.append({"checkpoint": info.name, "modules": names,
                             "still_loaded": [name for name, ref in loaded if ref() is not None]})
        loaded.append((info.name, weakref.ref(model)))
        md.sd_model, md.forge_hash = model, current_hash
        shared.sd_model = model
        return model, True

    sd_models.forge_model_reload = forge_model_reload

    # ---- modules_forge.main_entry
    if forge:
        main_entry = mods["modules_forge.main_entry"]
        main_entry.module_list = {os.path.basename(m): m for m in modules}

        def refresh_model_loading_parameters() -> None:
            sd_models.model_data.forge_loading_parameters = dict(
                checkpoint_info=select_checkpoint(), additional_modules=shared.opts.forge_additional_modules,
                unet_storage_dtype=None)
            processing.need_global_unload = True

        def checkpoint_change(name: str, save: bool = True, refresh: bool = True) -> bool:
            if get_closet_checkpoint_match(name) == get_closet_checkpoint_match(
                    shared.opts.data.get("sd_model_checkpoint") or ""):
                return False
            shared.opts.set("sd_model_checkpoint", name)
            if refresh:
                refresh_model_loading_parameters()
            return True

        def modules_change(values: list[str], save: bool = True, refresh: bool = True) -> bool:
            chosen = [main_entry.module_list[os.path.basename(v)] for v in values
                      if os.path.basename(v) in main_entry.module_list]
            if sorted(chosen) == sorted(shared.opts.data.get("forge_additional_modules", [])):
                return False
            shared.opts.set("forge_additional_modules", chosen)
            if refresh:
                refresh_model_loading_parameters()
            return True

        main_entry.refresh_model_loading_parameters = refresh_model_loading_parameters
        main_entry.checkpoint_change = checkpoint_change
        main_entry.modules_change = modules_change

    # ---- sysinfo.set_config (Forge's; A1111 1.10 has a plain one too but process_images there uses setattr)
    def set_config(req: dict[str, Any], is_api: bool = False, run_callbacks: bool = True,
                   save_config: bool = True) -> None:
        refresh = False
        for key, value in req.items():
            if value == shared.opts.data.get(key):
                continue
            if key == "sd_model_checkpoint":
                if value is not None and value not in sd_models.checkpoint_aliases:
                    raise RuntimeError(f"model {value!r} not found")
                refresh |= main_entry.checkpoint_change(value, save=False, refresh=False)
            elif key == "forge_additional_modules":
                refresh |= main_entry.modules_change(value, save=False, refresh=False)
            else:
                shared.opts.set(key, value, is_api=is_api, run_callbacks=run_callbacks)
        if refresh:
            main_entry.refresh_model_loading_parameters()

    sysinfo.set_config = set_config

    # ---- infotext_utils
    def quote(text: Any) -> str:
        text = str(text)
        if "," not in text and "\n" not in text and ":" not in text:
            return text
        return json.dumps(text, ensure_ascii=False)

    param_re = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

    def parse_generation_parameters(text: str) -> dict[str, str]:
        *prompt_lines, last = text.strip().split("\n")
        params = {"Prompt": "\n".join(prompt_lines)}
        for key, value in param_re.findall(last):
            params[key] = json.loads(value) if value.startswith('"') else value
        return params

    infotext_utils.quote = quote
    infotext_utils.parse_generation_parameters = parse_generation_parameters

    # ---- images
    def save_image(image: Image.Image, path: str, basename: str, seed: Any = None, prompt: Any = None,
                   extension: str = "png", info: Any = None, p: Any = None, suffix: str = "", **kwargs: Any) -> None:
        record.saved.append({"size": image.size, "seed": seed, "info": info, "suffix": suffix})

    images.save_image = save_image

    # ---- scripts
    scripts.AlwaysVisible = object()

    class Script:
        name = None
        filename = None
        args_from = None
        args_to = None
        alwayson = False
        is_txt2img = False
        is_img2img = False
        infotext_fields = None
        paste_field_names = None
        sorting_priority = 0

        def elem_id(self, item_id: str) -> str:
            return f"script_{'img2img' if self.is_img2img else 'txt2img'}_fluxq_refine_{item_id}"

        def before_process(self, p, *args):
            pass

        def process(self, p, *args):
            pass

        def postprocess(self, p, processed, *args):
            pass

    class ScriptRunner:
        def __init__(self, alwayson: list[Any], defaults: list[list[Any]]) -> None:
            self.alwayson_scripts = alwayson
            start = 1  # position 0 is the selectable-script index
            for script, script_defaults in zip(alwayson, defaults, strict=True):
                script.args_from, script.args_to, script.alwayson = start, start + len(script_defaults), True
                start = script.args_to
            self.defaults = [None] + [v for d in defaults for v in d]

        def init_script_args(self, alwayson_scripts: dict[str, dict[str, list[Any]]]) -> list[Any]:
            """api.py init_script_args: the request's args copied over the defaults, index by index."""
            args = list(self.defaults)
            for title, entry in alwayson_scripts.items():
                script = next((s for s in self.alwayson_scripts if s.title().lower() == title.lower()), None)
                if script is None:
                    raise LookupError(f"always on script {title} not found")  # 422 in the API
                given = entry.get("args", [])
                for i in range(min(script.args_to - script.args_from, len(given))):
                    args[script.args_from + i] = given[i]
            return args

        def _each(self, hook: str, p: Any, *extra: Any) -> None:
            for script in sorted(self.alwayson_scripts, key=lambda s: s.sorting_priority):
                getattr(script, hook)(p, *extra, *p.script_args[script.args_from:script.args_to])

        def before_process(self, p):
            self._each("before_process", p)

        def process(self, p):
            self._each("process", p)

        def postprocess(self, p, processed):
            self._each("postprocess", p, processed)

    scripts.Script = Script
    scripts.ScriptRunner = ScriptRunner

    # ---- processing
    processing.need_global_unload = False
    first_pass = first_pass or {}

    @dataclass(repr=False)
    class StableDiffusionProcessing:
        prompt: str = ""
        negative_prompt: str = ""
        styles: list = None
        seed: int = -1
        subseed: int = -1
        subseed_strength: float = 0
        sampler_name: str = None
        scheduler: str = None
        batch_size: int = 1
        n_iter: int = 1
        steps: int = 50
        cfg_scale: float = 7.0
        distilled_cfg_scale: float = 3.5
        width: int = 512
        height: int = 512
        do_not_save_samples: bool = False
        do_not_save_grid: bool = False
        extra_generation_params: dict = None
        denoising_strength: float = None
        override_settings: dict = None
        override_settings_restore_afterwards: bool = True
        outpath_samples: str = None
        outpath_grids: str = None
        scripts: Any = None
        script_args: list = None

        def __post_init__(self):
            self.extra_generation_params = self.extra_generation_params or {}
            self.override_settings = self.override_settings or {}
            self.styles = self.styles or []

        sampler: Any = None

        @property
        def sd_model(self) -> Any:  # processing.py: a property over shared.sd_model; setting it does nothing
            return shared.sd_model

        @sd_model.setter
        def sd_model(self, value: Any) -> None:
            pass

        def close(self):
            # processing.py close(): what the API / UI call after process_images (modules/api/api.py: closing(p))
            self.sampler = None

    @dataclass(repr=False)
    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        enable_hr: bool = False
        hr_scale: float = 2.0
        hr_upscaler: str = None
        hr_checkpoint_name: str = None
        hr_additional_modules: list = None
        hr_cfg: float = 1.0

    @dataclass(repr=False)
    class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
        init_images: list = None
        resize_mode: int = 0
        mask: Any = None
        mask_blur: int = 4
        inpainting_fill: int = 0
        inpaint_full_res: bool = True
        inpaint_full_res_padding: int = 0

    class Processed:
        def __init__(self, p, images_list, seed=-1, info="", all_prompts=None, all_negative_prompts=None,
                     all_seeds=None, infotexts=None, index_of_first_image=0):
            self.images, self.prompt, self.negative_prompt = images_list, p.prompt, p.negative_prompt
            self.seed, self.info = seed, info
            self.all_prompts, self.all_negative_prompts, self.all_seeds = all_prompts, all_negative_prompts, all_seeds
            self.infotexts, self.index_of_first_image = infotexts, index_of_first_image
            self.width, self.height = p.width, p.height

    def create_infotext(p, seed):
        model = sd_models.model_data.sd_model
        params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": seed,
                  "Size": f"{p.width}x{p.height}", "Model": model.sd_checkpoint_info.model_name if model else None,
                  "Denoising strength": p.denoising_strength, **p.extra_generation_params}
        if forge and shared.opts.forge_additional_modules:
            for i, m in enumerate(shared.opts.forge_additional_modules):
                params[f"Module {i + 1}"] = os.path.splitext(os.path.basename(m))[0]
        text = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
        return f"{p.prompt}\n{text}"

    def manage_model_and_prompt_cache(p):
        p.sd_model, just_reloaded = forge_model_reload()
        if processing.need_global_unload and not just_reloaded:
            record.unloads += 1
        processing.need_global_unload = False

    def process_images(p):
        if p.scripts is not None:
            p.scripts.before_process(p)
        opts = shared.opts
        stored = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings
                  if k in opts.data}
        try:
            if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
                p.override_settings.pop("sd_model_checkpoint", None)
            if forge:
                set_config(p.override_settings, is_api=True, run_callbacks=False, save_config=False)
                manage_model_and_prompt_cache(p)
            else:  # A1111 1.10: opts.set each override, reload weights when the checkpoint changes
                for k, v in p.override_settings.items():
                    opts.set(k, v, is_api=True, run_callbacks=False)
                _a1111_reload()
            return _inner(p)
        finally:
            if p.override_settings_restore_afterwards:
                if forge:
                    set_config(stored, save_config=False)
                else:
                    for k, v in stored.items():
                        setattr(opts, k, v)

    def _a1111_reload():
        sd_models.model_data.forge_loading_parameters = {"checkpoint_info": select_checkpoint(),
                                                         "additional_modules": []}
        forge_model_reload()

    def _masked_result(p, init: Image.Image, sampled: Image.Image) -> Image.Image:
        """Forge's img2img with a mask, "Inpaint area: Whole picture" (inpaint_full_res=False): blur the mask as
        ``init`` does, overlay = the init image where the doubled mask is below 255, alpha-composited onto the
        sampled image (``apply_overlay``). Only that path is what the refine script uses."""
        assert not p.inpaint_full_res, "the stand-in models only inpaint_full_res=False"
        mask = p.mask.convert("L")
        if p.mask_blur > 0:
            kernel = 2 * int(2.5 * p.mask_blur + 0.5) + 1
            blurred = cv2.GaussianBlur(np.array(mask), (kernel, 1), p.mask_blur)
            mask = Image.fromarray(cv2.GaussianBlur(blurred, (1, kernel), p.mask_blur))
        mask = mask.resize((p.width, p.height), Image.Resampling.LANCZOS)
        for_overlay = Image.fromarray(np.clip(np.asarray(mask, np.float32) * 2, 0, 255).astype(np.uint8))
        overlay = Image.new("RGBa", init.size)
        overlay.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(for_overlay))
        if not shared.opts.overlay_inpaint:
            return sampled
        result = sampled.convert("RGBA")
        result.alpha_composite(overlay.convert("RGBA"))
        return result.convert("RGB")

    def _inner(p):
        # no local reference to the model here: Forge's process_images_inner reaches it only through p.sd_model
        # (a property over shared.sd_model), so its frame holds nothing while postprocess runs
        job = {"kind": type(p).__name__, "checkpoint": p.sd_model.sd_checkpoint_info.name,
               "modules": [os.path.basename(m) for m in p.sd_model.additional_modules], "size": (p.width, p.height),
               "cfg": p.cfg_scale, "steps": p.steps, "sampler": p.sampler_name, "scheduler": p.scheduler,
               "denoise": p.denoising_strength, "masked": getattr(p, "mask", None) is not None, "seed": p.seed,
               "prompt": p.prompt}
        record.jobs.append(job)
        if isinstance(p, StableDiffusionProcessingImg2Img):
            p.sampler = Sampler(p.sd_model)  # StableDiffusionProcessingImg2Img.init
            init = p.init_images[0].convert("RGB").resize((p.width, p.height), Image.Resampling.LANCZOS)
            image = (sampler or (lambda img, _job: img))(init.copy(), job)
            assert image.size == init.size, "the stand-in sampler must keep the job size"
            if p.mask is not None:
                image = _masked_result(p, init, image.convert("RGB"))
            text = create_infotext(p, p.seed)
            if shared.opts.enable_pnginfo:
                image.info["parameters"] = text
            return Processed(p, [image], p.seed, text, [p.prompt], [p.negative_prompt], [p.seed], [text])
        if p.scripts is not None:
            p.scripts.process(p)
        p.sampler = Sampler(p.sd_model)  # StableDiffusionProcessingTxt2Img.sample: create_sampler(.., self.sd_model)
        if p.enable_hr:
            # processing.py: sample_hr_pass → `'Use same choices' not in self.hr_additional_modules`
            job["hr_modules"] = "Use same choices" not in p.hr_additional_modules
        seeds = [p.seed + i for i in range(p.n_iter * p.batch_size)]
        imgs = [first_pass.get(s, Image.new("RGB", (p.width, p.height), (s % 256, 90, 160))) for s in seeds]
        infotexts = [create_infotext(p, s) for s in seeds]
        if shared.opts.enable_pnginfo:
            imgs = [img.copy() for img in imgs]
            for img, text in zip(imgs, infotexts, strict=True):
                img.info["parameters"] = text
        processed = Processed(p, imgs, p.seed, infotexts[0], [p.prompt] * len(seeds),
                              [p.negative_prompt] * len(seeds), seeds, infotexts)
        if p.scripts is not None:
            p.scripts.postprocess(p, processed)
        return processed

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.StableDiffusionProcessingImg2Img = StableDiffusionProcessingImg2Img
    processing.Processed = Processed
    processing.process_images = process_images
    processing.create_infotext = create_infotext

    # ---- the user's state before a generation: the Flux checkpoint with its modules selected
    shared.opts.data["sd_model_checkpoint"] = get_closet_checkpoint_match(os.path.basename(current)).title
    if forge:
        shared.opts.data["forge_additional_modules"] = list(selected_modules)
        main_entry.refresh_model_loading_parameters()
    processing.need_global_unload = False
    return record


def uninstall() -> None:
    for name in (*MODULE_NAMES, "lib_fluxq.host.refine_host"):
        sys.modules.pop(name, None)
