"""WebUI side of the refine pass: the AlwaysVisible script "fluxq refine" (txt2img and img2img, Forge and A1111).

After ALL batches (``postprocess``) each result is upscaled with a pixel upscaler, re-sampled by an SD1.5/SDXL
checkpoint at low denoise (tiled when far beyond the model's native size) and its faces inpainted — the geometry is
lib_fluxq.refine's; this module only builds ``StableDiffusionProcessingImg2Img`` jobs and runs them.

Why it is shaped this way (FORGE_NOTES §7, Forge dfdcbab6):
- Switching checkpoints through ``override_settings`` restores the options after every ``process_images`` call, so
  the next call switches again (and Forge unloads the model each time). The script sets
  ``override_settings_restore_afterwards=False`` and restores the options ONCE, after the last refine job: one switch
  to the SD model per generation, and Flux comes back at the next generation.
- On Forge ``forge_additional_modules`` is overridden to ``[]``: a Flux VAE/T5/CLIP-L left selected would be merged
  into the SD model (16-channel VAE → size mismatch, Forge #2255). A1111 has no such option (setting it would fail).
- Latent upscalers are never offered: Flux latents have 16 channels, SD's 4 (Forge #2107).
- Any txt2img call with hires fix and no ``hr_additional_modules`` (every API call that omits it) crashes Forge with
  "argument of type 'NoneType' is not iterable"; ``before_process`` turns None into a list.

This is the only refine module that imports ``modules`` (and ``gradio``, inside ``ui()`` only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from modules import images, processing, scripts, sd_models, shared
from PIL import Image

from lib_fluxq import refine as R

try:  # Forge adds modules_forge; A1111 does not
    import modules_forge  # noqa: F401

    IS_FORGE = True
except ImportError:
    IS_FORGE = False

TITLE = R.INFOTEXT_PREFIX
LOG_PREFIX = "[fluxq refine]"
PIXEL_RESIZERS = ("None", "Lanczos", "")  # plain PIL resize, no model


def _log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}")


# ------------------------------------------------------------------------------------------------ host look-ups


def pixel_upscaler_names() -> list[str]:
    """The host's upscalers that work on pixels (Latent* modes are not in sd_upscalers, but guard anyway)."""
    names = [u.name for u in getattr(shared, "sd_upscalers", []) if not u.name.lower().startswith("latent")]
    return names or ["Lanczos"]


_FAMILY_CACHE: dict[tuple[str, int, int], str | None | R.RefineError] = {}


def checkpoint_family(filename: str) -> str | None:
    """``R.checkpoint_family`` cached by (path, size, mtime): the dropdown is rebuilt with every UI (re)load and the
    header of a 12 GB GGUF need not be read again. Raises the file's RefineError (Flux, SD3, damaged …) each time."""
    stat = os.stat(filename)
    key = (filename, stat.st_size, stat.st_mtime_ns)
    if key not in _FAMILY_CACHE:
        try:
            _FAMILY_CACHE[key] = R.checkpoint_family(filename)
        except R.RefineError as exc:
            _FAMILY_CACHE[key] = exc
    found = _FAMILY_CACHE[key]
    if isinstance(found, R.RefineError):
        raise found
    return found


def refinable(info: Any) -> bool:
    """Offer a checkpoint for refining: its header says SD1.5 / SDXL, or it has no header to read (.ckpt)."""
    try:
        checkpoint_family(info.filename)
    except (R.RefineError, OSError):
        return False
    return True


def checkpoint_titles() -> list[str]:
    """The refine dropdown: SD1.5 / SDXL checkpoints only (never the Flux GGUFs next to them)."""
    return sorted(info.title for info in sd_models.checkpoints_list.values() if refinable(info))


def resolve_checkpoint(name: str) -> Any:
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    if info is None:
        raise R.RefineError(f"refine checkpoint {name!r} not found in models/Stable-diffusion; pick one of "
                            f"{checkpoint_titles()[:8]} (SD1.5 or SDXL)")
    return info


def resolve_family(settings: R.RefineSettings, info: Any) -> str:
    """The settings' family, or (auto) the one the checkpoint's header says; Flux / SD3 / … are refused."""
    filename = getattr(info, "filename", "") or ""
    detected = checkpoint_family(filename) if os.path.isfile(filename) else None
    if detected is None:
        if settings.family == "auto":
            raise R.RefineError(f"{filename or info}: cannot read its header to tell SD1.5 from SDXL; set the "
                                "refine family (sd15/sdxl) explicitly")
        return settings.family
    if settings.family not in ("auto", detected):
        _log(f"{filename} looks like {detected}, but the refine family is set to {settings.family}; using the "
             "setting")
        return settings.family
    return detected


