"""The Flux Quant tab in a real browser: Debian's chromium driven by Playwright against ``python -m lib_fluxq ui``.

The app runs as its own process on 127.0.0.1 with a test models folder (small Flux GGUFs written by gguf-py + ggml,
three of them extended with a sparse tail to the published FLUX.1-dev sizes so the verdicts are those of real files;
a BF16 safetensors to convert) and HF_ENDPOINT pointing at tests.test_download.FakeHub. What the page must show is
computed here from the engine (advisor, inspector) and from the reference readers (gguf-py), not hard-coded.
Screenshots go to out/ui/ (gitignored). Skips when chromium or playwright is missing.
Install for CI: ``apt-get install -y chromium`` (playwright comes from requirements-test.txt; no browser download).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
GRADIO_CDN = "https://cdnjs.cloudflare.com/ajax/libs/iframe-resizer/"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "ui"
# Published FLUX.1-dev GGUF sizes (bytes): the inspector reads the real header, the advisor judges the real size.
SIZED = {"flux1-dev-Q8_0.gguf": ("Q8_0", 12_700_000_000), "flux1-dev-Q4_0.gguf": ("Q4_0", 6_790_000_000),
         "flux1-dev-Q2_K.gguf": ("Q2_K", 4_030_000_000)}

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)", allow_module_level=True)
# playwright and gradio are pinned in requirements-test.txt: a missing one is an error, never a skip
from playwright import sync_api  # noqa: E402

from tests.test_download import FakeHub  # noqa: E402  (after the skips: needs nothing else)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _clip_l_bytes() -> bytes:
    """A small file with CLIP-L's key layout (width 768), as the Hub would serve clip_l.safetensors."""
    import torch
    from safetensors.torch import save

    return save({"text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768),
                 "text_model.embeddings.token_embedding.weight": torch.randn(1400, 768)})   # ~4 MB: a few reads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = tmp_path_factory.mktemp("webui") / "models"
    _build_models(models)
    clip = _clip_l_bytes()
    with FakeHub(chunk=32 * 1024, delay=0.02) as hub:   # slow enough (~2.5 s) for progress to be seen
        hub.add("comfyanonymous/flux_text_encoders", "clip_l.safetensors", clip)
        port = _free_port()
        env = dict(os.environ, HF_ENDPOINT=hub.url, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1",
                   PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost")
        env.pop("HF_HUB_OFFLINE", None)
        with open(models.parent / "app.log", "w") as log:
            yield from _run_app(models, port, env, log, {"hub": hub, "clip": clip})


def _run_app(models: Path, port: int, env: dict[str, str], log, extra: dict):
    app = subprocess.Popen([sys.executable, "-m", "lib_fluxq", "ui", "--models", str(models), "--port", str(port)],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("the app did not start:\n" + (models.parent / "app.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "models": models, "log": models.parent / "app.log", **extra}
    finally:
        app.terminate()
        try:
            app.wait(10)
        except subprocess.TimeoutExpired:
            app.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(setup, browser):
    SHOTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    # gradio's own page template loads iframe-resizer from cdnjs (no internet here): answer it with an empty
    # script, and fail on any other request that leaves this machine
    outside: list[str] = []
    context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: (
        outside.append(route.request.url),
        route.fulfill(status=200, content_type="application/javascript", body="")
        if route.request.url.startswith(GRADIO_CDN) else route.abort()))
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(setup["url"])
    page.wait_for_selector("#fluxq_summary, #fluxq_recommendation .fluxq-note", timeout=30_000)
    page.problems = problems
    page.outside = outside
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


def test_page_loads_without_console_errors(page):
    page.screenshot(path=str(SHOTS / "loaded.png"), full_page=True)
    assert page.title() == "Flux Quant"
    assert page.problems == []
    assert all(url.startswith(GRADIO_CDN) for url in page.outside), page.outside


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
    assert set(rows) == {*SIZED, "tiny-flux-dev-bf16.safetensors"}
    for name, (level, _) in SIZED.items():
        assert rows[name]["level"] == level and rows[name]["family"] == "flux-dev"
        assert rows[name]["verdict"] == verdicts[name], name
        assert rows[name]["missing parts"] == "clip_l, t5xxl, ae (see Get a model)"
    assert {r["verdict"].split()[0] for r in rows.values()} >= {"fits", "offloads"}
    page.screenshot(path=str(SHOTS / "planned-8gb.png"), full_page=True)
    assert page.problems == []


def test_conversion_runs_to_completion_with_visible_progress(page, setup):
    import gguf
    source = setup["models"] / "Stable-diffusion" / "tiny-flux-dev-bf16.safetensors"
    output = source.with_name("tiny-flux-dev-Q4_K.gguf")
    _watch(page, "#fluxq_convert_jobs")
    assert page.locator("#fluxq_convert_src input").input_value().endswith(source.name)
    page.locator("#fluxq_convert_btn").click()
    page.wait_for_selector("#fluxq_convert_jobs [data-state=done]", timeout=60_000)
    seen = page.evaluate("window.fluxqSeen['#fluxq_convert_jobs']")
    progress = [int(m.group(1)) for text in seen for m in [re.search(r"(\d+)%", text)] if m]
    assert progress and progress[-1] == 100 and any(p < 100 for p in progress), seen[:5]
    assert any(re.search(r"\d+/\d+ tensors", text) for text in seen)
    reader = gguf.GGUFReader(output)   # the reference reader opens what the tab wrote
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_K" in types
    page.locator("#fluxq_convert_jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "converted.png"), full_page=True)
    rows = {r["file"]: r for r in _table(page, "#fluxq_models")}
    page.wait_for_function("() => document.querySelector('#fluxq_models').innerText.includes('Q4_K.gguf')",
                           timeout=30_000)
    rows = {r["file"]: r for r in _table(page, "#fluxq_models")}
    assert rows[output.name]["level"].startswith("Q4_K")
    assert page.problems == []


def test_download_from_the_hub_lands_in_the_right_folder(page, setup):
    target = setup["models"] / "text_encoder" / "clip_l.safetensors"
    _watch(page, "#fluxq_dl_jobs")
    key = page.locator("#fluxq_dl_key input")
    key.click()
    key.fill("clip_l")
    page.locator("ul.options li", has_text="clip_l").first.click()
    page.locator("#fluxq_dl_btn").click()
    page.wait_for_selector("#fluxq_dl_jobs [data-state=done]", timeout=60_000)
    assert target.read_bytes() == setup["clip"]
    seen = page.evaluate("window.fluxqSeen['#fluxq_dl_jobs']")
    assert any(re.search(r"\d+\.\d MB of", text) for text in seen), seen[:5]
    assert [r[1] for r in setup["hub"].requests if r[0] == "GET"] and \
        all("clip_l.safetensors" in r[1] or r[1].startswith("/cdn/") for r in setup["hub"].requests)
    page.wait_for_function("() => document.querySelector('#fluxq_models').innerText.includes('clip_l.safetensors')",
                           timeout=30_000)
    rows = {r["file"]: r for r in _table(page, "#fluxq_models")}
    for name in SIZED:   # the Flux files now pair with the downloaded CLIP-L; T5 and the VAE are still to get
        assert rows[name]["missing parts"] == "t5xxl, ae (see Get a model)", rows[name]
    page.locator("#fluxq_dl_jobs").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "downloaded.png"), full_page=True)
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


def test_screenshot_for_the_docs(page):
    """docs/tab.png is taken from this run (8 GB plan) when FLUXQ_UPDATE_DOCS_SCREENSHOT=1."""
    if os.environ.get("FLUXQ_UPDATE_DOCS_SCREENSHOT") != "1":
        pytest.skip("set FLUXQ_UPDATE_DOCS_SCREENSHOT=1 to refresh docs/tab.png")
    page.evaluate("window.scrollTo(0, 0)")
    shot = SHOTS / "docs-tab.png"
    page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": 1400, "height": 1000})
    shutil.copy(shot, ROOT / "docs" / "tab.png")
