"""``python -m lib_fluxq compare``: the quantization ladder measured on the embedded default, weight errors checked
against ggml's own quantizer, every source layout giving the same table, and clear refusals of bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq import compare
from lib_fluxq.advisor import transformer_vram_gb
from lib_fluxq.errors import FluxqError
from lib_fluxq.flux import is_quantized_by_recipe
from tests import ggml_ref
from tests.fixtures import (
    SMALL_FLUX,
    diffusers_state_dict,
    random_flux_state_dict,
    recipe_qtype,
    write_gguf,
    write_safetensors,
)

T = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[1]
# Ordered by what the formats promise: more bits per weight, or the same bits with finer scales, means less error.
GGUF_LADDER = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]


@pytest.fixture(scope="module")
def embedded_default() -> compare.Comparison:
    """The demo's source (synthetic slice at Flux-dev's real width), with fewer tokens to keep the test short: the
    weight errors do not depend on the tokens."""
    levels = compare.select_levels(",".join(GGUF_LADDER + ["NF4", "FP8", "F16"]))
    return compare.run_comparison(compare.open_source(None), levels, blocks=1, width=256, height=256,
                                  text_tokens=8, seed=0, progress=False)


def _by_level(comparison: compare.Comparison) -> dict[str, compare.LevelResult]:
    return {r.level: r for r in comparison.levels}


def test_gguf_ladder_holds_on_the_embedded_default(embedded_default):
    results = _by_level(embedded_default)
    errors = [results[name].weight_rel_rmse for name in GGUF_LADDER]
    assert all(e is not None and e > 0 for e in errors)
    for i in range(1, len(GGUF_LADDER)):
        better, worse = errors[i - 1], errors[i]
        assert better < worse, f"{GGUF_LADDER[i - 1]} ({better:.4g}) should beat {GGUF_LADDER[i]} ({worse:.4g})"
    # the block outputs drift too, and the extremes of the ladder are far apart
    assert results["Q8_0"].block_rel_error < results["Q4_0"].block_rel_error < results["Q2_K"].block_rel_error
    assert results["F16"].weight_rel_rmse < 1e-6 < results["Q8_0"].weight_rel_rmse


def test_table_prints_nf4_and_fp8_where_they_land(embedded_default):
    table = compare.format_table(embedded_default)
    assert "SYNTHETIC" in table and "python -m lib_fluxq compare /path/to" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()
            if line.split() and line.split()[0] in _by_level(embedded_default)}
    assert {"NF4", "FP8"} <= set(rows)
    sizes = [float(rows[name][2]) for name in rows]
    assert sizes == sorted(sizes, reverse=True), "the table is sorted by projected size"
    results = _by_level(embedded_default)
    assert results["NF4"].bits_per_weight == pytest.approx(4.5)   # 4-bit codes + an fp32 absmax per 64
    assert results["FP8"].bits_per_weight == pytest.approx(8.0)
    for name in ("NF4", "FP8"):
        assert 0 < results[name].weight_rel_rmse < 1 and 0 < results[name].block_cosine <= 1


def test_sizes_and_vram_come_from_the_published_recipe_and_the_advisor(embedded_default):
    results = _by_level(embedded_default)
    # F16 everywhere is the 23.8 GB flux1-dev file; city96's Q8_0 is 12.7 GB, Q4_0 6.8 GB
    assert results["F16"].flux_dev_gb == pytest.approx(23.8, abs=0.05)
    assert results["Q8_0"].flux_dev_gb == pytest.approx(12.7, abs=0.05)
    assert results["Q4_0"].flux_dev_gb == pytest.approx(6.8, abs=0.05)
    for r in results.values():
        assert r.vram_gb == transformer_vram_gb(r.level, r.flux_dev_gb * 1e9, *compare.VRAM_RESOLUTION)
        assert r.vram_gb > r.flux_dev_gb * 1e9 / 2**30


def test_vram_per_family_is_the_advisors_figure_for_each_geometry(embedded_default):
    """Issue 15: the VRAM figure for every family of the family table, each from its own geometry (the advisor's
    need for that transformer at the measured bits/w); Flux-dev's entry is the VRAM column itself."""
    from lib_fluxq.advisor.model import distinct_families
    from lib_fluxq.compare_engine import projected_flux_dev_bytes

    families = {f.key: f for f in distinct_families()}
    table = compare.format_table(embedded_default)
    for r in embedded_default.levels:
        assert set(r.vram_by_family) == set(families)
        assert r.vram_by_family["flux-dev"] == r.vram_gb
        for key, family in families.items():
            model_bytes = projected_flux_dev_bytes(r.bits_per_weight, family.geometry)
            assert r.vram_by_family[key] == transformer_vram_gb(r.level, model_bytes, *compare.VRAM_RESOLUTION,
                                                                family.geometry)
        assert r.vram_by_family["flux2-dev"] > r.vram_by_family["flux-dev"] > r.vram_by_family["flux2-klein-4b"]
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.split()
            and line.split()[0] in families}
    assert set(rows) == set(families)
    assert [float(v) for v in rows["flux2-klein-4b"]] == [round(r.vram_by_family["flux2-klein-4b"], 1)
                                                         for r in embedded_default.levels]