def upscale_image(image: Image.Image, size: tuple[int, int], upscaler_name: str) -> Image.Image:
    if upscaler_name in PIXEL_RESIZERS:
        return image.resize(size, Image.Resampling.LANCZOS)
    upscaler = next((u for u in getattr(shared, "sd_upscalers", []) if u.name == upscaler_name), None)
    if upscaler is None:
        raise R.RefineError(f"upscaler {upscaler_name!r} not found; available: {pixel_upscaler_names()}")
    scale = max(size[0] / image.width, size[1] / image.height)
    result = upscaler.scaler.upscale(image, scale, upscaler.data_path)
    return result if result.size == size else result.resize(size, Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------ model switch


def restore_options(stored: Mapping[str, Any]) -> None:
    """Put options back the way ``process_images`` itself does on this host."""
    if IS_FORGE:
        from modules.sysinfo import set_config

        set_config(dict(stored), save_config=False)
    else:
        for key, value in stored.items():
            setattr(shared.opts, key, value)


@contextmanager
def refine_model_session(checkpoint_info: Any) -> Iterator[dict[str, Any]]:
    """Overrides that select the SD checkpoint (and, on Forge, no additional modules) for every refine job; the
    user's options come back once, at the end, so the jobs in between do not switch models back and forth."""
    overrides: dict[str, Any] = {"sd_model_checkpoint": checkpoint_info.title}
    if IS_FORGE:
        overrides["forge_additional_modules"] = []
    opts = shared.opts
    stored = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in overrides}
    try:
        yield overrides
    finally:
        restore_options(stored)


def release_first_pass_model(p: Any) -> None:
    """Drop the finished first-pass job's hold on its model before the refine loads the SD one.

    The refine runs in ``postprocess``, before ``process_images`` has returned: the job still keeps its sampler, and
    the sampler's model wrapper references the engine it sampled with (Forge / A1111 KDiffusionSampler:
    ``model_wrap.inner_model = shared.sd_model``) until the caller's ``p.close()``. While that holds, Forge's reload
    drops its own reference, collects, and frees nothing: SD loaded next to Flux (issue 16: +2.5 GB at the SD pass,
    18 GB resident at rest). Nothing after ``postprocess`` samples with it; ``close()`` would drop it anyway."""
    if getattr(p, "sampler", None) is not None:
        p.sampler = None


