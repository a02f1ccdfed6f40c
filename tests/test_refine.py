"""Host-free refine geometry, checked exactly with deterministic stand-in samplers (no model involved).

The stand-ins are simple, known transforms (identity, a per-tile brightness offset, a constant fill), so what the
blend/paste code must produce is derived from first principles in each test, not from our own code.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_fluxq import refine as R


def smooth_image(width: int, height: int) -> Image.Image:
    """A smooth gradient image: its own max neighbour difference is small and known."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([40 + 150 * x / width, 40 + 150 * y / height, 100 + 50 * np.sin(x / 97.0)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))


def max_step(array: np.ndarray, axis: int) -> float:
    return float(np.abs(np.diff(array.astype(np.float64), axis=axis)).max())


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("family", list(R.FAMILIES))
@pytest.mark.parametrize("aspect", [1.0, 2 / 3, 3 / 2, 16 / 9, 9 / 21])
def test_native_sizes_are_valid_for_each_family(family, aspect):
    fam = R.FAMILIES[family]
    w, h = R.native_size(fam, aspect)
    assert w % 64 == 0 and h % 64 == 0
    area_ratio = w * h / fam.native_side ** 2
    assert 0.85 <= area_ratio <= 1.15, (w, h)
    assert abs(w / h - aspect) / aspect < 0.15


@pytest.mark.parametrize("src", [(512, 768), (512, 512), (768, 512), (600, 850), (333, 517)])
@pytest.mark.parametrize("scale", [1.0, 1.5, 2.0, 2.5])
def test_target_size_multiple_of_8_and_close_to_scale(src, scale):
    w, h = R.target_size(*src, scale)
    assert w % 8 == 0 and h % 8 == 0
    assert abs(w - src[0] * scale) <= 4 and abs(h - src[1] * scale) <= 4


def test_bad_sizes_and_scales_are_clear_errors():
    with pytest.raises(R.RefineError, match="empty"):
        R.target_size(0, 512, 2.0)
    with pytest.raises(R.RefineError, match="scale"):
        R.target_size(512, 512, 20)


def test_auto_tiling_follows_the_family_native_area():
    sd15, sdxl = R.FAMILIES["sd15"], R.FAMILIES["sdxl"]
    assert R.wants_tiles(1024, 1536, sd15, "auto")  # 6x SD1.5's area
    assert not R.wants_tiles(1024, 1536, sdxl, "auto")  # 1.5x SDXL's area: one pass
    assert not R.wants_tiles(1024, 1536, sd15, "off")
    assert R.wants_tiles(1024, 1536, sdxl, "on")


# ---------------------------------------------------------------- tiles


@pytest.mark.parametrize("size", [(1024, 1536), (1000, 760), (512, 512), (2048, 1024), (1040, 1560)])
@pytest.mark.parametrize("family", list(R.FAMILIES))
def test_tiles_cover_every_pixel_with_full_overlap(size, family):
    fam = R.FAMILIES[family]
    width, height = size
    tiles = R.plan_tiles(width, height, fam.native_side, fam.native_side, fam.tile_overlap)
    cover = np.zeros((height, width), np.int32)
    for t in tiles:
        assert t.x >= 0 and t.y >= 0 and t.right <= width and t.bottom <= height
        assert (t.w, t.h) == (min(fam.native_side, width), min(fam.native_side, height))
        assert t.w % 8 == 0 and t.h % 8 == 0  # each tile is a valid sampling size for SD
        cover[t.y:t.bottom, t.x:t.right] += 1
    assert cover.min() >= 1
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    tw, th = tiles[0].w, tiles[0].h
    # neighbours overlap by at least the feather width, so the ramps never meet a hard edge
    assert all(b - a <= tw - fam.tile_overlap for a, b in zip(xs, xs[1:], strict=False))
    assert all(b - a <= th - fam.tile_overlap for a, b in zip(ys, ys[1:], strict=False))


