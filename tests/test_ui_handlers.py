"""The functions behind the Flux Quant tab, without a browser: what each section shows must be what the engine
(advisor, inspector, pairing) says about files built here, and jobs must write what the reference readers accept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import pytest
import torch

from lib_fluxq import families, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.hardware import Hardware, with_overrides
from lib_fluxq.ui import handlers
from lib_fluxq.ui.host import StandaloneHost
from lib_fluxq.ui.listing import RefusedPath
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
    assert (planned.width, planned.height, planned.model) == (768, 768, "flux-schnell")
    with pytest.raises(FluxqError, match="choose a model family from the list"):
        handlers.make_plan(detected, "", None, None, "1024x1024", "sd15")
    from lib_fluxq import advisor  # another family: the advisor's plan for that family
    klein = handlers.make_plan(detected, "", 8, None, "1024x1024", "flux2-klein-4b")
    reference = advisor.advise(klein.hardware, 1024, 1024, model="flux2-klein-4b")
    assert handlers.advise(klein).summary == reference.summary != handlers.advise(planned).summary
    assert families.FAMILIES["flux2-klein-4b"].title in handlers.recommendation_html(handlers.advise(klein), klein)
    with pytest.raises(FluxqError, match="WIDTHxHEIGHT"):
        handlers.make_plan(detected, "", None, None, "big", "dev")
    with pytest.raises(FluxqError, match="not plausible") as refused:
        handlers.make_plan(detected, "", 5000, None, "1024x1024", "dev")
    assert "--" not in str(refused.value), refused.value   # the field's name, not the command-line flag
    with pytest.raises(FluxqError, match="number"):
        handlers.make_plan(detected, "", "lots", None, "1024x1024", "dev")


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
    assert handlers.new_listing(["/nonexistent"]) is None
    assert handlers.inventory(None, plan) is None
    assert handlers.convert_targets() == []
    with pytest.raises(FluxqError, match="not available yet"):
        handlers.find_convertible(None, "models/Stable-diffusion/x.safetensors")


def get_buttons(cell: str) -> dict[str, str]:
    """The missing parts of a models-table cell -> the catalog key its "Get" button downloads (checked against the
    family table: the entry provides that part and lands in the part's folder)."""
    parts = re.search(r'data-parts="([^"]*)"', cell).group(1).split(",")
    keys = re.findall(r'data-fluxq-download="([^"]+)"', cell)
    assert len(parts) == len(keys), cell
    for part, key in zip(parts, keys, strict=True):
        entry = handlers.catalog.get(key)
        assert entry.part == part and entry.folder == families.companion(part).folder, (part, key)
        assert f"Get {families.part_title(part)} ({entry.size_gb:g} GB)" in cell
    return dict(zip(parts, keys, strict=True))


def test_models_table_matches_inspector_and_advisor(models):
    from lib_fluxq import advisor, inspect
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    inventory = handlers.inventory(handlers.new_listing([str(models)]), plan)
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
        assert (row["family"], row["level"]) == (families.FAMILIES[report.family].title, report.level)
        verdict = verdicts[name]
        assert row["verdict"].split()[0] == verdict.verdict.split()[0]
        if verdict.step_s is not None:
            assert row["verdict"].endswith(f"~{verdict.step_s:g} s/it")
        if report.family.startswith("flux-"):   # no text encoder / VAE on disk: all three are to download
            assert get_buttons(row["missing parts"]) == {"clip_l": "clip_l", "t5xxl": "t5xxl-fp8", "ae": "ae"}, row
        else:
            assert row["missing parts"] == "-", row
    assert rows["flux1-dev-Q8_0.gguf"]["verdict"] != rows["flux1-dev-Q4_0.gguf"]["verdict"]
    choices = handlers.transformer_choices(inventory)
    assert Path(choices[0]).name in {n for n, v in verdicts.items() if v.verdict == "fits"}
    assert handlers.convertible_choices(inventory) == ["models/Stable-diffusion/tiny-flux-dev-bf16.safetensors"]
    html_table = handlers.table_html(handlers.MODEL_COLUMNS, handlers.model_rows(inventory))
    assert html_table.count("<tr>") == len(reports) + 1 and "{not json" not in html_table
    order = [row[0] for row in handlers.model_rows(inventory)]
    assert order[-1] == "broken.safetensors", order   # broken files last, not between good checkpoints


def test_models_table_says_what_the_files_on_disk_pair_with(models, tmp_path):
    """"missing parts" is what neither the checkpoint nor a text-encoder / VAE file provides — the pairing "Use this"
    and the load hook do — not what the transformer-only file lacks (which every GGUF lacks)."""
    from safetensors.torch import save_file
    plan = handlers.make_plan(cpu_machine(), "", 8, None)
    inventory = handlers.inventory(handlers.new_listing([str(models)]), plan)
    clip, sd_vae, ae = tmp_path / "clip_l.safetensors", tmp_path / "sd-vae.safetensors", tmp_path / "ae.safetensors"
    save_file({"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768)}, str(clip))
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, str(sd_vae))   # an SD VAE: no use to Flux
    save_file({"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)}, str(ae))

    def missing(module_files: list[Path]) -> str:
        rows = {row[0]: row[-1] for row in handlers.model_rows(inventory, [str(p) for p in module_files])}
        assert rows["tiny-flux-dev-bf16.safetensors"] == rows["flux1-dev-Q8_0.gguf"]   # every Flux transformer
        return rows["flux1-dev-Q8_0.gguf"]

    assert get_buttons(missing([clip, sd_vae])) == {"t5xxl": "t5xxl-fp8", "ae": "ae"}
    assert get_buttons(missing([clip, sd_vae, ae])) == {"t5xxl": "t5xxl-fp8"}
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
    titles = ", ".join(pairing.PART_TITLES[p] for p in nothing.missing)
    assert f"Missing: {titles}. Download under Get a model (" in nothing.message
    for part in nothing.missing:   # each part names the catalog entries that provide it, to download on the page
        assert {"clip_l", "t5xxl-fp8", "ae"} & {e.key for e in handlers.catalog.for_part(part)}
        assert all(e.key in nothing.message for e in handlers.catalog.for_part(part))
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


SOURCE = "models/Stable-diffusion/tiny-flux-dev-bf16.safetensors"


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes()[:64] for p in folder.iterdir() if p.is_file()}


def test_convert_job_reports_progress_and_writes_a_gguf_the_reference_reads(models):
    listing = handlers.new_listing([str(models)])
    listing.rescan()
    source = handlers.find_convertible(listing, SOURCE)
    runner = jobs.JobRunner(limits={"convert": jobs.Limit(2, 0)})
    out = models / "Stable-diffusion" / "out-Q8_0.gguf"
    job = handlers.start_convert(runner, source, "Q8_0", name="out-Q8_0", listing=listing)
    with pytest.raises(jobs.JobConflict):
        handlers.start_convert(runner, source, "Q8_0", name="out-Q8_0.gguf")   # same target while running
    job = runner.wait(job.id, 60)
    assert job.state == jobs.DONE, job.result
    assert job.result.startswith("wrote models/Stable-diffusion/out-Q8_0.gguf: Q8_0")   # no server path
    assert any("tensors —" in text for text in job.history)
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q8_0"}
    assert "100%" in handlers.jobs_html(runner, "convert", [job.id]) and job.result in handlers.jobs_html(
        runner, "convert", [job.id])
    assert job.result not in handlers.jobs_html(runner, "convert")   # another visitor sees title and progress only
    assert not list((models / "Stable-diffusion").glob(".*"))   # no hidden temp file left
    out.unlink()


def test_convert_onto_an_existing_file_is_completed_from_the_page(models):
    """The page offers an output name and "Replace an existing file"; nothing is ever written outside the source's
    folder, and an existing file is replaced only when asked."""
    listing = handlers.new_listing([str(models)])
    listing.rescan()
    source = handlers.find_convertible(listing, SOURCE)
    folder = models / "Stable-diffusion"
    existing = folder / "tiny-flux-dev-Q8_0.gguf"
    existing.write_bytes(b"the user's own file")
    before = _folder_files(folder)
    runner = jobs.JobRunner()
    with pytest.raises(FluxqError, match="already exists in models/Stable-diffusion: tick 'Replace an existing file' "
                                         "or give another output name"):
        handlers.start_convert(runner, source, "Q8_0")
    for bad in ("../elsewhere.gguf", "/tmp/x.gguf", "sub/x.gguf", ".hidden.gguf", "x\\y.gguf", "a:b.gguf"):
        with pytest.raises(FluxqError, match="plain file name"):
            handlers.start_convert(runner, source, "Q8_0", name=bad)
    with pytest.raises(FluxqError, match="ending"):
        handlers.start_convert(runner, source, "Q8_0", name="x.safetensors")
    with pytest.raises(FluxqError, match="the source itself"):   # NF4 is written as .safetensors, like the source
        handlers.start_convert(runner, source, "nf4", name="tiny-flux-dev-bf16.safetensors", replace=True)
    assert _folder_files(folder) == before and runner.jobs() == []
    job = runner.wait(handlers.start_convert(runner, source, "Q8_0", replace=True).id, 60)
    assert job.state == jobs.DONE, job.result
    assert {t.tensor_type.name for t in gguf.GGUFReader(existing).tensors} >= {"Q8_0"}
    job = runner.wait(handlers.start_convert(runner, source, "Q8_0", name="my flux").id, 60)
    assert job.state == jobs.DONE and (folder / "my flux.gguf").exists(), job.result
    for made in ("my flux.gguf", existing.name):
        (folder / made).unlink()


def test_a_file_that_appears_during_conversion_is_not_overwritten(models, monkeypatch):
    """The check before the job and the final rename are apart in time: the publish step refuses a file that
    appeared meanwhile (a hard link fails on an existing name), and leaves no temp file."""
    listing = handlers.new_listing([str(models)])
    listing.rescan()
    source = handlers.find_convertible(listing, SOURCE)
    target = models / "Stable-diffusion" / "race-Q8_0.gguf"
    convert = handlers.optional("lib_fluxq.convert")
    real = convert.convert_file

    def convert_then_race(*args, **kwargs):
        result = real(*args, **kwargs)
        target.write_bytes(b"written by someone else meanwhile")
        return result

    monkeypatch.setattr(convert, "convert_file", convert_then_race)
    runner = jobs.JobRunner()
    job = runner.wait(handlers.start_convert(runner, source, "Q8_0", name="race-Q8_0.gguf").id, 60)
    assert job.state == jobs.FAILED and "appeared while converting and was not replaced" in job.result
    assert target.read_bytes() == b"written by someone else meanwhile"
    assert not list(target.parent.glob(".*"))
    target.unlink()


def test_cancelled_convert_leaves_no_file(models):
    listing = handlers.new_listing([str(models)])
    listing.rescan()
    source = handlers.find_convertible(listing, SOURCE)
    runner = jobs.JobRunner()
    before = _folder_files(models / "Stable-diffusion")
    job = handlers.start_convert(runner, source, "Q4_K", name="cancelled")
    job.cancel.set()
    job = runner.wait(job.id, 60)
    assert job.state == jobs.CANCELLED
    assert _folder_files(models / "Stable-diffusion") == before


def test_download_job_lands_in_the_catalog_folder(models, monkeypatch):
    from tests.test_download import FakeHub
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        data = b"vae bytes" * 1000
        hub.add("black-forest-labs/FLUX.1-schnell", "ae.safetensors", data)
        host = StandaloneHost(str(models))
        runner = jobs.JobRunner()
        job = runner.wait(handlers.start_download(runner, "ae", host.folders(),
                                                  listing=handlers.new_listing(host.scan_paths())).id, 30)
        assert job.state == jobs.DONE, job.result
        assert job.result.startswith("saved models/VAE/ae.safetensors (")
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
    once = handlers.new_listing([str(models)]).rescan()
    twice = handlers.new_listing([str(models), str(models / "Stable-diffusion")]).rescan()
    assert sorted(f.real for f in twice) == sorted(f.real for f in once)


def test_listing_refuses_what_it_did_not_list_before_opening_anything(tmp_path, monkeypatch):
    """Names from the page are labels of the last scan. Absolute paths, ``..``, a link leading out of a model
    folder, a non-model or broken file inside one and names never listed are refused with one line that repeats no
    byte of any file, and without a single file being opened (so nothing leaks about files elsewhere)."""
    from lib_fluxq import inspect
    from lib_fluxq.ui.listing import Listing
    models = tmp_path / "models"
    folder = models / "Stable-diffusion"
    folder.mkdir(parents=True)
    (models / "VAE").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = write_safetensors(elsewhere / "flux-dev-bf16.safetensors",
                                random_flux_state_dict(SMALL_FLUX, dtype=torch.bfloat16))
    secret = elsewhere / "passwd"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    write_safetensors(folder / "good-flux-dev-bf16.safetensors", random_flux_state_dict(SMALL_FLUX,
                                                                                         dtype=torch.bfloat16))
    (folder / "escape.safetensors").symlink_to(outside)
    (folder / "passwd.safetensors").symlink_to(secret)
    (folder / "notes.txt").write_bytes(secret.read_bytes())
    (folder / "broken.safetensors").write_bytes(secret.read_bytes())
    read: list[str] = []
    listing = Listing([str(models)], inspect.iter_model_files,
                      lambda path: (read.append(os.path.realpath(path)), inspect.inspect_file(path))[1])
    files = {f.label: f for f in listing.rescan()}
    assert str(outside) not in read and str(secret) not in read   # links leading out are listed, never read
    assert files["models/Stable-diffusion/escape.safetensors"].status == "outside"
    assert [f.status for f in listing.files()][-3:] != ["ok"] * 3 and listing.files()[0].status == "ok"

    opened: list[str] = []
    real_open, real_os_open = open, os.open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: (opened.append(str(file)), real_open(file, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda file, *a, **k: (opened.append(str(file)), real_os_open(file, *a, **k))[1])
    crafted = [str(outside), str(secret), "/etc/passwd", "models/Stable-diffusion/../../elsewhere/passwd",
               f"{folder}/../../elsewhere/flux-dev-bf16.safetensors", "models/Stable-diffusion/escape.safetensors",
               "models/Stable-diffusion/passwd.safetensors", "models/Stable-diffusion/notes.txt",
               "models/Stable-diffusion/broken.safetensors", "models/Stable-diffusion/never-listed.gguf",
               str(folder / "good-flux-dev-bf16.safetensors"),   # a listed file, but by path: not a label
               "", None, 42, ["models/Stable-diffusion/good-flux-dev-bf16.safetensors"], "x" * 5000 + "\n<b>"]
    for value in crafted:
        with pytest.raises(RefusedPath) as refused:
            handlers.find_convertible(listing, value)
        message = str(refused.value)
        assert "\n" not in message and len(message) < 300, message
        assert "root:x" not in message and str(tmp_path) not in message, message
    assert opened == []
    assert handlers.find_convertible(listing, "models/Stable-diffusion/good-flux-dev-bf16.safetensors").real == \
        str(folder / "good-flux-dev-bf16.safetensors")
    # replaced by a link to elsewhere after the scan: refused when used
    (folder / "good-flux-dev-bf16.safetensors").unlink()
    (folder / "good-flux-dev-bf16.safetensors").symlink_to(outside)
    with pytest.raises(RefusedPath, match="no longer a file in the model folders"):
        handlers.find_convertible(listing, "models/Stable-diffusion/good-flux-dev-bf16.safetensors")
    assert opened == []


def test_recommendation_is_plain_first_with_the_numbers_one_click_away_and_no_flags():
    """Every text the tab renders from the advisor names fields and sections, never command-line flags; LoRA
    advice follows the installed hook (Forge's own mode cannot re-quantize K-quants / Q4_1 / Q5_1; fluxq's can)."""
    from lib_fluxq import advisor
    flag = re.compile(r"(?<![\w-])--?[a-z][\w-]*|python -m")
    pages = []
    for vram, gpu in ((None, ""), (4, ""), (6, ""), (8, ""), (12, "RTX 9999"), (16, "RTX 4060 Ti"), (24, "")):
        plan = handlers.make_plan(cpu_machine(), gpu, vram, None)
        advice = handlers.advise(plan)
        for mode in (None, "requant", "online", "off"):
            page = handlers.recommendation_html(advice, plan, mode)
            pages.append(page)
            text = re.sub(r"<[^>]+>", " ", page)
            assert not flag.search(html_unescape(text)), (vram, flag.search(html_unescape(text)))
            if advice.recommended.value is None:
                continue
            plain, numbers = page.split('<details class="fluxq-numbers">')
            assert advice.summary in plain and str(advice.gpu_weights_mb.value) in plain
            assert advice.gpu_weights_mb.reason.split(";")[0] not in plain   # the why is one click away
            assert str(advice.gpu_weights_mb.numbers["reserve_mb"]) in numbers
            level = advisor.LEVELS[advice.recommended.value]
            assert "cannot re-quantize" not in page or mode == "off"
            if not level.lora_patch:
                expected = {None: f"LoRA works on {level.name} in Forge with fluxq installed",
                            "requant": f"LoRA works on {level.name}: fluxq re-quantizes",
                            "online": f"LoRA works on {level.name}: this WebUI applies it in fp16",
                            "off": "turn on 'GGUF + LoRA: re-quantize every type' in Settings"}[mode]
                assert expected in html_unescape(page), (mode, page)
    assert any("LoRA works on" in p for p in pages)   # the plans above include levels Forge alone cannot patch


def html_unescape(text: str) -> str:
    import html
    return html.unescape(text)


def test_missing_parts_get_the_file_the_free_ram_affords():
    """T5-XXL: fp8 below the family table's free-RAM threshold, fp16 from it; parts without one: the default."""
    t5 = families.companion("t5xxl")
    threshold = t5.full_precision_min_free_ram
    assert threshold is not None
    small = handlers.part_download("t5xxl", threshold - 1)
    full = handlers.part_download("t5xxl", threshold)
    assert small.part == full.part == "t5xxl"
    assert small.level.lower() not in handlers.FULL_PRECISION and full.level.lower() in handlers.FULL_PRECISION
    assert handlers.part_download("ae").filename == families.companion("ae").downloads[0].path
    cell = handlers.missing_cell(["t5xxl", "ae"], threshold)
    assert get_buttons(cell) == {"t5xxl": full.key, "ae": handlers.catalog.for_part("ae")[0].key}


def test_comparison_from_the_tab_names_no_command_line_flag(tmp_path):
    """A comparison started from the tab: the plot's every text (title, axes, labels) and the table's cells name
    no command-line flag; the plot file is written where the tab asked."""
    from lib_fluxq import compare
    flag = re.compile(r"(?<![\w-])--?[a-z][\w-]*|python -m")
    runner = jobs.JobRunner()
    plot = tmp_path / "plot.png"
    job = runner.wait(handlers.start_compare(runner, None, "Q8_0,Q4_1", str(plot)).id, 600)
    assert job.state == jobs.DONE, job.result
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = compare.build_figure(job.payload)
    texts = [a.get_text() for a in figure.findobj(lambda a: hasattr(a, "get_text")) if a.get_text()]
    assert any("error vs size" in t for t in texts)
    assert not [t for t in texts if flag.search(t)], texts
    rows = handlers.compare_rows(job.payload)
    assert [r[0] for r in rows] == ["Q8_0", "Q4_1"]
    assert not [c for r in rows for c in r if flag.search(c)], rows


def test_the_plan_uses_the_hosts_profile() -> None:
    """In Neo the tab plans with the advisor's Neo profile: Kontext edits there, Forge loads it as plain dev."""
    detected = cpu_machine()
    warnings = {}
    for host in ("forge", "neo"):
        plan = handlers.make_plan(detected, "RTX 4060 Ti", 16, 32, "1024x1024", "kontext", host)
        assert plan.host == host
        warnings[host] = " ".join(handlers.advise(plan).warnings)
    assert "does not run FLUX.1 Kontext" in warnings["forge"] and "Kontext" not in warnings["neo"]
