"""The functions behind the Flux Quant tab, without a browser: what each section shows must be what the engine
(advisor, inspector, pairing) says about files built here, and jobs must write what the reference readers accept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import pytest
import torch

from lib_fluxq import jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.hardware import Hardware, with_overrides
from lib_fluxq.ui import handlers
from lib_fluxq.ui.host import StandaloneHost
from tests.fixtures import SMALL_FLUX, random_flux_state_dict, recipe_qtype, write_gguf, write_safetensors

GIB = 1024 ** 3


def cpu_machine() -> Hardware:
    return Hardware(backend="cpu", ram_total=32 * GIB, ram_available=24 * GIB, cpu_cores=8, disk_free=100 * GIB,
                    disk_path="/")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("webui") / "models"
    for sub in ("Stable-diffusion", "text_encoder", "VAE"):
        (root / sub).mkdir(parents=True)
    checkpoints = root / "Stable-diffusion"
    for level, size in (("Q8_0", 12_700_000_000), ("Q4_0", 6_790_000_000)):
        path = checkpoints / f"flux1-dev-{level}.gguf"
        write_gguf(path, random_flux_state_dict(SMALL_FLUX), recipe_qtype(gguf.GGMLQuantizationType[level]))
        os.truncate(path, size)   # a real header at the published size (sparse tail: no disk used)
    write_safetensors(checkpoints / "tiny-flux-dev-bf16.safetensors",
                      random_flux_state_dict(SMALL_FLUX, dtype=torch.bfloat16))
    (checkpoints / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return root


def test_plan_overrides_only_what_the_user_changed():
    detected = cpu_machine()
    gpu, vram, ram = handlers.machine_fields(detected)
    same = handlers.make_plan(detected, gpu, vram, ram, "1024x1024", "dev")
    assert same.overridden == [] and same.hardware.backend == "cpu"
    planned = handlers.make_plan(detected, "", 8, ram, "768x768", "schnell")
    assert planned.overridden == ["VRAM"]
    assert planned.hardware.vram_total == 8 * GIB and planned.hardware.backend == "cuda"
    assert (planned.width, planned.height, planned.model) == (768, 768, "schnell")
    with pytest.raises(FluxqError, match="WIDTHxHEIGHT"):
        handlers.make_plan(detected, "", None, None, "big", "dev")
    with pytest.raises(FluxqError, match="not plausible"):
        handlers.make_plan(detected, "", 5000, None, "1024x1024", "dev")


def test_recommendation_shows_the_advisors_numbers_and_presets():
    from lib_fluxq import advisor

    plan = handlers.make_plan(cpu_machine(), "", 12, None)
    advice = handlers.advise(plan)
    reference = advisor.advise(with_overrides(cpu_machine(), vram_gb=12))
    assert advice.summary == reference.summary
    page = handlers.recommendation_html(advice, plan)
    assert reference.summary in page and str(reference.gpu_weights_mb.value) in page
    assert reference.recommended.reason.split(":")[0] in page
    fitting = {f'{r["width"]}x{r["height"]}' for r in reference.resolutions
               if r["fit"] in ("resident", "near-resident")}
    assert set(re.findall(r'data-fluxq-size="(\d+x\d+)"', page)) == \
        fitting | {f"{reference.width}x{reference.height}"}
    cpu_page = handlers.recommendation_html(handlers.advise(handlers.make_plan(cpu_machine(), "", None, None)),
                                            handlers.make_plan(cpu_machine(), "", None, None))
    assert "CPU" in cpu_page and "data-fluxq-size" not in cpu_page


def test_missing_engine_modules_say_so(monkeypatch):
    monkeypatch.setattr(handlers, "optional", lambda name: None)
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    assert handlers.advise(plan) is None
    assert "not available yet" in handlers.recommendation_html(None, plan)
    assert handlers.inventory(["/nonexistent"], plan) is None
    assert handlers.convert_targets() == []
    with pytest.raises(FluxqError, match="not available yet"):
        handlers.start_convert(jobs.JobRunner(), "/x.safetensors", "Q8_0")


def test_models_table_matches_inspector_and_advisor(models):
    from lib_fluxq import advisor, inspect
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    inventory = handlers.inventory([str(models)], plan)
    rows = {row[0]: dict(zip(handlers.MODEL_COLUMNS, row, strict=True)) for row in handlers.model_rows(inventory)}
    reports = {Path(r.path).name: r for r in inspect.scan([str(models)])}
    assert set(rows) == set(reports)
    verdicts = {v.name: v for v in advisor.Planner(plan.hardware).rank_files(advisor.files_from_reports(
        reports.values()))}
    for name, report in reports.items():
        row = rows[name]
        if report.status != "ok":
            assert row["family"] == "unreadable" and row["missing parts"] == report.error
            continue
        assert (row["family"], row["level"]) == (report.family, report.level)
        verdict = verdicts[name]
        assert row["verdict"].split()[0] == verdict.verdict.split()[0]
        if verdict.step_s is not None:
            assert row["verdict"].endswith(f"~{verdict.step_s:g} s/it")
        if report.family.startswith("flux-"):   # no text encoder / VAE on disk: all three are to download
            assert row["missing parts"] == "clip_l, t5xxl, ae (see Get a model)", row
        else:
            assert row["missing parts"] == "-", row
    assert rows["flux1-dev-Q8_0.gguf"]["verdict"] != rows["flux1-dev-Q4_0.gguf"]["verdict"]
    choices = handlers.transformer_choices(inventory)
    assert Path(choices[0]).name in {n for n, v in verdicts.items() if v.verdict == "fits"}
    assert [Path(p).name for p in handlers.convertible_choices(inventory)] == ["tiny-flux-dev-bf16.safetensors"]
    html_table = handlers.table_html(handlers.MODEL_COLUMNS, handlers.model_rows(inventory))
    assert html_table.count("<tr>") == len(reports) + 1 and "{not json" not in html_table


def test_models_table_says_what_the_files_on_disk_pair_with(models, tmp_path):
    """"missing parts" is what neither the checkpoint nor a text-encoder / VAE file provides — the pairing "Use this"
    and the load hook do — not what the transformer-only file lacks (which every GGUF lacks)."""
    from safetensors.torch import save_file
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    inventory = handlers.inventory([str(models)], plan)
    clip, sd_vae, ae = tmp_path / "clip_l.safetensors", tmp_path / "sd-vae.safetensors", tmp_path / "ae.safetensors"
    save_file({"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768)}, str(clip))
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, str(sd_vae))   # an SD VAE: no use to Flux
    save_file({"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)}, str(ae))

    def missing(module_files: list[Path]) -> str:
        rows = {row[0]: row[-1] for row in handlers.model_rows(inventory, [str(p) for p in module_files])}
        assert rows["tiny-flux-dev-bf16.safetensors"] == rows["flux1-dev-Q8_0.gguf"]   # every Flux transformer
        return rows["flux1-dev-Q8_0.gguf"]

    assert missing([clip, sd_vae]) == "t5xxl, ae (see Get a model)"
    assert missing([clip, sd_vae, ae]) == "t5xxl (see Get a model)"
    t5 = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(8, 8, dtype=torch.float8_e4m3fn)}, str(t5))
    assert missing([clip, sd_vae, ae, t5]) == \
        "none: pairs with clip_l.safetensors, t5xxl_fp8_e4m3fn.safetensors, ae.safetensors"


def test_use_this_pairs_modules_by_content(models, tmp_path):
    from safetensors.torch import save_file

    from lib_fluxq import pairing
    checkpoint = str(models / "Stable-diffusion" / "flux1-dev-Q4_0.gguf")
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    nothing = handlers.use_plan(checkpoint, [], plan, handlers.advise(plan))
    assert nothing.missing == ["clip_l", "t5xxl", "ae"]
    assert pairing.missing_files_message(checkpoint, nothing.missing) in nothing.message
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768)}, str(clip))
    vae = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)}, str(vae))
    advice = handlers.advise(plan)
    chosen = handlers.use_plan(checkpoint, [str(clip), str(vae)], plan, advice)
    reference = pairing.choose_pairing(pairing.describe_file(checkpoint), [],
                                       pairing.describe_files([str(clip), str(vae)]), plan.hardware.ram_available)
    assert chosen.modules == reference.modules and chosen.missing == reference.missing == ["t5xxl"]
    assert chosen.gpu_weights_mb == advice.gpu_weights_mb.value
    assert (chosen.width, chosen.height) == (advice.width, advice.height)
    host = StandaloneHost(str(models))
    assert "Standalone" in host.apply(chosen.checkpoint, chosen.modules, chosen.gpu_weights_mb)


def test_convert_job_reports_progress_and_writes_a_gguf_the_reference_reads(models, tmp_path):
    source = models / "Stable-diffusion" / "tiny-flux-dev-bf16.safetensors"
    runner = jobs.JobRunner()
    out = tmp_path / "out-Q8_0.gguf"
    job = handlers.start_convert(runner, str(source), "Q8_0", dst=str(out))
    with pytest.raises(jobs.JobConflict):
        handlers.start_convert(runner, str(source), "Q8_0", dst=str(out))   # same target while running
    job = runner.wait(job.id, 60)
    assert job.state == jobs.DONE, job.result
    assert any("/84 tensors" in text or "tensors —" in text for text in job.history)
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q8_0"}
    assert "100%" in handlers.jobs_html(runner, "convert") and "done" in handlers.jobs_html(runner)


def test_cancelled_convert_leaves_no_file(models, tmp_path):
    source = models / "Stable-diffusion" / "tiny-flux-dev-bf16.safetensors"
    runner = jobs.JobRunner()
    out = tmp_path / "cancelled.gguf"
    job = handlers.start_convert(runner, str(source), "Q4_K", dst=str(out))
    job.cancel.set()
    job = runner.wait(job.id, 60)
    assert job.state == jobs.CANCELLED
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_download_job_lands_in_the_catalog_folder(models, monkeypatch):
    from tests.test_download import FakeHub
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        data = b"vae bytes" * 1000
        hub.add("black-forest-labs/FLUX.1-schnell", "ae.safetensors", data)
        host = StandaloneHost(str(models))
        runner = jobs.JobRunner()
        job = runner.wait(handlers.start_download(runner, "ae", host.folders()).id, 30)
        assert job.state == jobs.DONE, job.result
        assert (models / "VAE" / "ae.safetensors").read_bytes() == data
        assert str(models / "VAE" / "ae.safetensors") in host.module_files()
        failed = runner.wait(handlers.start_download(runner, "clip_l", host.folders()).id, 30)
        assert failed.state == jobs.FAILED and "not found or needs a token" in failed.result
        assert "failed" in handlers.jobs_html(runner, "download")


def test_catalog_rows_and_tab_build(models):
    rows = handlers.catalog_rows()
    assert len(rows) == len(handlers.catalog.CATALOG) and all(len(r) == len(handlers.CATALOG_COLUMNS) for r in rows)
    from lib_fluxq.ui.tab import build_tab
    blocks = build_tab(StandaloneHost(str(models)), jobs.JobRunner())
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"fluxq_vram", "fluxq_plan", "fluxq_recommendation", "fluxq_models", "fluxq_dl_btn",
            "fluxq_convert_btn", "fluxq_compare_btn", "fluxq_use"} <= ids


def test_a_file_reached_twice_is_listed_once(models):
    once = handlers.scan_models([str(models)])
    twice = handlers.scan_models([str(models), str(models / "Stable-diffusion")])
    assert [r.path for r in twice] == [r.path for r in once]
