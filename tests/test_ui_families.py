"""The Flux Quant tab for every family of the family table (issue 15): FLUX.1 dev / schnell / Fill / Kontext / Krea,
Chroma, FLUX.2 [dev], FLUX.2 [klein] 4B / 9B.

Files are header-faithful (tests/family_files.py: real tensor names, shapes and dtypes at full size, data sparse) in
a WebUI models folder with neutral names wherever content decides (Kontext and Krea share FLUX.1 dev's weights: their
name decides, as in every loader). What each family needs is typed here, not read from the family table, so a table
row that drifts fails the test. Conversions run on small-width files that keep each family's distinguishing shapes
(txt_in in-features, img_in, Chroma's guidance layer) and are read back by gguf-py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import gguf
import pytest

from lib_fluxq import catalog, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.flux import (
    CHROMA_HD,
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX_DEV,
    FLUX_FILL,
    FLUX_SCHNELL,
)
from lib_fluxq.hardware import Hardware
from lib_fluxq.ui import handlers
from lib_fluxq.ui.host import StandaloneHost
from lib_fluxq.ui.listing import RefusedPath
from tests import family_files as ff

Q = gguf.GGMLQuantizationType
GIB = 1024 ** 3

# family key -> (file name, title the models table shows, parts it needs, each part's WebUI folder)
FLUX1_PARTS = {"clip_l": "text_encoder", "t5xxl": "text_encoder", "ae": "VAE"}
FAMILY_FILES = {
    "flux-dev": ("model-a.gguf", "FLUX.1 [dev]", FLUX1_PARTS),
    "flux-schnell": ("model-b.safetensors", "FLUX.1 [schnell]", FLUX1_PARTS),
    "flux-fill": ("model-c.safetensors", "FLUX.1 Fill [dev]", FLUX1_PARTS),
    "flux-kontext": ("flux1-kontext-dev-Q4_K_S.gguf", "FLUX.1 Kontext [dev]", FLUX1_PARTS),
    "flux-krea": ("flux1-krea-dev-fp8.safetensors", "FLUX.1 Krea [dev]", FLUX1_PARTS),
    "chroma": ("model-d.gguf", "Chroma", {"t5xxl": "text_encoder", "ae": "VAE"}),
    "flux2-dev": ("model-e.gguf", "FLUX.2 [dev]", {"mistral3_24b": "text_encoder", "flux2_vae": "VAE"}),
    "flux2-klein-4b": ("model-f.safetensors", "FLUX.2 [klein] 4B", {"qwen3_4b": "text_encoder", "flux2_vae": "VAE"}),
    "flux2-klein-9b": ("model-g.gguf", "FLUX.2 [klein] 9B", {"qwen3_8b": "text_encoder", "flux2_vae": "VAE"}),
}
FLUX1_ARCH = {"flux-dev", "flux-schnell", "flux-fill", "flux-kontext", "flux-krea"}   # what Compare measures


def _write(sd: Path, family: str) -> Path:
    name = FAMILY_FILES[family][0]
    writers = {
        "flux-dev": lambda p: ff.write_sparse_gguf(p, ff.flux_gguf_specs(FLUX_DEV, Q.Q4_0), "flux"),
        "flux-schnell": lambda p: ff.write_sparse_safetensors(p, ff.flux_specs(FLUX_SCHNELL)),
        "flux-fill": lambda p: ff.write_sparse_safetensors(p, ff.flux_specs(FLUX_FILL)),
        "flux-kontext": lambda p: ff.write_sparse_gguf(p, ff.flux_gguf_specs(FLUX_DEV, Q.Q4_K), "flux"),
        "flux-krea": lambda p: ff.write_sparse_safetensors(p, ff.flux_fp8_specs(FLUX_DEV)),
        "chroma": lambda p: ff.write_sparse_gguf(p, ff.flux_gguf_specs(CHROMA_HD, Q.Q8_0), "flux"),
        "flux2-dev": lambda p: ff.write_sparse_gguf(p, ff.flux_gguf_specs(FLUX2_DEV, Q.Q4_K), "flux"),
        "flux2-klein-4b": lambda p: ff.write_sparse_safetensors(p, ff.flux_specs(FLUX2_KLEIN_4B)),
        "flux2-klein-9b": lambda p: ff.write_sparse_gguf(p, ff.flux_gguf_specs(FLUX2_KLEIN_9B, Q.Q8_0), "flux"),
    }
    return writers[family](sd / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("webui") / "models"
    for sub in ("Stable-diffusion", "text_encoder", "VAE"):
        (root / sub).mkdir(parents=True)
    for family in FAMILY_FILES:
        _write(root / "Stable-diffusion", family)
    return root


def gpu_machine(vram_gb: int = 12) -> Hardware:
    return Hardware(backend="cuda", gpu_name="NVIDIA GeForce RTX 4070", vram_total=vram_gb * GIB,
                    vram_free=vram_gb * GIB, ram_total=32 * GIB, ram_available=24 * GIB, cpu_cores=8,
                    disk_free=100 * GIB, disk_path="/")


def _rows(models: Path, plan: handlers.Plan, module_paths: list[str] | None = None) -> dict[str, dict[str, object]]:
    listing = handlers.new_listing([str(models)])
    inv = handlers.inventory(listing, plan)
    rows = handlers.model_rows(inv, module_paths or [], handlers.plan_ram(plan))
    return {r[0]: dict(zip(handlers.MODEL_COLUMNS, r, strict=True)) for r in rows}


def _gets(cell: object) -> dict[str, str]:
    """The missing-parts cell's parts and the catalog key of each part's Get button."""
    parts = re.search(r'data-parts="([^"]*)"', str(cell)).group(1).split(",")
    keys = re.findall(r'data-fluxq-download="([^"]+)"', str(cell))
    return dict(zip(parts, keys, strict=True))


def test_every_family_is_named_with_its_own_parts_and_a_get_button_each(models):
    plan = handlers.make_plan(gpu_machine(), None, None, None)
    rows = _rows(models, plan)
    for family, (name, title, parts) in FAMILY_FILES.items():
        row = rows[name]
        assert row["family"] == title, (family, row)
        gets = _gets(row["missing parts"])
        assert list(gets) == list(parts), (family, gets)
        for part, key in gets.items():   # the button downloads a file that provides the part, into its folder
            entry = catalog.get(key)
            assert (entry.part, entry.folder) == (part, parts[part]), (family, part, key)


def test_files_on_disk_pair_by_family(models, tmp_path):
    """With a Qwen3-4B and the FLUX.2 VAE on disk, Klein 4B needs nothing; Klein 9B still its Qwen3-8B; FLUX.1 and
    Chroma still everything (a FLUX.2 VAE is not theirs)."""
    qwen = ff.write_sparse_safetensors(tmp_path / "text-encoder.safetensors", ff.llm_specs(ff.QWEN3_4B))
    vae = ff.write_sparse_safetensors(tmp_path / "vae.safetensors", ff.vae_specs(32, flux2=True))
    plan = handlers.make_plan(gpu_machine(), None, None, None)
    rows = _rows(models, plan, [str(qwen), str(vae)])
    klein4 = rows[FAMILY_FILES["flux2-klein-4b"][0]]["missing parts"]
    assert klein4 == "none: pairs with text-encoder.safetensors, vae.safetensors", klein4
    assert list(_gets(rows[FAMILY_FILES["flux2-klein-9b"][0]]["missing parts"])) == ["qwen3_8b"]
    assert list(_gets(rows[FAMILY_FILES["flux2-dev"][0]]["missing parts"])) == ["mistral3_24b"]
    assert list(_gets(rows[FAMILY_FILES["chroma"][0]]["missing parts"])) == ["t5xxl", "ae"]
    assert list(_gets(rows[FAMILY_FILES["flux-dev"][0]]["missing parts"])) == ["clip_l", "t5xxl", "ae"]


def test_each_file_is_judged_as_its_own_family(models):
    """Whatever family the page plans for, a file's verdict is the advisor's for that file's own family: a 19 GB
    FLUX.2 [dev] Q4_K_S cannot sit in a 12 GB card (judged as FLUX.1 it passed for an all-in-one and 'fit')."""
    from lib_fluxq import advisor
    for planned in ("flux-dev", "flux2-klein-4b"):
        plan = handlers.make_plan(gpu_machine(), None, None, None, model=planned)
        rows = _rows(models, plan)
        for family, (name, _, _) in FAMILY_FILES.items():
            size = (models / "Stable-diffusion" / name).stat().st_size
            report = next(r for r in handlers.scan_models([str(models)]) if r.path.endswith(name))
            (own,) = advisor.Planner(plan.hardware, model=family).rank_files(
                [advisor.ModelFile(name, report.level, size, family)])
            assert rows[name]["verdict"] == handlers.verdict_text(own), (planned, family, rows[name], own)
            assert own.verdict in ("fits", "offloads", "won't fit"), (family, own)   # every family is a transformer
        assert not rows[FAMILY_FILES["flux2-dev"][0]]["verdict"].startswith("fits")


def test_use_this_plans_gpu_weights_for_the_checkpoints_family(models):
    """"Use this" on each family's file: its own parts are missing (with Get buttons), the host line is the family's,
    and GPU Weights is the advisor's for that family, whatever the Model field says."""
    from lib_fluxq.ui.tab import TabBuilder
    builder = TabBuilder(StandaloneHost(str(models)), jobs.JobRunner())
    builder.detected = gpu_machine()
    builder.listing.rescan()
    weights = {}
    for family, (name, title, parts) in FAMILY_FILES.items():
        html_out, size, _ = builder.use_this(f"models/Stable-diffusion/{name}", "", None, None, "1024x1024",
                                             "flux-dev")
        assert "fluxq-error" not in html_out, (family, html_out)
        assert f"{title} runs in: " in html_out, (family, html_out)
        assert list(_gets(html_out)) == list(parts), (family, html_out)
        plan = handlers.make_plan(gpu_machine(), None, None, None, model=family)
        advice = handlers.advise(plan)
        assert f"GPU Weights: {advice.gpu_weights_mb.value} MB; size {advice.width}x{advice.height}" in html_out
        assert size == f"{advice.width}x{advice.height}"
        weights[family] = advice.gpu_weights_mb.value
    assert weights["flux2-klein-4b"] != weights["flux-dev"]   # the test tells a family-blind plan apart