def img2img(p: Any, image: Image.Image, mask: Image.Image | None, *, denoise: float, size: tuple[int, int],
            plan: R.RefinePlan, prompt: str, negative_prompt: str, seed: int,
            overrides: Mapping[str, Any]) -> Image.Image:
    """One img2img (or masked inpaint) job on the refine checkpoint; returns the first image."""
    kwargs: dict[str, Any] = {}
    if mask is not None:
        # the crop/feather/paste is done by lib_fluxq.refine; the host only inpaints inside the given mask
        kwargs.update(mask=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    job = processing.StableDiffusionProcessingImg2Img(
        init_images=[image], resize_mode=0, denoising_strength=denoise, width=size[0], height=size[1],
        prompt=prompt, negative_prompt=negative_prompt, seed=seed, subseed=-1, subseed_strength=0,
        sampler_name=plan.sampler, scheduler=plan.scheduler, steps=plan.steps, cfg_scale=plan.cfg,
        batch_size=1, n_iter=1, styles=[], override_settings=dict(overrides),
        override_settings_restore_afterwards=False, do_not_save_samples=True, do_not_save_grid=True,
        outpath_samples=getattr(p, "outpath_samples", None), outpath_grids=getattr(p, "outpath_grids", None),
        **kwargs)
    try:
        result = processing.process_images(job)
    finally:
        close = getattr(job, "close", None)
        if callable(close):
            close()
    if not result.images:
        raise R.RefineError("the refine img2img job returned no image (interrupted?)")
    image = result.images[0]
    if image.size != tuple(size):
        # some hosts round the job's size (the Neo 2.26 copy in exo101/sd-webui-forge-neo-v3 to multiples of 64:
        # 96x96 came back 128x128); the tiles, face crop and paste are laid out for the planned size
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return image


# ------------------------------------------------------------------------------------------------ the script


class FluxqRefineScript(scripts.Script):
    sorting_priority = 90  # after other always-on scripts: refine the final first-pass images

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        components, infotext_fields = build_refine_ui(self.elem_id, is_img2img)
        self.infotext_fields = infotext_fields
        self.paste_field_names = [key for _, key in infotext_fields if isinstance(key, str)]
        return components

    # -- hooks

    def before_process(self, p: Any, *args: Any) -> None:
        # protects every txt2img job (refine on or off): hires fix + hr_additional_modules=None is a Forge TypeError
        if getattr(p, "enable_hr", False) and hasattr(p, "hr_additional_modules") and p.hr_additional_modules is None:
            own_checkpoint = getattr(p, "hr_checkpoint_name", None) in (None, "", "Use same checkpoint")
            p.hr_additional_modules = ["Use same choices"] if own_checkpoint else []

    def process(self, p: Any, *args: Any) -> None:
        settings = R.settings_from_args(args)
        if not settings.enable:
            return
        settings.validate()
        info = resolve_checkpoint(settings.checkpoint)  # fail before the first pass, not after it
        family = resolve_family(settings, info)
        plan = R.make_plan(settings, (p.width, p.height), family)
        p.extra_generation_params.update(R.settings_to_infotext(settings, plan.resolved()))

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        settings = R.settings_from_args(args)
        if not settings.enable:
            return
        refine_processed(p, processed, settings)


def infotext_fields_for(components: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """(component, infotext key or callable) pairs: every setting pastes back; 'enable' turns OFF when a pasted
    infotext has no fluxq refine in it (a plain key would leave the checkbox as it was)."""
    fields: list[tuple[Any, Any]] = []
    for name, component in components.items():
        key = R.infotext_key(name)
        if name == "enable":
            fields.append((component, lambda params, _key=key: _key in params and str(params[_key]) == "True"))
        else:
            fields.append((component, key))
    return fields


def build_refine_ui(elem_id: Any, is_img2img: bool) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """The accordion; components are returned in ``R.SETTING_NAMES`` order (the positional script args)."""
    import gradio as gr

    d = R.RefineSettings()
    upscalers = pixel_upscaler_names()
    made: dict[str, Any] = {}
    with gr.Accordion(TITLE, open=False, elem_id=elem_id("accordion")):
        with gr.Row():
            made["enable"] = gr.Checkbox(label="Refine with SD1.5/SDXL after all batches", value=d.enable)
            made["keep_originals"] = gr.Checkbox(label="Keep the unrefined images too", value=d.keep_originals)
        with gr.Row():
            made["checkpoint"] = gr.Dropdown(label="Refine checkpoint (SD1.5 / SDXL)", choices=checkpoint_titles(),
                                             value=d.checkpoint or None)
            made["family"] = gr.Dropdown(label="Family", choices=["auto", *R.FAMILIES], value=d.family)
            made["upscaler"] = gr.Dropdown(label="Pixel upscaler", choices=upscalers,
                                           value=d.upscaler if d.upscaler in upscalers else upscalers[0])
            made["scale"] = gr.Slider(label="Scale", minimum=1.0, maximum=4.0, step=0.05, value=d.scale)
        with gr.Row():
            made["denoise"] = gr.Slider(label="Denoise", minimum=0.0, maximum=1.0, step=0.01, value=d.denoise)
            made["steps"] = gr.Slider(label="Steps", minimum=1, maximum=150, step=1, value=d.steps)
            made["cfg"] = gr.Slider(label="CFG (0 = family default: SD1.5 7.5, SDXL 5)", minimum=0.0, maximum=30.0,
                                    step=0.5, value=d.cfg)
            made["tiles"] = gr.Radio(label="Tiles", choices=["auto", "on", "off"], value=d.tiles)
        with gr.Row():
            made["sampler"] = gr.Textbox(label="Sampler", value=d.sampler)
            made["scheduler"] = gr.Textbox(label="Schedule type", value=d.scheduler)
        made["prompt"] = gr.Textbox(label="Prompt override (empty = first-pass prompt)", value=d.prompt, lines=1)
        made["negative_prompt"] = gr.Textbox(label="Negative prompt override", value=d.negative_prompt, lines=1)
        with gr.Row():
            made["faces"] = gr.Checkbox(label="Face pass", value=d.faces)
            made["face_max"] = gr.Slider(label="Max faces", minimum=0, maximum=16, step=1, value=d.face_max)
            made["face_confidence"] = gr.Slider(label="Face confidence", minimum=0.0, maximum=1.0, step=0.05,
                                                value=d.face_confidence)
            made["face_denoise"] = gr.Slider(label="Face denoise", minimum=0.0, maximum=1.0, step=0.01,
                                             value=d.face_denoise)
        with gr.Row():
            made["face_padding"] = gr.Slider(label="Face padding", minimum=0, maximum=256, step=4,
                                             value=d.face_padding)
            made["face_dilation"] = gr.Slider(label="Mask dilation", minimum=0, maximum=64, step=1,
                                              value=d.face_dilation)
            made["face_blur"] = gr.Slider(label="Mask blur", minimum=0, maximum=64, step=1, value=d.face_blur)
            made["face_size"] = gr.Slider(label="Face inpaint size (0 = family native)", minimum=0, maximum=2048,
                                          step=64, value=d.face_size)
        made["face_model"] = gr.Textbox(label="YOLO face model file (optional; empty = OpenCV's bundled cascade)",
                                        value=d.face_model)
    components = [made[name] for name in R.SETTING_NAMES]
    return components, infotext_fields_for(made)


def _first_pass_indices(processed: Any) -> range:
    start = getattr(processed, "index_of_first_image", 0)
    count = len(getattr(processed, "all_seeds", None) or processed.images[start:])
    return range(start, min(len(processed.images), start + count))


def refine_processed(p: Any, processed: Any, settings: R.RefineSettings) -> None:
    """Refine every first-pass image of ``processed`` in place, switching to the SD checkpoint once."""
    settings.validate()
    info = resolve_checkpoint(settings.checkpoint)
    family = resolve_family(settings, info)
    detect = None
    if settings.faces and settings.face_max > 0:
        from lib_fluxq.faces import make_detector

        detector = make_detector(settings.face_model)
        detect = lambda img: [(f.box, f.confidence) for f in detector(img)]  # noqa: E731
    indices = _first_pass_indices(processed)
    originals: list[tuple[Image.Image, str]] = []
    state = getattr(shared, "state", None)
    release_first_pass_model(p)
    with refine_model_session(info) as overrides:
        for n, index in enumerate(indices):
            if state is not None and getattr(state, "interrupted", False):
                _log("interrupted: the remaining images stay unrefined")
                break
            image = processed.images[index]
            prompt = settings.prompt or _pick(processed.all_prompts, n, processed.prompt)
            negative = settings.negative_prompt or _pick(getattr(processed, "all_negative_prompts", None), n,
                                                         processed.negative_prompt)
            seed = int(_pick(processed.all_seeds, n, processed.seed))
            plan = R.make_plan(settings, image.size, family)

            def sample(img, mask, denoise, size, _plan=plan, _prompt=prompt, _negative=negative, _seed=seed):
                return img2img(p, img, mask, denoise=denoise, size=size, plan=_plan, prompt=_prompt,
                               negative_prompt=_negative, seed=_seed, overrides=overrides)

            refined, faces = R.run_plan(image, plan, sample=sample, detect=detect,
                                        upscale=lambda img, size: upscale_image(img, size, settings.upscaler))
            infotext = _pick(getattr(processed, "infotexts", None), index, processed.info)
            _log(f"image {n + 1}/{len(indices)}: {image.width}x{image.height} → {plan.size[0]}x{plan.size[1]} "
                 f"({plan.family.label}, {plan.passes} pass(es), {len(faces)} face(s)"
                 + "".join(f"; face at {box.x},{box.y} {box.w}x{box.h}" for box, _ in faces) + ")")
            originals.append((image, infotext))
            # the returned / saved PNG must describe the whole generation (the first pass's parameters with the
            # fluxq refine keys), not the SD img2img job that produced its pixels
            refined.info = dict(image.info)
            if infotext and getattr(shared.opts, "enable_pnginfo", True):
                refined.info["parameters"] = infotext
            processed.images[index] = refined
            _save(p, refined, seed, prompt, infotext)
    if settings.keep_originals:
        for image, infotext in originals:
            processed.images.append(image)
            if isinstance(getattr(processed, "infotexts", None), list):
                processed.infotexts.append(infotext)


def _pick(values: Sequence[Any] | None, index: int, fallback: Any) -> Any:
    return values[index] if values and index < len(values) else fallback


def _save(p: Any, image: Image.Image, seed: int, prompt: str, infotext: str) -> None:
    if getattr(p, "do_not_save_samples", False) or not getattr(shared.opts, "samples_save", True):
        return
    images.save_image(image, p.outpath_samples, "", seed, prompt, shared.opts.samples_format, info=infotext, p=p,
                      suffix="-fluxq-refine")