def test_identity_sampler_reproduces_the_image_exactly():
    image = smooth_image(1000, 760)
    tiles = R.plan_tiles(1000, 760, 512, 512, 64)
    assert len(tiles) > 1
    out = R.refine_tiled(image, tiles, 64, lambda crop, tile: crop)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_seams_are_feathered_gradient_bounded():
    """Each tile comes back shifted by its own brightness offset (the worst case of tile-to-tile drift).

    A hard paste would step by the full offset difference D at a seam. The feathered blend mixes the two offsets
    linearly over the overlap, so across any seam the step is at most D/feather (+ the image's own slope, + 1 for
    rounding) — computed here from the offsets, and the hard-paste step is shown to be far larger.
    """
    width, height, side, feather = 1024, 1536, 512, 64
    image = smooth_image(width, height)
    tiles = R.plan_tiles(width, height, side, side, feather)
    offsets = {t: (37.0 * i) % 80 - 40 for i, t in enumerate(tiles)}  # -40..+39, neighbours differ a lot

    def shifted(crop, tile):
        a = np.asarray(crop, np.float64) + offsets[tile]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))

    # keep the shifted image inside 0..255 so clipping does not hide a step
    base = np.asarray(image, np.float64)
    assert base.min() - 40 >= 0 and base.max() + 40 <= 255
    out = np.asarray(R.refine_tiled(image, tiles, feather, shifted), np.float64)
    largest_offset_gap = max(abs(offsets[a] - offsets[b]) for a in tiles for b in tiles)
    bound_x = max_step(base, 1) + largest_offset_gap / feather + 1
    bound_y = max_step(base, 0) + largest_offset_gap / feather + 1
    step_x, step_y = max_step(out, 1), max_step(out, 0)
    print(f"\nseams: max step x {step_x:.2f} (bound {bound_x:.2f}), y {step_y:.2f} (bound {bound_y:.2f}); "
          f"hard paste would step up to {largest_offset_gap:.0f}")
    assert step_x <= bound_x and step_y <= bound_y

    # the same tiles pasted hard (last tile wins) do show the full step: the test would catch a missing feather
    hard = base.copy()
    for t in tiles:
        hard[t.y:t.bottom, t.x:t.right] = base[t.y:t.bottom, t.x:t.right] + offsets[t]
    assert max(max_step(hard, 1), max_step(hard, 0)) > 4 * max(bound_x, bound_y)

    # far from every seam a tile's pixels are exactly that tile's output
    first = tiles[0]
    interior = out[:16, :16]
    assert np.array_equal(interior, np.clip(base[:16, :16] + offsets[first], 0, 255))


def test_sampler_returning_wrong_size_is_a_clear_error():
    image = smooth_image(1024, 1024)
    tiles = R.plan_tiles(1024, 1024, 512, 512, 64)
    with pytest.raises(R.RefineError, match="sampler returned"):
        R.refine_tiled(image, tiles, 64, lambda crop, tile: crop.resize((500, 500)))


# ---------------------------------------------------------------- faces: crop → inpaint → paste


@pytest.mark.parametrize("box,padding,dilation,blur", [
    (R.Box(300, 200, 120, 140), 32, 4, 4),
    (R.Box(0, 0, 90, 100), 48, 8, 6),  # at the corner: the crop is clamped
    (R.Box(900, 650, 100, 100), 16, 0, 0),  # no feather at all
    (R.Box(450, 300, 60, 60), 64, 4, 12),
])
@pytest.mark.parametrize("side", [512, 1024])
def test_face_paste_leaves_pixels_outside_the_mask_untouched(box, padding, dilation, blur, side):
    image = smooth_image(1024, 768)
    calls = []

    def fill(crop, mask):
        calls.append((crop.size, mask.size))
        return Image.new("RGB", crop.size, (255, 0, 255))

    out = R.inpaint_box(image, box, padding=padding, dilation=dilation, blur=blur, side=side, sample=fill)
    (crop_size, mask_size), = calls
    assert crop_size == mask_size and crop_size[0] % 8 == 0 and crop_size[1] % 8 == 0
    assert 0.8 < crop_size[0] * crop_size[1] / side ** 2 < 1.2  # sampled at the family's native area

    mask = np.asarray(R.build_mask(image.size, box, dilation, blur))
    src, res = np.asarray(image), np.asarray(out)
    outside = mask == 0
    assert np.array_equal(res[outside], src[outside])  # bit for bit
    # inside the un-feathered core the sampler's output fully replaces the image
    core = mask == 255
    assert core.any()
    assert np.array_equal(res[core], np.broadcast_to(np.array([255, 0, 255], np.uint8), res[core].shape))
    # the feather is a proper mix: never outside [source, result] per channel
    edge = (mask > 0) & (mask < 255)
    if blur:
        assert edge.any()
        lo = np.minimum(src, [255, 0, 255])[edge]
        hi = np.maximum(src, [255, 0, 255])[edge]
        assert ((res[edge] >= lo) & (res[edge] <= hi)).all()
    # the face box itself is inside the mask core when there is no blur, and inside the mask support always
    assert (mask[box.y:box.bottom, box.x:box.right] > 0).all()