@pytest.mark.parametrize(("family", "config"), [
    ("chroma", dataclasses.replace(CHROMA_HD, hidden=256, heads=2, depth=1, depth_single=1, approximator_hidden=64,
                                   approximator_layers=1)),
    ("flux2-klein-4b", dataclasses.replace(FLUX2_KLEIN_4B, hidden=256, heads=2, depth=1, depth_single=1)),
    ("flux2-dev", dataclasses.replace(FLUX2_DEV, hidden=256, heads=2, depth=1, depth_single=1)),
    ("flux-fill", dataclasses.replace(FLUX_FILL, hidden=256, heads=2, depth=1, depth_single=1)),
])
def test_convert_from_the_tab_for_each_family_and_compare_only_where_it_measures(tmp_path, family, config):
    """A small-width file of the family (its distinguishing shapes kept) converts from the tab to a Q8_0 GGUF that
    gguf-py reads with the source's tensors, and the tab lists the result as the same family. Compare offers and
    accepts FLUX.1 files only (it builds FLUX.1 blocks); other families get one line."""
    import torch
    from safetensors.torch import save_file
    root = tmp_path / "models"
    sd = root / "Stable-diffusion"
    sd.mkdir(parents=True)
    shapes = {k: spec[1] for k, spec in ff.flux_specs(config).items()}
    gen = torch.Generator().manual_seed(0)
    save_file({k: (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
              str(sd / "small.safetensors"))
    plan = handlers.make_plan(gpu_machine(), None, None, None)
    listing = handlers.new_listing([str(root)])
    inv = handlers.inventory(listing, plan)
    label = "models/Stable-diffusion/small.safetensors"
    (entry,) = [f for f in inv.files if f.label == label]
    assert entry.report.family == family
    assert handlers.convertible_choices(inv) == [label]
    runner = jobs.JobRunner()
    job = runner.wait(handlers.start_convert(runner, handlers.find_convertible(listing, label), "Q8_0",
                                             listing=listing).id, 120)
    assert job.state == jobs.DONE, job.result
    out = sd / "small-Q8_0.gguf"
    reader = gguf.GGUFReader(out)
    assert "Q8_0" in {t.tensor_type.name for t in reader.tensors}
    assert len(reader.tensors) == len(shapes)
    rows = _rows(root, plan)
    assert rows[out.name]["family"] == rows["small.safetensors"]["family"] == FAMILY_FILES[family][1]
    if family in FLUX1_ARCH:
        assert handlers.comparable_choices(inv) == [label]
        assert handlers.find_comparable(listing, label).label == label
    else:
        assert handlers.comparable_choices(inv) == []
        with pytest.raises(RefusedPath) as refused:
            handlers.find_comparable(listing, label)
        assert "\n" not in str(refused.value) and "FLUX.1" in str(refused.value)
        assert isinstance(refused.value, FluxqError)


def test_recommendation_for_every_family_in_ui_words():
    """The Model field offers every family; for each, on cards from none to 48 GB and every LoRA mode, the
    recommendation renders (Kontext / Krea / Klein Base on a small card used to raise StopIteration in the advisor),
    names no command-line flag, and warns that Forge cannot re-quantize a LoRA only when fluxq's re-quantization is
    off."""
    import html

    keys = [key for _, key in handlers.model_choices()]
    assert set(FAMILY_FILES) <= set(keys)
    flag = re.compile(r"(?<![\w-])--?[a-z][\w-]*|python -m")
    cpu = Hardware(backend="cpu", ram_total=32 * GIB, ram_available=24 * GIB, cpu_cores=8, disk_free=100 * GIB,
                   disk_path="/")
    for key in keys:
        for vram, gpu in ((None, ""), (4, ""), (6, ""), (8, ""), (12, "RTX 9999"), (16, "RTX 4060 Ti"), (48, "")):
            plan = handlers.make_plan(cpu, gpu, vram, None, model=key)
            advice = handlers.advise(plan)
            for mode in (None, "requant", "online", "off"):
                page = handlers.recommendation_html(advice, plan, mode)
                text = html.unescape(re.sub(r"<[^>]+>", " ", page))
                assert not flag.search(text), (key, vram, mode, flag.search(text))
                assert "cannot re-quantize" not in text or mode == "off", (key, vram, mode)
                assert handlers.family_title(key) in text
