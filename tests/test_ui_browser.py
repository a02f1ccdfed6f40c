"""The Flux Quant tab in a real browser: Debian's chromium driven by Playwright against ``python -m lib_fluxq ui``.

The app runs as its own process on 127.0.0.1 with a test models folder (small Flux GGUFs written by gguf-py + ggml,
three of them extended with a sparse tail to the published FLUX.1-dev sizes so the verdicts are those of real files;
a BF16 safetensors to convert) and HF_ENDPOINT pointing at tests.test_download.FakeHub. What the page must show is
computed here from the engine (advisor, inspector) and from the reference readers (gguf-py), not hard-coded.
Nothing may leave the machine (every request off 127.0.0.1 is refused and counted) and the console must stay free
of errors and warnings. Screenshots at 1280 and 420 px wide go to out/ui/ (gitignored); at 420 px the tables must
scroll inside the page, not widen or cut it. Skips when chromium or playwright is missing.
Install for CI: ``apt-get install -y chromium`` (playwright comes from requirements-test.txt; no browser download).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "ui"
# Published FLUX.1-dev GGUF sizes (bytes): the inspector reads the real header, the advisor judges the real size.
SIZED = {"flux1-dev-Q8_0.gguf": ("Q8_0", 12_700_000_000), "flux1-dev-Q4_0.gguf": ("Q4_0", 6_790_000_000),
         "flux1-dev-Q2_K.gguf": ("Q2_K", 4_030_000_000)}
# Other families, header-faithful at full size (tests/family_files.py, data sparse): file -> (family key, title the
# models table shows, the parts it needs), typed here.
OTHER_FAMILIES = {"flux-2-klein-4b-Q8_0.gguf": ("flux2-klein-4b", "FLUX.2 [klein] 4B", ["qwen3_4b", "flux2_vae"]),
                  "chroma1-hd-Q8_0.gguf": ("chroma", "Chroma", ["t5xxl", "ae"])}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)", allow_module_level=True)
# playwright and gradio are pinned in requirements-test.txt: a missing one is an error, never a skip
from playwright import sync_api  # noqa: E402

from tests.test_download import FakeHub  # noqa: E402  (after the skips: needs nothing else)
from tests.ui_app import app_env, running_app  # noqa: E402

WIDE, NARROW = 1280, 420


def _build_models(root: Path) -> None:
    import gguf
    import torch

    from tests.fixtures import SMALL_FLUX, random_flux_state_dict, recipe_qtype, write_gguf, write_safetensors
    checkpoints = root / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    (root / "text_encoder").mkdir()
    (root / "VAE").mkdir()
    for name, (level, size) in SIZED.items():
        path = checkpoints / name
        write_gguf(path, random_flux_state_dict(SMALL_FLUX), recipe_qtype(gguf.GGMLQuantizationType[level]))
        os.truncate(path, size)   # sparse: no disk space used
    write_safetensors(checkpoints / "tiny-flux-dev-bf16.safetensors",
                      random_flux_state_dict(SMALL_FLUX, dtype=torch.bfloat16))
    from lib_fluxq.flux import CHROMA_HD, FLUX2_KLEIN_4B
    from tests import family_files as ff
    q8 = gguf.GGMLQuantizationType.Q8_0
    ff.write_sparse_gguf(checkpoints / "flux-2-klein-4b-Q8_0.gguf", ff.flux_gguf_specs(FLUX2_KLEIN_4B, q8), "flux")
    ff.write_sparse_gguf(checkpoints / "chroma1-hd-Q8_0.gguf", ff.flux_gguf_specs(CHROMA_HD, q8), "flux")


def _clip_l_bytes() -> bytes:
    """A small file with CLIP-L's key layout (width 768), as the Hub would serve clip_l.safetensors."""
    import torch
    from safetensors.torch import save

    return save({"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768),
                 "text_model.embeddings.token_embedding.weight": torch.randn(1400, 768)})   # ~4 MB: a few reads