@pytest.fixture(scope="module")
def small_flux() -> dict[str, torch.Tensor]:
    return random_flux_state_dict(SMALL_FLUX, seed=3)


def _file_comparison(path: Path, levels: str) -> compare.Comparison:
    source = compare.open_source(str(path))
    try:
        return compare.run_comparison(source, compare.select_levels(levels), blocks=1, width=256, height=256,
                                      text_tokens=16, seed=0, progress=False)
    finally:
        source.close()


def test_weight_error_matches_ggml_on_a_file(tmp_path, small_flux):
    """compare's weight error per level is exactly what ggml's own quantize -> to_float gives on those weights."""
    path = write_safetensors(tmp_path / "flux.safetensors", small_flux)
    comparison = _file_comparison(path, "Q6_K,Q4_K,Q5_1,IQ4_XS")
    assert comparison.double_blocks == [1] and comparison.single_blocks == [1]   # centre of 2 blocks
    sampled = [n for n in small_flux if n.startswith(("double_blocks.1.", "single_blocks.1."))
               and is_quantized_by_recipe(n, tuple(small_flux[n].shape))]
    for result in comparison.levels:
        qtype = T[result.level]
        err_sq = ref_sq = 0.0
        for name in sampled:
            weight = small_flux[name].numpy().astype(np.float32)
            restored = ggml_ref.dequantize(ggml_ref.quantize(weight, qtype), qtype, weight.size)
            err_sq += float(((restored.reshape(weight.shape).astype(np.float64) - weight) ** 2).sum())
            ref_sq += float((weight.astype(np.float64) ** 2).sum())
        assert result.weight_rel_rmse == pytest.approx(math.sqrt(err_sq / ref_sq), rel=1e-6), result.level
        assert result.bits_per_weight == pytest.approx(gguf.GGML_QUANT_SIZES[qtype][1] * 8 /
                                                       gguf.GGML_QUANT_SIZES[qtype][0])