def _shifted_difference(src: np.ndarray, box: R.Box) -> float:
    """How much this texture changes under a one-pixel shift inside ``box`` (smallest of the four directions): what
    a paste off by even one pixel would add to the error."""
    inner = src[box.y:box.bottom, box.x:box.right]
    shifts = [src[box.y + dy:box.bottom + dy, box.x + dx:box.right + dx] for dx, dy in ((1, 0), (-1, 0), (0, 1),
                                                                                        (0, -1))]
    return min(float(np.abs(inner - s).mean()) for s in shifts)


@pytest.mark.parametrize("box,side", [
    (R.Box(170, 40, 110, 130), 512),   # hand-placed around the astronaut's face (scikit-image's photo)
    (R.Box(170, 40, 110, 130), 256),   # crop sampled below its own size
    (R.Box(300, 300, 64, 64), 512),    # the suit's texture, a small box
])
def test_face_paste_keeps_position_and_orientation_on_a_textured_image(box, side):
    """A sampler that returns the crop unchanged must give back the photo itself inside the mask (only the crop's
    resize there and back differs): a patch pasted mirrored, flipped or shifted by a pixel would differ by the
    texture's own one-pixel difference or more. OpenCV's template matching (not our code) must find the pasted patch
    exactly where it came from, and pixels outside the box grown by dilation + 3 x blur (the Gaussian's reach) are
    the photo's, bit for bit."""
    import cv2  # OpenCV (requirements-test.txt) locates the patch: an independent reference
    from skimage import data as skdata

    image = Image.fromarray(skdata.astronaut())
    src = np.asarray(image, np.float64)
    dilation, blur, margin = 4, 4, 8
    out = R.inpaint_box(image, box, padding=32, dilation=dilation, blur=blur, side=side, sample=lambda crop, mask: crop)
    res = np.asarray(out, np.float64)

    inner = R.Box(box.x + margin, box.y + margin, box.w - 2 * margin, box.h - 2 * margin)  # surely fully masked
    error = float(np.abs(res - src)[inner.y:inner.bottom, inner.x:inner.right].mean())
    one_pixel = _shifted_difference(src, inner)
    print(f"\n{box} side {side}: mean |pasted - photo| {error:.2f}; a one-pixel shift of this texture {one_pixel:.2f}")
    assert error < one_pixel / 3

    patch = np.asarray(out)[inner.y:inner.bottom, inner.x:inner.right]
    search = 6
    window = np.asarray(image)[inner.y - search:inner.bottom + search, inner.x - search:inner.right + search]
    scores = cv2.matchTemplate(window, patch, cv2.TM_SQDIFF_NORMED)
    assert cv2.minMaxLoc(scores)[2] == (search, search)  # found at offset 0, not a pixel off
    mirrored = cv2.matchTemplate(window, np.ascontiguousarray(patch[:, ::-1]), cv2.TM_SQDIFF_NORMED).min()
    assert scores.min() < mirrored / 10

    reach = dilation + 3 * blur
    outside = np.ones(src.shape[:2], bool)
    outside[max(0, box.y - reach):box.bottom + reach, max(0, box.x - reach):box.right + reach] = False
    assert np.array_equal(res[outside], src[outside])