def _vae_bytes(channels: int = 16) -> bytes:
    """A small file with a VAE's decoder input: 16 latent channels for FLUX.1's ae, 32 for the FLUX.2 VAE."""
    import torch
    from safetensors.torch import save
    return save({"decoder.conv_in.weight": torch.randn(512, channels, 3, 3)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = tmp_path_factory.mktemp("webui") / "models"
    _build_models(models)
    clip = _clip_l_bytes()
    with FakeHub(chunk=32 * 1024, delay=0.02) as hub:   # slow enough (~2.5 s) for progress to be seen
        hub.add("comfyanonymous/flux_text_encoders", "clip_l.safetensors", clip)
        from lib_fluxq import catalog
        vae = catalog.get("ae")
        ae = _vae_bytes(16)
        hub.add(vae.repo, vae.filename, ae)
        vae2 = catalog.for_part("flux2_vae")[0]
        ae2 = _vae_bytes(32)
        hub.add(vae2.repo, vae2.filename, ae2)
        with running_app(models, app_env(hub.url), models.parent / "app.log") as (url, _):
            yield {"url": url, "models": models, "log": models.parent / "app.log", "hub": hub, "clip": clip,
                   "ae": ae, "flux2_vae": (vae2, ae2)}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield chromium
        chromium.close()


def _open(browser, url: str, width: int):
    """A page at ``width`` px that may not reach anything but 127.0.0.1 (counted in ``page.outside``) and records
    every console error and warning and every uncaught exception (``page.problems``)."""
    context = browser.new_context(viewport={"width": width, "height": 1000})
    outside: list[str] = []
    context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"),
                  lambda route: (outside.append(route.request.url), route.abort()))
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_selector("#fluxq_summary, #fluxq_recommendation .fluxq-note", timeout=60_000)
    page.problems, page.outside = problems, outside
    return context, page


@pytest.fixture(scope="module")
def page(setup, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context, page = _open(browser, setup["url"], WIDE)
    yield page
    context.close()


def _expected_plan(models: Path, vram_gb: float | None):
    from lib_fluxq import advisor, inspect
    from lib_fluxq.hardware import detect, with_overrides
    from lib_fluxq.ui import handlers
    hardware = with_overrides(detect(str(models)), vram_gb=vram_gb)
    files = advisor.files_from_reports(inspect.scan([str(models)]))
    advice = advisor.advise(hardware, files=files)
    verdicts = {v.name: handlers.verdict_text(v) for v in advisor.Planner(hardware).rank_files(files)}
    return advice, verdicts


def _own_verdict(models: Path, name: str, family: str, vram_gb: float) -> str:
    """The advisor's verdict on file ``name`` planned as its own ``family`` (the inspector reads its level)."""
    from lib_fluxq import advisor, inspect
    from lib_fluxq.hardware import detect, with_overrides
    from lib_fluxq.ui import handlers
    hardware = with_overrides(detect(str(models)), vram_gb=vram_gb)
    (report,) = [r for r in inspect.scan([str(models)]) if r.path.endswith(name)]
    (verdict,) = advisor.Planner(hardware, model=family).rank_files(
        [advisor.ModelFile(name, report.level, report.file_size, family)])
    return handlers.verdict_text(verdict)


def _gets(page, file_name: str) -> dict[str, str]:
    """The "Get ..." buttons of a file's missing parts in the models table: part -> catalog key."""
    row = page.locator("#fluxq_models tbody tr", has=page.locator(f"td:text-is('{file_name}')"))
    cell = row.locator(".fluxq-missing")
    if not cell.count():
        return {}
    parts = cell.get_attribute("data-parts").split(",")
    keys = [b.get_attribute("data-fluxq-download") for b in cell.locator("[data-fluxq-download]").all()]
    return dict(zip(parts, keys, strict=True))


def _table(page, selector: str) -> list[dict[str, str]]:
    header = page.locator(f"{selector} thead th").all_inner_texts()
    rows = []
    for row in page.locator(f"{selector} tbody tr").all():
        rows.append(dict(zip(header, row.locator("td").all_inner_texts(), strict=True)))
    return rows


def _watch(page, selector: str) -> None:
    """Record every text the element takes (progress can be brief on small test files)."""
    page.evaluate("""(sel) => {
        window.fluxqSeen = window.fluxqSeen || {};
        const seen = window.fluxqSeen[sel] = [];
        const el = document.querySelector(sel);
        new MutationObserver(() => seen.push(el.innerText)).observe(el, {subtree: true, childList: true,
                                                                         characterData: true});
    }""", selector)


def test_page_loads_offline_without_console_errors_or_warnings(page):
    page.wait_for_timeout(1000)   # late requests (fonts, scripts loaded async) would show up by now
    page.screenshot(path=str(SHOTS / "loaded.png"), full_page=True)
    assert page.title() == "Flux Quant"
    assert page.outside == [] and page.problems == [], (page.outside, page.problems)
    # the plain plan first; the advisor's reasons and numbers one click away
    numbers = page.locator("#fluxq_recommendation details.fluxq-numbers")
    if numbers.count():
        assert not numbers.locator("table").is_visible()
        numbers.locator("summary").click()
        assert numbers.locator("table").is_visible()


def test_vram_override_changes_the_recommendation_and_the_verdicts(page, setup):
    before = page.locator("#fluxq_summary").inner_text()
    expected, verdicts = _expected_plan(setup["models"], vram_gb=8)
    page.locator("#fluxq_vram input").fill("8")
    page.locator("#fluxq_plan").click()
    page.wait_for_function("(old) => { const s = document.querySelector('#fluxq_summary'); "
                           "return s && s.innerText !== old; }", arg=before, timeout=30_000)
    summary = page.locator("#fluxq_summary").inner_text()
    assert expected.recommended.value in summary and f"GPU Weights {expected.gpu_weights_mb.value} MB" in summary
    assert summary != before
    rows = {r["file"]: r for r in _table(page, "#fluxq_models")}
    assert set(rows) == {*SIZED, *OTHER_FAMILIES, "tiny-flux-dev-bf16.safetensors"}
    from lib_fluxq import catalog, families
    for name, (level, _) in SIZED.items():
        assert rows[name]["level"] == level and rows[name]["family"] == families.FAMILIES["flux-dev"].title
        assert rows[name]["verdict"] == verdicts[name], name
        gets = _gets(page, name)   # each part the family table says FLUX.1 needs, with a button for its file
        assert list(gets) == list(families.FAMILIES["flux-dev"].companions), gets
        assert all(catalog.get(key).part == part for part, key in gets.items()), gets
    for name, (family, title, parts) in OTHER_FAMILIES.items():   # each judged as its own family, its own parts
        assert rows[name]["family"] == title and rows[name]["level"] == "Q8_0", rows[name]
        assert rows[name]["verdict"] == _own_verdict(setup["models"], name, family, vram_gb=8), rows[name]
        gets = _gets(page, name)
        assert list(gets) == parts and all(catalog.get(key).part == part for part, key in gets.items()), gets
    assert {r["verdict"].split()[0] for r in rows.values()} >= {"fits", "offloads"}
    page.screenshot(path=str(SHOTS / "planned-8gb.png"), full_page=True)
    text = page.locator("#fluxq_root").inner_text()
    assert not re.search(r"(?<![\w-])--[a-z]|python -m", text), re.search(r"(?<![\w-])--[a-z]|python -m", text)
    assert page.problems == []


def test_conversion_runs_to_completion_with_visible_progress(page, setup):
    import gguf
    source = setup["models"] / "Stable-diffusion" / "tiny-flux-dev-bf16.safetensors"
    output = source.with_name("tiny-flux-dev-Q8_0.gguf")
    _watch(page, "#fluxq_convert_jobs")
    assert page.locator("#fluxq_convert_src input").input_value().endswith(source.name)
    target = page.locator("#fluxq_convert_type input")   # Q8_0: quick to quantize on a busy CPU
    target.click()
    target.fill("Q8_0")
    page.locator("ul.options li", has_text="Q8_0").first.click()
    page.wait_for_function("() => document.querySelector('#fluxq_convert_name textarea, #fluxq_convert_name input')"
                           ".placeholder === 'tiny-flux-dev-Q8_0.gguf'", timeout=30_000)   # the suggested name
    page.locator("#fluxq_convert_btn").click()
    page.wait_for_selector("#fluxq_convert_jobs [data-state=done]", timeout=300_000)
    seen = page.evaluate("window.fluxqSeen['#fluxq_convert_jobs']")
    progress = [int(m.group(1)) for text in seen for m in [re.search(r"(\d+)%", text)] if m]
    assert progress and progress[-1] == 100 and any(p < 100 for p in progress), seen[:5]
    assert any(re.search(r"\d+/\d+ tensors", text) for text in seen)
    reader = gguf.GGUFReader(output)   # the reference reader opens what the tab wrote
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q8_0" in types
    page.locator("#fluxq_convert_jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "converted.png"), full_page=True)
    page.wait_for_function("(f) => document.querySelector('#fluxq_models').innerText.includes(f)", arg=output.name,
                           timeout=30_000)
    rows = {r["file"]: r for r in _table(page, "#fluxq_models")}
    assert rows[output.name]["level"].startswith("Q8_0")
    assert page.problems == []


def _convert_and_wait(page) -> str:
    """Click Convert; the text of the new job once it is done."""
    newest = max([int(j.get_attribute("data-job")) for j in page.locator("#fluxq_convert_jobs .fluxq-job").all()]
                 or [0])
    page.locator("#fluxq_convert_btn").click()
    job = page.locator(f"#fluxq_convert_jobs .fluxq-job[data-job='{newest + 1}'][data-state='done']")
    job.wait_for(timeout=300_000)
    return job.inner_text()


def test_converting_onto_an_existing_file_completes_from_the_page(page, setup):
    """The output exists now: the page says how to go on, and both ways (replace, another name) finish there."""
    import gguf
    folder = setup["models"] / "Stable-diffusion"
    existing = folder / "tiny-flux-dev-Q8_0.gguf"
    before = existing.stat().st_mtime_ns
    page.locator("#fluxq_convert_btn").click()
    page.wait_for_selector("#fluxq_convert_msg .fluxq-error", timeout=30_000)
    page.wait_for_timeout(3000)   # the job list's watcher has answered by now: the message is not in its element
    message = page.locator("#fluxq_convert_msg .fluxq-error").inner_text()
    assert message == ("tiny-flux-dev-Q8_0.gguf already exists in models/Stable-diffusion: tick 'Replace an existing "
                       "file' or give another output name"), message
    assert existing.stat().st_mtime_ns == before
    name = page.locator("#fluxq_convert_name textarea, #fluxq_convert_name input").first
    name.fill("my-flux-q8")
    assert "wrote models/Stable-diffusion/my-flux-q8.gguf: Q8_0" in _convert_and_wait(page)
    assert page.locator("#fluxq_convert_msg .fluxq-error").count() == 0   # a start clears the message
    assert "Q8_0" in {t.tensor_type.name for t in gguf.GGUFReader(folder / "my-flux-q8.gguf").tensors}
    name.fill("")
    page.locator("#fluxq_convert_replace input").check()
    inode = existing.stat().st_ino
    assert "wrote models/Stable-diffusion/tiny-flux-dev-Q8_0.gguf: Q8_0" in _convert_and_wait(page)
    assert existing.stat().st_ino != inode   # replaced by the new file in one step
    page.locator("#fluxq_convert_replace input").uncheck()
    assert page.problems == []


def test_download_from_the_hub_lands_in_the_right_folder(page, setup):
    target = setup["models"] / "text_encoder" / "clip_l.safetensors"
    _watch(page, "#fluxq_dl_jobs")
    key = page.locator("#fluxq_dl_key input")
    key.click()
    key.fill("clip_l.safetensors")   # the list shows what each file is; the server gets the catalog key
    page.locator("ul.options li", has_text="clip_l.safetensors").first.click()
    page.locator("#fluxq_dl_btn").click()
    page.wait_for_selector("#fluxq_dl_jobs [data-state=done]", timeout=60_000)
    assert target.read_bytes() == setup["clip"]
    seen = page.evaluate("window.fluxqSeen['#fluxq_dl_jobs']")
    assert any(re.search(r"\d+\.\d MB of", text) for text in seen), seen[:5]
    assert [r[1] for r in setup["hub"].requests if r[0] == "GET"] and \
        all("clip_l.safetensors" in r[1] or r[1].startswith("/cdn/") for r in setup["hub"].requests)
    page.wait_for_function("() => document.querySelector('#fluxq_models').innerText.includes('clip_l.safetensors')",
                           timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#fluxq_models [data-fluxq-download=\"clip_l\"]')",
                           timeout=30_000)
    for name in SIZED:   # the Flux files now pair with the downloaded CLIP-L; T5 and the VAE are still to get
        assert list(_gets(page, name)) == ["t5xxl", "ae"], name
    for name, (_, _, parts) in OTHER_FAMILIES.items():   # CLIP-L is not theirs: Chroma and Klein need what they did
        assert list(_gets(page, name)) == parts, name
    page.locator("#fluxq_dl_jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "downloaded.png"), full_page=True)
    assert page.problems == []


def test_get_button_of_a_missing_part_downloads_it(page, setup):
    """"Get Flux VAE" next to a checkpoint's missing parts downloads the family table's VAE into models/VAE; the
    row then needs only T5."""
    from lib_fluxq import catalog
    target = setup["models"] / "VAE" / catalog.get("ae").basename
    name = next(iter(SIZED))
    page.locator("#fluxq_models").scroll_into_view_if_needed()
    page.locator("#fluxq_models tbody tr", has=page.locator(f"td:text-is('{name}')")).locator(
        "[data-fluxq-download='ae']").click()
    page.wait_for_function("() => document.querySelector('#fluxq_dl_jobs').innerText.includes('saved models/VAE/')",
                           timeout=60_000)
    assert target.read_bytes() == setup["ae"]
    page.wait_for_function("() => !document.querySelector('#fluxq_models [data-fluxq-download=\"ae\"]')",
                           timeout=30_000)
    assert list(_gets(page, name)) == ["t5xxl"]
    assert list(_gets(page, "chroma1-hd-Q8_0.gguf")) == ["t5xxl"]   # FLUX.1's VAE is Chroma's too
    assert list(_gets(page, "flux-2-klein-4b-Q8_0.gguf")) == ["qwen3_4b", "flux2_vae"]   # ... not FLUX.2's
    page.screenshot(path=str(SHOTS / "got-part.png"), full_page=True)
    assert page.problems == []


def test_get_button_of_a_flux2_part_downloads_it(page, setup):
    """"Get FLUX.2 VAE" in the Klein row: the FLUX.2 VAE lands in models/VAE; Klein then needs only its Qwen3-4B,
    and the FLUX.1 / Chroma rows are unchanged (a 32-channel VAE is not theirs)."""
    entry, data = setup["flux2_vae"]
    name = "flux-2-klein-4b-Q8_0.gguf"
    before = {n: list(_gets(page, n)) for n in [*SIZED, "chroma1-hd-Q8_0.gguf"]}
    page.locator("#fluxq_models tbody tr", has=page.locator(f"td:text-is('{name}')")).locator(
        f"[data-fluxq-download='{entry.key}']").click()
    page.wait_for_function("(f) => document.querySelector('#fluxq_dl_jobs').innerText.includes("
                           "'saved models/VAE/' + f)", arg=entry.basename, timeout=60_000)
    assert (setup["models"] / "VAE" / entry.basename).read_bytes() == data
    page.wait_for_function(f"() => !document.querySelector('#fluxq_models [data-fluxq-download=\"{entry.key}\"]')",
                           timeout=30_000)
    assert list(_gets(page, name)) == ["qwen3_4b"]
    assert {n: list(_gets(page, n)) for n in before} == before
    assert page.problems == []


def test_preset_buttons_write_txt2img_size_fields(page):
    """fluxq.js against stand-ins for the WebUI's #txt2img_width/#txt2img_height number+slider inputs."""
    page.evaluate("""() => {
        for (const id of ['txt2img_width', 'txt2img_height']) {
            const box = document.createElement('div'); box.id = id;
            box.innerHTML = '<input type="number" value="512"><input type="range" min="64" max="2048" value="512">';
            box.addEventListener('input', (e) => { box.dataset.events = (+(box.dataset.events || 0) + 1); });
            document.body.appendChild(box);
        }
    }""")
    button = page.locator("#fluxq_recommendation [data-fluxq-size]").first
    width, height = button.get_attribute("data-fluxq-size").split("x")
    button.click()
    values = page.evaluate("""() => ['txt2img_width', 'txt2img_height'].map(id =>
        [...document.querySelectorAll('#' + id + ' input')].map(i => i.value).concat(
        [document.getElementById(id).dataset.events]))""")
    assert values == [[width, width, "2"], [height, height, "2"]]
    status = button.locator("xpath=..").locator(".fluxq-size-status").inner_text()
    assert status == f"txt2img / img2img size set to {width}×{height}", status
    assert page.problems == []


def test_narrow_screen_tables_scroll_inside_the_page(setup, browser):
    """At 420 px (a phone) the page does not scroll sideways; each wide table scrolls inside its own box."""
    context, page = _open(browser, setup["url"], NARROW)
    try:
        page.locator("#fluxq_catalog summary").click()   # the catalog, one click away
        page.screenshot(path=str(SHOTS / "narrow-420.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= NARROW
        boxes = page.evaluate("""() => [...document.querySelectorAll('#fluxq_root .fluxq-scroll')].map(box => {
            const r = box.getBoundingClientRect(), t = box.querySelector('table');
            return {id: box.closest('[id]').id, left: r.left, right: r.right, client: box.clientWidth,
                    scroll: box.scrollWidth, table: t.getBoundingClientRect().width,
                    overflow: getComputedStyle(box).overflowX};
        })""")
        ids = {box["id"] for box in boxes}
        assert {"fluxq_models", "fluxq_catalog"} <= ids, ids
        for box in boxes:
            assert box["left"] >= 0 and box["right"] <= NARROW, box   # the box fits the screen
            assert box["overflow"] == "auto", box
        wide = [box for box in boxes if box["id"] in ("fluxq_models", "fluxq_catalog")]
        assert all(box["scroll"] > box["client"] for box in wide), wide   # ... and its table scrolls inside it
        catalog = page.locator("#fluxq_catalog .fluxq-scroll")
        catalog.evaluate("box => box.scrollLeft = box.scrollWidth")
        assert catalog.evaluate("box => box.scrollLeft") > 0
        page.locator("#fluxq_catalog").screenshot(path=str(SHOTS / "narrow-420-catalog-scrolled.png"))
        assert page.outside == [] and page.problems == [], (page.outside, page.problems)
    finally:
        context.close()


def test_screenshots_for_the_docs(setup, browser):
    """docs/tab.png (1280 px, 8 GB plan) and docs/tab-narrow.png (420 px) come from this run when
    FLUXQ_UPDATE_DOCS_SCREENSHOT=1."""
    if os.environ.get("FLUXQ_UPDATE_DOCS_SCREENSHOT") != "1":
        pytest.skip("set FLUXQ_UPDATE_DOCS_SCREENSHOT=1 to refresh docs/tab.png and docs/tab-narrow.png")
    for width, name, height in ((WIDE, "tab.png", 1100), (NARROW, "tab-narrow.png", 1400)):
        context, page = _open(browser, setup["url"], width)
        try:
            page.locator("#fluxq_vram input").fill("8")
            page.locator("#fluxq_plan").click()
            page.wait_for_selector("#fluxq_summary", timeout=60_000)
            page.wait_for_timeout(1500)
            shot = SHOTS / f"docs-{name}"
            page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": width, "height": height})
            shutil.copy(shot, ROOT / "docs" / name)
        finally:
            context.close()
