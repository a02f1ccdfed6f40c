"""Refinement after a small Flux render: pixel upscale → SD1.5/SDXL img2img at low denoise → face inpaint pass.

Host-free (PIL/numpy only). This module plans the work and does the geometry: target sizes valid for the refine
model's family, tiles with feathered blending when the target is far beyond the model's native size, and
crop → inpaint → feathered paste-back for faces. The host (lib_fluxq/host/refine_host.py) does the sampling through
callbacks, so everything here is checked exactly on a CPU with a stand-in sampler.

It also owns the user settings (``RefineSettings``): parsing positional or named script args (UI, API) and writing /
reading them as infotext, so the WebUI side stays a thin adapter.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
from PIL import Image, ImageFilter

from lib_fluxq.errors import FluxqError

# ---------------------------------------------------------------------------------------------------------------
# Per-family behaviour: ONE table. Sizes are what the family was trained at; CFG is the family's pipeline default in
# diffusers (StableDiffusionPipeline 7.5, StableDiffusionXLPipeline 5.0) — never Flux's distilled 1.0, which is what
# Forge's Flux preset leaves in hires CFG and what makes an SD pass come out washed-out.


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    native_side: int  # sqrt of the training area: 512² for SD1.5, 1024² for SDXL
    cfg: float
    tile_overlap: int  # px of overlap between tiles; also the feather width
    header_family: str  # the key of this family in lib_fluxq.families' table (what the classifier answers)
    latent_channels: int = 4


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", "SD1.5", native_side=512, cfg=7.5, tile_overlap=64, header_family="sd15"),
    "sdxl": Family("sdxl", "SDXL", native_side=1024, cfg=5.0, tile_overlap=128, header_family="sdxl"),
}

SIZE_MULTIPLE = 8  # VAE downscale factor of SD1.5/SDXL: pixel sizes must be multiples of 8
NATIVE_MULTIPLE = 64  # native-area sizes snap to 64 like the sizes these models were bucketed at
TILE_AUTO_AREA_RATIO = 2.25  # auto tiling when the target has > 2.25x the native area (i.e. > 1.5x per side)


class RefineError(FluxqError):
    """A refine setting or input that cannot work, with what to change."""


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise RefineError(f"unknown refine model family {name!r}; use one of {sorted(FAMILIES)}") from None


def snap(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """Nearest multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def target_size(width: int, height: int, scale: float, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """Size of the upscaled image the refine pass works on: ``scale`` times the source, multiples of 8."""
    if width <= 0 or height <= 0:
        raise RefineError(f"source image size {width}x{height} is empty")
    if not (0.25 <= scale <= 8):
        raise RefineError(f"refine scale {scale} is out of range; use 1.0..4.0 (2.0 is typical)")
    return snap(width * scale, multiple), snap(height * scale, multiple)


def native_size(family: Family, aspect: float, multiple: int = NATIVE_MULTIPLE) -> tuple[int, int]:
    """The family's native area at ``aspect`` (= width/height), sides multiples of 64: SD1.5 ~512², SDXL ~1024²."""
    area = family.native_side ** 2
    return snap(math.sqrt(area * aspect), multiple), snap(math.sqrt(area / aspect), multiple)


def wants_tiles(width: int, height: int, family: Family, mode: str) -> bool:
    """``mode`` 'on'/'off' forces; 'auto' tiles when the target is far beyond what the model was trained at."""
    if mode == "on":
        return width > family.native_side or height > family.native_side
    if mode == "off":
        return False
    if mode != "auto":
        raise RefineError(f"tiles mode {mode!r} is not one of auto/on/off")
    return width * height > TILE_AUTO_AREA_RATIO * family.native_side ** 2


# ---------------------------------------------------------------------------------------------------------------
# Tiles


@dataclass(frozen=True)
class Box:
    """An axis-aligned pixel rectangle [x, x+w) × [y, y+h)."""

    x: int
    y: int
    w: int
    h: int

    @property
    def right(self) -> int:
        return self.x + self.w

    @property
    def bottom(self) -> int:
        return self.y + self.h

    def as_pil(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.right, self.bottom)


def _axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    step = tile - overlap
    if step <= 0:
        raise RefineError(f"tile overlap {overlap} must be smaller than the tile size {tile}")
    count = math.ceil((length - overlap) / step)
    # spread the tiles evenly so every overlap is at least ``overlap`` wide (never a sliver at the far edge)
    return [round(i * (length - tile) / (count - 1)) for i in range(count)] if count > 1 else [0]


def plan_tiles(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> list[Box]:
    """Tiles of exactly ``tile_w`` x ``tile_h`` (clamped to the image) covering it with >= ``overlap`` px overlaps."""
    tile_w, tile_h = min(tile_w, width), min(tile_h, height)
    return [Box(x, y, tile_w, tile_h)
            for y in _axis_starts(height, tile_h, overlap)
            for x in _axis_starts(width, tile_w, overlap)]


def _ramp(length: int, feather: int, fade_start: bool, fade_end: bool) -> np.ndarray:
    ramp = np.ones(length, np.float64)
    feather = min(feather, length // 2)
    if feather > 0:
        # (i + 0.5) / feather: strictly positive, so a pixel covered only by a tile's edge still has weight
        rise = (np.arange(feather) + 0.5) / feather
        if fade_start:
            ramp[:feather] = rise
        if fade_end:
            ramp[length - feather:] = rise[::-1]
    return ramp


def tile_weights(tile: Box, width: int, height: int, feather: int) -> np.ndarray:
    """Blend weight of ``tile``: a linear ramp over ``feather`` px on every side that touches another tile."""
    wx = _ramp(tile.w, feather, tile.x > 0, tile.right < width)
    wy = _ramp(tile.h, feather, tile.y > 0, tile.bottom < height)
    return wy[:, None] * wx[None, :]


def blend_tiles(width: int, height: int, tiles: Sequence[Box], outputs: Sequence[np.ndarray],
                feather: int) -> np.ndarray:
    """Feathered weighted average of tile outputs (HxWxC arrays) → float64 HxWxC image."""
    channels = outputs[0].shape[2]
    acc = np.zeros((height, width, channels), np.float64)
    weight_sum = np.zeros((height, width, 1), np.float64)
    for tile, out in zip(tiles, outputs, strict=True):
        if out.shape[:2] != (tile.h, tile.w):
            raise RefineError(f"the sampler returned {out.shape[1]}x{out.shape[0]} for a {tile.w}x{tile.h} tile")
        w = tile_weights(tile, width, height, feather)[:, :, None]
        acc[tile.y:tile.bottom, tile.x:tile.right] += out.astype(np.float64) * w
        weight_sum[tile.y:tile.bottom, tile.x:tile.right] += w
    if (weight_sum <= 0).any():
        raise RefineError("tiles do not cover the image (internal planning error)")
    return acc / weight_sum


def to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


TileSampler = Callable[[Image.Image, Box], Image.Image]


def refine_tiled(image: Image.Image, tiles: Sequence[Box], feather: int, sample: TileSampler) -> Image.Image:
    """Run ``sample`` on each tile crop and blend the results back with feathered overlaps."""
    image = image.convert("RGB")
    outputs = []
    for tile in tiles:
        result = sample(image.crop(tile.as_pil()), tile)
        outputs.append(np.asarray(result.convert("RGB")))
    blended = blend_tiles(image.width, image.height, tiles, outputs, feather)
    return Image.fromarray(to_uint8(blended))


# ---------------------------------------------------------------------------------------------------------------
# Masks and crop → inpaint → paste-back


def build_mask(size: tuple[int, int], box: Box, dilation: int, blur: int) -> Image.Image:
    """'L' mask of ``box`` grown by ``dilation`` px and feathered by a Gaussian of radius ``blur``.

    Pixels where the mask is 0 are guaranteed untouched by ``paste_back``.
    """
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    x0, y0 = max(0, box.x - dilation), max(0, box.y - dilation)
    x1, y1 = min(width, box.right + dilation), min(height, box.bottom + dilation)
    if x1 <= x0 or y1 <= y0:
        raise RefineError(f"mask box {box} lies outside the {width}x{height} image")
    mask[y0:y1, x0:x1] = 255
    image = Image.fromarray(mask)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return image


def mask_bbox(mask: Image.Image) -> Box:
    bbox = mask.getbbox()
    if bbox is None:
        raise RefineError("the face mask is empty")
    return Box(bbox[0], bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1])


def crop_region(mask: Image.Image, padding: int, aspect: float) -> Box:
    """Region around the mask plus ``padding`` px of context, widened towards ``aspect`` and clamped to the image.

    Context around the face is what lets the model keep lighting and skin tone consistent with the rest.
    """
    width, height = mask.size
    inner = mask_bbox(mask)
    x0, y0 = inner.x - padding, inner.y - padding
    x1, y1 = inner.right + padding, inner.bottom + padding
    w, h = x1 - x0, y1 - y0
    if w / h < aspect:
        grow = round(h * aspect) - w
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = round(w / aspect) - h
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    # shift back inside the image before clamping so the region keeps its size where it can
    if x0 < 0:
        x0, x1 = 0, x1 - x0
    if x1 > width:
        x0, x1 = x0 - (x1 - width), width
    if y0 < 0:
        y0, y1 = 0, y1 - y0
    if y1 > height:
        y0, y1 = y0 - (y1 - height), height
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    return Box(x0, y0, x1 - x0, y1 - y0)


def inpaint_size(region: Box, side: int) -> tuple[int, int]:
    """Size the crop is sampled at: ``side``² area at the crop's aspect, multiples of 8 (A1111 'only masked')."""
    aspect = region.w / region.h
    return snap(math.sqrt(side * side * aspect)), snap(math.sqrt(side * side / aspect))


def paste_back(image: Image.Image, result: Image.Image, mask: Image.Image, region: Box) -> Image.Image:
    """Blend ``result`` (the sampled crop, any size) into ``image`` at ``region`` through ``mask``.

    out = image + (result − image) · mask/255; where mask == 0 the source pixel is copied bit for bit.
    """
    base = np.asarray(image.convert("RGB"))
    patch = np.asarray(result.convert("RGB").resize((region.w, region.h), Image.Resampling.LANCZOS), np.float64)
    alpha = np.asarray(mask, np.float64)[region.y:region.bottom, region.x:region.right, None] / 255.0
    src = base[region.y:region.bottom, region.x:region.right].astype(np.float64)
    blended = to_uint8(src + (patch - src) * alpha)
    keep = alpha == 0
    out = base.copy()
    out[region.y:region.bottom, region.x:region.right] = np.where(keep, base[region.y:region.bottom,
                                                                            region.x:region.right], blended)
    return Image.fromarray(out)


InpaintSampler = Callable[[Image.Image, Image.Image], Image.Image]


def inpaint_box(image: Image.Image, box: Box, *, padding: int, dilation: int, blur: int, side: int,
                sample: InpaintSampler) -> Image.Image:
    """Crop around ``box``, resize to ``side``² area, ``sample(crop, crop_mask)``, and paste back feathered."""
    image = image.convert("RGB")
    mask = build_mask(image.size, box, dilation, blur)
    region = crop_region(mask, padding, aspect=max(box.w, 1) / max(box.h, 1))
    size = inpaint_size(region, side)
    crop = image.crop(region.as_pil()).resize(size, Image.Resampling.LANCZOS)
    crop_mask = mask.crop(region.as_pil()).resize(size, Image.Resampling.BILINEAR)
    result = sample(crop, crop_mask)
    return paste_back(image, result, mask, region)


# ---------------------------------------------------------------------------------------------------------------
# Settings: one table of named parameters drives UI defaults, API/infotext parsing and infotext writing.


@dataclass
class RefineSettings:
    enable: bool = False
    upscaler: str = "Lanczos"  # always available offline; ESRGAN-class upscalers are better when installed
    scale: float = 2.0
    checkpoint: str = ""
    family: str = "auto"  # auto (from the checkpoint's keys) / sd15 / sdxl
    denoise: float = 0.3
    steps: int = 20
    cfg: float = 0.0  # 0 = the family's default (7.5 SD1.5, 5.0 SDXL)
    sampler: str = "DPM++ 2M"
    scheduler: str = "Karras"
    prompt: str = ""  # empty = the first pass's prompt
    negative_prompt: str = ""
    tiles: str = "auto"
    faces: bool = True
    face_max: int = 4
    face_confidence: float = 0.5
    face_padding: int = 32
    face_dilation: int = 4
    face_blur: int = 4
    face_denoise: float = 0.4
    face_size: int = 0  # 0 = the family's native side (512 SD1.5, 1024 SDXL)
    face_model: str = ""  # path to a YOLO face .pt (ultralytics); empty = OpenCV's bundled cascade
    keep_originals: bool = False

    def validate(self) -> RefineSettings:
        if self.enable and not self.checkpoint:
            raise RefineError("fluxq refine is enabled but no refine checkpoint is chosen; pick an SD1.5 or SDXL "
                              "checkpoint in the 'fluxq refine' accordion (or pass 'checkpoint' in the API args)")
        if self.family not in ("auto", *FAMILIES):
            raise RefineError(f"refine family {self.family!r} is not one of auto/{'/'.join(FAMILIES)}")
        for name in ("denoise", "face_denoise", "face_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RefineError(f"refine setting {name}={getattr(self, name)} must be between 0 and 1")
        if self.upscaler.lower().startswith("latent"):
            raise RefineError(f"upscaler {self.upscaler!r} works in latent space and cannot cross from Flux "
                              "(16 channels) to SD (4 channels); choose a pixel upscaler such as Lanczos or ESRGAN")
        if self.tiles not in ("auto", "on", "off"):
            raise RefineError(f"tiles mode {self.tiles!r} is not one of auto/on/off")
        if self.steps < 1 or self.face_max < 0 or self.face_size < 0 or self.cfg < 0:
            raise RefineError("refine steps must be >= 1; face max, face size and CFG must be >= 0")
        target_size(64, 64, self.scale)
        return self

    def cfg_for(self, family: Family) -> float:
        return self.cfg if self.cfg > 0 else family.cfg

    def face_side_for(self, family: Family) -> int:
        return self.face_size if self.face_size > 0 else family.native_side


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RefineSettings))
INFOTEXT_PREFIX = "fluxq refine"


def infotext_key(name: str) -> str:
    """'fluxq refine' for the switch, 'fluxq refine <name with spaces>' for the others."""
    return INFOTEXT_PREFIX if name == "enable" else f"{INFOTEXT_PREFIX} {name.replace('_', ' ')}"


def _coerce(name: str, value: object) -> object:
    default = getattr(RefineSettings, name)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if value.strip().lower() in ("false", "0", "no", "off", ""):
                return False
            raise RefineError(f"refine setting {name}={value!r} is not a boolean (true/false)")
        return bool(value)
    try:
        if isinstance(default, int):
            return int(float(value))  # sliders and infotext send 20.0 / "20"
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise RefineError(f"refine setting {name}={value!r} is not a number") from None
    return "" if value is None else str(value)


def settings_from_args(args: Sequence[object] | Mapping[str, object]) -> RefineSettings:
    """Script args → settings. Accepts the UI's positional values (in ``SETTING_NAMES`` order), a dict of named
    values, or a dict as the first positional value (``alwayson_scripts: {"fluxq refine": {"args": [{...}]}}``).
    Missing trailing/named values take their defaults; an unknown name is an error, not silently ignored."""
    if isinstance(args, Sequence) and not isinstance(args, str) and len(args) >= 1 and isinstance(args[0], Mapping):
        # the API copies its args over the UI defaults: with a dict first, the values after it are those defaults
        args = args[0]
    if isinstance(args, Mapping):
        named = dict(args)
    else:
        if len(args) > len(SETTING_NAMES):
            raise RefineError(f"fluxq refine takes at most {len(SETTING_NAMES)} positional args, got {len(args)}")
        named = dict(zip(SETTING_NAMES, args, strict=False))
    unknown = sorted(set(named) - set(SETTING_NAMES))
    if unknown:
        raise RefineError(f"unknown fluxq refine arg(s) {unknown}; known: {list(SETTING_NAMES)}")
    return RefineSettings(**{k: _coerce(k, v) for k, v in named.items()})


def settings_to_infotext(settings: RefineSettings, resolved: Mapping[str, object] | None = None) -> dict[str, object]:
    """Every parameter under its infotext key (values ``resolved`` by the plan — e.g. family, CFG — win)."""
    values = {name: getattr(settings, name) for name in SETTING_NAMES}
    values.update(resolved or {})
    return {infotext_key(name): values[name] for name in SETTING_NAMES}


def settings_from_infotext(params: Mapping[str, object]) -> RefineSettings | None:
    """Parsed infotext (key → str, as ``parse_generation_parameters`` gives) → settings; None if not refined."""
    if infotext_key("enable") not in params:
        return None
    named = {name: params[infotext_key(name)] for name in SETTING_NAMES if infotext_key(name) in params}
    return settings_from_args(named)


def settings_json(settings: RefineSettings) -> str:
    return json.dumps({name: getattr(settings, name) for name in SETTING_NAMES}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# The plan


# Files whose content cannot be checked without unpickling them (no header to read): offered, and the family must then
# be set explicitly. Everything else is classified from its header by the one classifier (lib_fluxq.families' table,
# through lib_fluxq.pairing), the one the loader hook uses too.
UNCHECKABLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HEADER_TO_FAMILY = {family.header_family: family.name for family in FAMILIES.values()}


def checkpoint_family(path: str | os.PathLike[str]) -> str | None:
    """The refine family (``sd15`` / ``sdxl``) of a checkpoint from its header (milliseconds even for a 12 GB
    file), None when the file has no readable header (.ckpt …). Anything else (Flux, SD3, a text encoder, a damaged
    file) is a RefineError saying what the file is."""
    from lib_fluxq import families
    from lib_fluxq.pairing import describe_file

    path = os.fspath(path)
    if path.lower().endswith(UNCHECKABLE_SUFFIXES):
        return None
    try:
        found = describe_file(path).family
    except (FluxqError, OSError) as exc:
        raise RefineError(f"{path}: cannot read its header ({exc}); pick an SD1.5 or SDXL checkpoint") from None
    if found in _HEADER_TO_FAMILY:
        return _HEADER_TO_FAMILY[found]
    if found is None:
        raise RefineError(f"{path}: is not a diffusion model; the refine pass needs an SD1.5 or SDXL checkpoint")
    family = families.family(found)
    why = f" ({family.latent_channels}-channel latents, SD has 4)" if (family.latent_channels or 4) != 4 else ""
    raise RefineError(f"{path}: is a {family.title} model; the refine pass needs an SD1.5 or SDXL checkpoint{why}")


@dataclass(frozen=True)
class FacePlan:
    enabled: bool
    max_faces: int
    confidence: float
    padding: int
    dilation: int
    blur: int
    denoise: float
    side: int


@dataclass(frozen=True)
class RefinePlan:
    """What the host runs for one image: upscale to ``size``, img2img (whole or by ``tiles``), then faces."""

    source_size: tuple[int, int]
    size: tuple[int, int]
    family: Family
    tiles: tuple[Box, ...]  # empty = one img2img pass at ``size``
    feather: int
    denoise: float
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    faces: FacePlan
    settings: RefineSettings = field(repr=False)

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 0

    @property
    def passes(self) -> int:
        """img2img jobs over the whole image: 0 at denoise 0 (upscale and faces only), else the tiles or one."""
        return 0 if self.denoise <= 0 else len(self.tiles) or 1

    def resolved(self) -> dict[str, object]:
        """Values the plan decided for 'auto' settings, for the infotext."""
        return {"family": self.family.name, "cfg": self.cfg, "face_size": self.faces.side}


def make_plan(settings: RefineSettings, source_size: tuple[int, int], family_name: str) -> RefinePlan:
    settings.validate()
    family = get_family(family_name)
    width, height = target_size(*source_size, settings.scale)
    tiles: tuple[Box, ...] = ()
    if settings.denoise > 0 and wants_tiles(width, height, family, settings.tiles):
        side = family.native_side
        tiles = tuple(plan_tiles(width, height, side, side, family.tile_overlap))
    faces = FacePlan(settings.faces and settings.face_max > 0, settings.face_max, settings.face_confidence,
                     settings.face_padding, settings.face_dilation, settings.face_blur, settings.face_denoise,
                     settings.face_side_for(family))
    return RefinePlan(source_size=tuple(source_size), size=(width, height), family=family, tiles=tiles,
                      feather=family.tile_overlap, denoise=settings.denoise, steps=settings.steps,
                      cfg=settings.cfg_for(family), sampler=settings.sampler, scheduler=settings.scheduler,
                      faces=faces, settings=replace(settings, family=family.name))


Detector = Callable[[Image.Image], Sequence[tuple[Box, float]]]
ImageSampler = Callable[[Image.Image, Image.Image | None, float, tuple[int, int]], Image.Image]


def run_plan(image: Image.Image, plan: RefinePlan, *, upscale: Callable[[Image.Image, tuple[int, int]], Image.Image],
             sample: ImageSampler, detect: Detector | None = None) -> tuple[Image.Image, list[tuple[Box, float]]]:
    """Upscale → img2img (tiled or whole) → face inpaint. ``sample(image, mask_or_None, denoise, size)`` is the host's
    img2img; ``detect(image)`` returns (box, confidence) pairs. Returns the refined image and the faces done."""
    upscaled = upscale(image.convert("RGB"), plan.size)
    if upscaled.size != plan.size:
        upscaled = upscaled.resize(plan.size, Image.Resampling.LANCZOS)
    if plan.passes == 0:
        # denoise 0 changes nothing but would still round-trip the image through the VAE: skip the job
        refined = upscaled
    elif plan.tiled:
        refined = refine_tiled(upscaled, plan.tiles, plan.feather,
                               lambda crop, tile: sample(crop, None, plan.denoise, (tile.w, tile.h)))
    else:
        refined = sample(upscaled, None, plan.denoise, plan.size)
    done: list[tuple[Box, float]] = []
    if plan.faces.enabled and detect is not None:
        found = [(box, conf) for box, conf in detect(refined) if conf >= plan.faces.confidence]
        found.sort(key=lambda item: item[0].w * item[0].h, reverse=True)  # biggest faces matter most
        for box, conf in found[:plan.faces.max_faces]:
            refined = inpaint_box(refined, box, padding=plan.faces.padding, dilation=plan.faces.dilation,
                                  blur=plan.faces.blur, side=plan.faces.side,
                                  sample=lambda crop, mask: sample(crop, mask, plan.faces.denoise, crop.size))
            done.append((box, conf))
    return refined, done