def test_mask_grows_by_dilation_and_feathers_by_blur():
    size = (400, 300)
    box = R.Box(100, 80, 50, 60)
    hard = np.asarray(R.build_mask(size, box, dilation=10, blur=0))
    ys, xs = np.nonzero(hard)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (90, 70, 160, 150)
    soft = np.asarray(R.build_mask(size, box, dilation=10, blur=5))
    assert (soft > 0).sum() > (hard > 0).sum()
    assert set(np.unique(hard)) == {0, 255}
    assert len(np.unique(soft)) > 10


def test_crop_region_keeps_aspect_and_stays_inside():
    mask = R.build_mask((640, 480), R.Box(600, 420, 40, 60), 4, 4)
    region = R.crop_region(mask, padding=32, aspect=40 / 60)
    assert region.x >= 0 and region.y >= 0 and region.right <= 640 and region.bottom <= 480
    inner = R.mask_bbox(mask)
    assert region.x <= inner.x and region.y <= inner.y and region.right >= inner.right
    assert region.bottom >= inner.bottom


# ---------------------------------------------------------------- settings, plan, infotext


def test_settings_from_positional_named_and_api_dict_agree():
    named = {"enable": True, "checkpoint": "sd15.safetensors", "denoise": 0.25, "steps": "24", "tiles": "on"}
    from_named = R.settings_from_args(named)
    from_api = R.settings_from_args([named])
    positional = [getattr(from_named, n) for n in R.SETTING_NAMES]
    from_positional = R.settings_from_args(positional)
    assert from_named == from_api == from_positional
    assert from_named.steps == 24 and from_named.denoise == 0.25
    assert from_named.face_denoise == R.RefineSettings().face_denoise  # untouched names keep defaults


def test_unknown_or_bad_args_are_clear_errors():
    with pytest.raises(R.RefineError, match="unknown fluxq refine arg"):
        R.settings_from_args({"denoize": 0.3})
    with pytest.raises(R.RefineError, match="not a number"):
        R.settings_from_args({"steps": "many"})
    with pytest.raises(R.RefineError, match="no refine checkpoint"):
        R.settings_from_args({"enable": True}).validate()
    with pytest.raises(R.RefineError, match="16 channels"):
        R.settings_from_args({"enable": True, "checkpoint": "x", "upscaler": "Latent (bicubic)"}).validate()


def test_infotext_round_trip_through_strings():
    settings = R.settings_from_args({"enable": True, "checkpoint": "juggernaut, v9.safetensors", "scale": 1.5,
                                     "prompt": "a face, detailed", "faces": False, "face_max": 2})
    text = R.settings_to_infotext(settings)
    # parse_generation_parameters hands every value back as a string
    parsed = {k: str(v) for k, v in text.items()}
    assert R.settings_from_infotext(parsed) == settings
    assert R.settings_from_infotext({"Steps": "20"}) is None


@pytest.mark.parametrize("family,expected_cfg", [("sd15", 7.5), ("sdxl", 5.0)])
def test_plan_uses_the_family_cfg_never_flux_1(family, expected_cfg):
    plan = R.make_plan(R.RefineSettings(enable=True, checkpoint="x"), (512, 768), family)
    assert plan.cfg == expected_cfg == R.FAMILIES[family].cfg
    assert plan.cfg > 1.0
    assert plan.size == (1024, 1536)
    assert plan.tiled == (family == "sd15")
    assert plan.faces.side == R.FAMILIES[family].native_side
    assert R.make_plan(R.RefineSettings(enable=True, checkpoint="x", cfg=3.0), (512, 768), family).cfg == 3.0


UNET_ATTN2_K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


def _safetensors(path, tensors: dict[str, tuple[int, ...]]) -> str:
    import torch
    from safetensors.torch import save_file

    save_file({name: torch.zeros(shape, dtype=torch.float16) for name, shape in tensors.items()}, str(path))
    return str(path)