def test_every_source_layout_gives_the_same_table(tmp_path, small_flux):
    """BFL safetensors, Forge all-in-one prefix, diffusers names and an F32 GGUF hold the same weights."""
    bfl = write_safetensors(tmp_path / "bfl.safetensors", small_flux)
    prefixed = write_safetensors(tmp_path / "aio.safetensors",
                                 {f"model.diffusion_model.{k}": v for k, v in small_flux.items()})
    diffusers = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", diffusers_state_dict(small_flux))
    gguf_path = tmp_path / "flux-f32.gguf"
    write_gguf(gguf_path, small_flux, lambda name, shape: T.F32)
    tables = []
    for path in (bfl, prefixed, diffusers, gguf_path):
        comparison = _file_comparison(path, "Q8_0,Q4_0")
        assert not comparison.synthetic
        tables.append([(r.level, r.weight_rel_rmse, r.block_rel_error, r.output_rel_error)
                       for r in comparison.levels])
    assert all(t == tables[0] for t in tables[1:])
    assert "diffusers layout" in compare.open_source(str(diffusers)).info.description


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_fluxq", "compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_json_and_plot(tmp_path, small_flux):
    path = write_safetensors(tmp_path / "flux.safetensors", small_flux)
    plot = tmp_path / "plots" / "compare.png"
    done = _cli(str(path), "--levels", "Q8_0,q4_k,NF4,FP8", "--blocks", "2", "--res", "256x256",
                "--text-tokens", "16", "--json", "--plot", str(plot), "--no-progress")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["synthetic"] is False and data["double_blocks"] == [0, 1]
    assert [lv["level"] for lv in data["levels"]] == ["Q8_0", "FP8", "Q4_K", "NF4"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    assert [p.name for p in plot.parent.iterdir()] == ["compare.png"]   # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert plot.stat().st_mode & 0o777 == 0o666 & ~umask  # permissions as for any new file, not a temp file's 0o600


def _sha(path: Path) -> bytes:
    import hashlib
    return hashlib.sha256(path.read_bytes()).digest()


@pytest.mark.parametrize("kind", ["gguf_q8_0", "gguf_q4_k", "nf4", "fp8"])
def test_already_quantized_source_is_refused(tmp_path, small_flux, kind):
    if kind.startswith("gguf"):
        path = tmp_path / f"flux-{kind}.gguf"
        write_gguf(path, small_flux, recipe_qtype(T[kind[5:].upper()]))
    elif kind == "nf4":
        from lib_fluxq.convert import convert_file
        path = tmp_path / "flux-nf4.safetensors"
        convert_file(write_safetensors(tmp_path / "src.safetensors", small_flux), path, "nf4")
    else:
        path = write_safetensors(tmp_path / "flux-fp8.safetensors",
                                 {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in small_flux.items()})
    digest = _sha(path)
    done = _cli(str(path), "--levels", "Q8_0", "--no-progress")
    assert done.returncode == 1
    message = done.stderr
    assert str(path) in message and "full-precision" in message and "F16/BF16" in message
    assert "Traceback" not in message
    assert _sha(path) == digest


def test_not_flux_is_refused(tmp_path):
    sdxl = write_safetensors(tmp_path / "sdxl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)})
    done = _cli(str(sdxl))
    assert done.returncode == 1 and str(sdxl) in done.stderr and "not a Flux transformer" in done.stderr
    assert "SDXL" in done.stderr and "Traceback" not in done.stderr
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("hello")
    done = _cli(str(garbage))
    assert done.returncode == 1 and str(garbage) in done.stderr and "Traceback" not in done.stderr
    done = _cli(str(tmp_path / "missing.safetensors"))
    assert done.returncode == 1 and "file not found" in done.stderr


@pytest.mark.parametrize("arch", ["chroma", "flux2"])
def test_other_layouts_are_refused_in_one_line(tmp_path, arch):
    """Chroma and FLUX.2 blocks are not FLUX.1's: one line naming the family, not a state-dict error."""
    from lib_fluxq.flux import FluxConfig
    layouts = {"chroma": FluxConfig(arch="chroma", hidden=256, heads=2, depth=2, depth_single=2, context_in=512,
                                    guidance=False, approximator_hidden=512, approximator_layers=2,
                                    approximator_in=64),
               "flux2": FluxConfig(arch="flux2", hidden=256, heads=2, depth=2, depth_single=2, mlp_ratio=3,
                                   in_channels=128, out_channels=128, context_in=768, vec_in=0, guidance=False)}
    path = write_safetensors(tmp_path / "model.safetensors",
                             random_flux_state_dict(layouts[arch], dtype=torch.bfloat16))
    digest = _sha(path)
    done = _cli(str(path), "--blocks", "1", "--levels", "Q8_0")
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(lines) == 1 and str(path) in lines[0], done.stderr
    assert {"chroma": "Chroma", "flux2": "FLUX.2"}[arch] in lines[0] and "Traceback" not in done.stderr
    assert _sha(path) == digest


def test_too_few_blocks_and_bad_options(tmp_path, small_flux):
    path = str(write_safetensors(tmp_path / "flux.safetensors", small_flux))
    with pytest.raises(FluxqError, match=r"only 2 double-stream blocks, cannot sample 3; use --blocks 2"):
        compare.run_comparison(compare.open_source(path), compare.select_levels("Q8_0"), blocks=3, width=256,
                               height=256, text_tokens=8, progress=False)
    done = _cli(path, "--blocks", "0")
    assert done.returncode == 1 and "--blocks must be at least 1" in done.stderr
    done = _cli(path, "--blocks", "5")
    assert done.returncode == 1 and "cannot sample 5" in done.stderr and path in done.stderr


def test_unknown_level_names_the_known_ones():
    with pytest.raises(FluxqError, match=r"unknown level 'Q7_0' in --levels; known: .*Q8_0.*NF4.*FP8"):
        compare.select_levels("Q8_0,Q7_0")
    with pytest.raises(FluxqError, match="--levels is empty"):
        compare.select_levels(" , ")
    done = _cli("--levels", "Q3_X")
    assert done.returncode == 1 and "unknown level 'Q3_X'" in done.stderr and "Traceback" not in done.stderr
    done = _cli("--res", "300x200")
    assert done.returncode == 1 and "300x200" in done.stderr



# Plot input: one run of the embedded default (sizes and errors as `make demo` printed them). Four levels share
# 6.80 GB and Q4_0 / NF4 nearly share their errors too: the case where a marker used to hide under another.
_DEMO_ROWS = """Q8_0 8.500 12.71 7.806e-03 1.632e-02
FP8_SCALED 8.000 11.97 2.651e-02 5.361e-02
FP8 8.000 11.97 3.391e-02 7.769e-02
Q6_K 6.562 9.85 2.365e-02 4.828e-02
Q5_1 6.000 9.02 4.430e-02 9.121e-02
Q5_K 5.500 8.28 4.302e-02 9.105e-02
Q5_0 5.500 8.28 6.205e-02 1.257e-01
Q4_1 5.000 7.54 9.136e-02 1.939e-01
Q4_K 4.500 6.80 8.520e-02 1.769e-01
Q4_0 4.500 6.80 1.239e-01 2.521e-01
IQ4_NL 4.500 6.80 9.827e-02 2.027e-01
NF4 4.500 6.80 1.239e-01 2.521e-01
IQ4_XS 4.250 6.43 9.982e-02 2.085e-01
Q3_K 3.438 5.23 1.847e-01 3.901e-01
Q2_K 2.625 4.02 3.312e-01 7.304e-01"""


def test_plot_never_hides_a_marker_or_a_label():
    """Every marker is at least one marker width from every other (pixels, as drawn), and every label's rendered
    box overlaps no other label and no marker — also for NF4 placed exactly on Q4_0."""
    levels = []
    for line in _DEMO_ROWS.splitlines():
        name, bits, size, weight_err, block_err = line.split()
        family = "nf4" if name == "NF4" else "fp8" if name.startswith("FP8") else "gguf"
        levels.append(compare.LevelResult(level=name, description=name, available=True, family=family,
                                          bits_per_weight=float(bits), flux_dev_gb=float(size),
                                          weight_rel_rmse=float(weight_err), block_rel_error=float(block_err)))
    comparison = compare.Comparison(source="test", synthetic=True, resolution="256x256", image_tokens=256,
                                    text_tokens=64, double_blocks=[9], single_blocks=[19], levels=levels)
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation, Text

    fig = compare.build_figure(comparison)
    try:
        fig.canvas.draw()  # as saving does: annotations take their final positions
        renderer = fig.canvas.get_renderer()
        diameter = compare._marker_px()
        for ax in fig.axes[:2]:
            dots = np.concatenate([ax.transData.transform(c.get_offsets()) for c in ax.collections])
            assert len(dots) == len(levels)
            gaps = np.linalg.norm(dots[:, None, :] - dots[None, :, :], axis=-1) + np.eye(len(dots)) * 1e9
            assert gaps.min() >= diameter, f"two markers {gaps.min():.1f} px apart (diameter {diameter:.1f})"
            labels = [t for t in ax.texts if isinstance(t, Annotation)]
            assert sorted(t.get_text() for t in labels) == sorted(r.level for r in levels)
            boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text itself, not its leader line
            inside = ax.get_window_extent(renderer)
            for i, box in enumerate(boxes):
                assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                for other in boxes[i + 1:]:
                    assert not box.overlaps(other), (labels[i].get_text(), "overlaps another label")
                for x, y in dots:
                    r = diameter / 2
                    assert not (box.x0 < x + r and x - r < box.x1 and box.y0 < y + r and y - r < box.y1), \
                        (labels[i].get_text(), "covers a marker")
    finally:
        plt.close(fig)