def test_checkpoint_family_from_the_header(tmp_path):
    """SD1.5 vs SDXL by the UNet's cross-attention width (768 = CLIP-L; 2048 = CLIP-L + OpenCLIP-G), as Forge's
    huggingface_guess tells them; anything else is refused by what it is, a .ckpt (no header) is None."""
    sd15 = _safetensors(tmp_path / "sd15.safetensors", {UNET_ATTN2_K: (640, 768)})
    sdxl = _safetensors(tmp_path / "sdxl.safetensors", {UNET_ATTN2_K: (640, 2048)})
    assert R.checkpoint_family(sd15) == "sd15"
    assert R.checkpoint_family(sdxl) == "sdxl"
    from tests.fixtures import random_flux_state_dict, write_safetensors

    flux = write_safetensors(tmp_path / "flux1-dev.safetensors", random_flux_state_dict())  # real names, small widths
    with pytest.raises(R.RefineError, match=r"flux1-dev\.safetensors: is a FLUX\.1 \[dev\] model; .*16-channel"):
        R.checkpoint_family(flux)
    sd2 = _safetensors(tmp_path / "sd21.safetensors", {UNET_ATTN2_K: (640, 1024)})
    with pytest.raises(R.RefineError, match="is a Stable Diffusion 2.x model"):
        R.checkpoint_family(sd2)
    vae = _safetensors(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": (512, 4, 3, 3)})
    with pytest.raises(R.RefineError, match="is not a diffusion model"):
        R.checkpoint_family(vae)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(R.RefineError, match="bad.safetensors: cannot read its header"):
        R.checkpoint_family(bad)
    ckpt = tmp_path / "old.ckpt"
    ckpt.write_bytes(b"PK")
    assert R.checkpoint_family(ckpt) is None


def test_run_plan_order_and_face_limit():
    """upscale → tiles → faces, biggest faces first, at most face_max, low-confidence faces skipped."""
    settings = R.RefineSettings(enable=True, checkpoint="x", face_max=2, face_confidence=0.5)
    plan = R.make_plan(settings, (512, 768), "sd15")
    log = []

    def upscale(img, size):
        log.append(("upscale", size))
        return img.resize(size)

    def sample(img, mask, denoise, size):
        log.append(("face" if mask is not None else "img2img", size, denoise))
        assert img.size == size
        return img

    faces = [(R.Box(100, 100, 80, 80), 0.9), (R.Box(400, 400, 200, 200), 0.7), (R.Box(600, 900, 120, 120), 0.95),
             (R.Box(700, 100, 300, 300), 0.2)]
    out, done = R.run_plan(smooth_image(512, 768), plan, upscale=upscale, sample=sample, detect=lambda img: faces)
    assert out.size == (1024, 1536)
    assert log[0] == ("upscale", (1024, 1536))
    assert [e[0] for e in log[1:1 + len(plan.tiles)]] == ["img2img"] * len(plan.tiles)
    assert all(e[2] == 0.3 for e in log[1:1 + len(plan.tiles)])
    assert [e[0] for e in log[1 + len(plan.tiles):]] == ["face", "face"]
    assert all(e[2] == 0.4 for e in log[1 + len(plan.tiles):])
    assert [b for b, _ in done] == [R.Box(400, 400, 200, 200), R.Box(600, 900, 120, 120)]


def test_denoise_zero_skips_the_whole_image_pass():
    """denoise 0 changes nothing but would round-trip the image through the VAE: upscale, then faces only."""
    plan = R.make_plan(R.RefineSettings(enable=True, checkpoint="x", denoise=0.0), (512, 768), "sd15")
    assert plan.passes == 0 and not plan.tiled
    tiled = R.make_plan(R.RefineSettings(enable=True, checkpoint="x"), (512, 768), "sd15")
    assert tiled.passes == len(R.plan_tiles(1024, 1536, 512, 512, 64)) > 1
    source = smooth_image(512, 768)
    calls = []

    def sample(img, mask, denoise, size):
        calls.append((mask is not None, denoise))
        return img

    face = R.Box(400, 300, 200, 200)
    out, done = R.run_plan(source, plan, upscale=lambda img, size: img.resize(size, Image.Resampling.LANCZOS),
                           sample=sample, detect=lambda img: [(face, 0.9)])
    assert calls == [(True, plan.faces.denoise)]  # the face inpaint only
    assert done == [(face, 0.9)] and out.size == (1024, 1536)
