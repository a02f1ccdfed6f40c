"""Opt-in: the Flux Quant tab inside a REAL Forge, driven in a real browser (Debian chromium + Playwright).

Skipped unless FORGE_DIR is set (prepare Forge as FORGE_NOTES §9 says) and chromium + playwright are present. Builds
the random-weight models of tests/real_forge.py: the full-shape FLUX.1-dev Q2_K GGUF with clip_l / T5-XXL Q2_K / ae
modules, and an SD1.5 checkpoint that is the user's selection before the tab is used.

Checks, as a user would do it: the tab renders with no console error from our code and lists the Flux GGUF with its
level, family and nothing missing; "Use this" makes Forge select the Flux checkpoint, exactly the three paired
modules and the GPU Weights it reports (read back from /sdapi/v1/options, which Forge's own dropdowns use), and
writes the recommended size into txt2img's real Width/Height fields; then a preset size written by fluxq.js
(``fluxqSetSize``) followed by Forge's own Generate button renders a Flux image at that size — so the JS-set values
reach Forge's generation, not just the DOM. No traceback through our code. Screenshots in out/ui/forge-*.png.
Needs ~8 GB of disk (kept when FLUXQ_FORGE_TAB_DATA names a data dir), ~8 GB RAM and a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.real_forge import (
    GB,
    SD15_FIRST,
    URL,
    api,
    build_flux_models,
    build_sd15_models,
    model_data_dir,
    model_loads,
    our_tracebacks,
    requires_forge,
    running_forge,
)

pytestmark = requires_forge
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "out" / "ui"
GENERATE_SIZE = (64, 80)  # small enough for a 1-step Flux image on a CPU, and not square: width/height not swapped


def _browser_page(playwright):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    # nothing leaves this machine (gradio's template asks cdnjs for iframe-resizer; Forge's page fetches nothing else)
    context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    return browser, page, problems


def _set_number(page, elem_id: str, value: float) -> None:
    """A gradio slider's number box, typed into as a user would (fill fires input; blur commits)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def test_real_forge_tab_use_this_and_generate(tmp_path_factory: pytest.TempPathFactory) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    from playwright import sync_api  # pinned in requirements-test.txt: missing is an error
    SHOTS.mkdir(parents=True, exist_ok=True)
    with model_data_dir(tmp_path_factory, "FLUXQ_FORGE_TAB_DATA", "forge_tab") as data_dir:
        flux = build_flux_models(data_dir)
        sd15 = build_sd15_models(data_dir)
        with running_forge(data_dir) as (_, log_path):
            # the user had SD1.5 selected with no modules: everything Flux needs must come from "Use this"
            api("/sdapi/v1/options", {"sd_model_checkpoint": SD15_FIRST, "forge_additional_modules": []})
            with sync_api.sync_playwright() as playwright:
                browser, page, problems = _browser_page(playwright)
                try:
                    page.goto(URL, timeout=120_000)
                    page.wait_for_selector("#txt2img_generate", timeout=120_000)
                    page.get_by_role("tab", name="Flux Quant").click()
                    page.wait_for_selector("#fluxq_recommendation .fluxq-note", timeout=60_000)

                    rows = _models_table(page)
                    flux_row = rows[flux["flux"].name]
                    assert flux_row["level"] == "Q2_K" and flux_row["family"] == "FLUX.1 [dev]", flux_row
                    assert flux_row["missing parts"] == "none: pairs with " + ", ".join(
                        flux[part].name for part in ("clip", "t5", "ae")), flux_row
                    page.screenshot(path=str(SHOTS / "forge-tab.png"), full_page=True)

                    # this CPU-only machine has no GPU Weights to set: plan for an 8 GB card, as the tab allows
                    before = page.locator("#fluxq_recommendation").inner_text()
                    page.locator("#fluxq_vram input").fill("8")
                    page.locator("#fluxq_plan").click()
                    page.wait_for_function("(old) => document.querySelector('#fluxq_recommendation').innerText "
                                           "!== old", arg=before, timeout=60_000)
                    assert page.locator("#fluxq_use_choice input").input_value().endswith(flux["flux"].name)
                    page.locator("#fluxq_use").click()
                    page.wait_for_function("() => document.querySelector('#fluxq_use_result').innerText"
                                           ".includes('Selected: checkpoint')", timeout=60_000)
                    result = page.locator("#fluxq_use_result").inner_text()
                    page.locator("#fluxq_use_result").scroll_into_view_if_needed()
                    page.screenshot(path=str(SHOTS / "forge-use-this.png"), full_page=True)

                    options = api("/sdapi/v1/options")
                    assert options["sd_model_checkpoint"].startswith(flux["flux"].name), options["sd_model_checkpoint"]
                    assert sorted(Path(m).name for m in options["forge_additional_modules"]) == \
                        sorted(flux[part].name for part in ("clip", "t5", "ae")), options["forge_additional_modules"]
                    gpu_weights = re.search(r"GPU Weights (\d+) MB", result)
                    assert gpu_weights, result
                    # ... set in Forge's own GPU Weights slider too, and Forge holds total - GPU Weights as
                    # "inference memory" (main_entry.refresh_memory_management_settings)
                    gpu_slider = page.locator("div.block", has=page.locator("text=GPU Weights (MB)")).last
                    total_mb = int(gpu_slider.locator("input[type=range]").get_attribute("max"))
                    page.wait_for_function("(v) => [...document.querySelectorAll('input[aria-label$=\"GPU Weights "
                                           "(MB)\"]')].every(i => i.value === v)", arg=gpu_weights.group(1),
                                           timeout=30_000)
                    inference_mb = api("/sdapi/v1/options")["forge_inference_memory"]
                    assert inference_mb == total_mb - int(gpu_weights.group(1)), (inference_mb, total_mb, result)
                    # the recommended size landed in txt2img's real Width/Height (number box and slider alike)
                    status = page.locator("#fluxq_use_result .fluxq-size-status").inner_text()
                    assert "txt2img / img2img size set to" in status, status
                    width, height = re.search(r"(\d+)×(\d+)", status).groups()
                    assert _field_values(page, "txt2img_width") == [width, width], status
                    assert _field_values(page, "txt2img_height") == [height, height], status

                    # as the message says, Forge's Checkpoint and VAE / Text Encoder show the choice after a reload
                    # (a reload can put its GPU Weights slider back to the value the page was built with: Forge's doing)
                    page.reload()
                    page.wait_for_selector("#txt2img_generate", timeout=120_000)
                    checkpoint_box = page.locator(".model_selection input").first
                    page.wait_for_function("(name) => [...document.querySelectorAll('.model_selection input')]"
                                           ".some(i => i.value.startsWith(name))", arg=flux["flux"].name,
                                           timeout=30_000)
                    # each of Forge's dropdowns gets its value from its own load event: the modules may arrive after
                    # the checkpoint, so wait for them (a page that never shows them still fails here)
                    modules_js = """() => [...document.querySelectorAll('[data-testid=block-info]')]
                        .filter(s => s.textContent.trim() === 'VAE / Text Encoder')
                        .flatMap(s => [...s.closest('.block').querySelectorAll('.token span')])
                        .map(t => t.textContent)"""
                    expected_modules = sorted(flux[part].name for part in ("clip", "t5", "ae"))
                    with contextlib.suppress(sync_api.TimeoutError):   # the assertion below says what it shows
                        page.wait_for_function(f"(n) => ({modules_js})().length >= n", arg=len(expected_modules),
                                               timeout=30_000)
                    shown_modules = page.evaluate(modules_js)
                    assert sorted(shown_modules) == expected_modules, (shown_modules, api("/sdapi/v1/options").get(
                        "forge_additional_modules"))
                    page.screenshot(path=str(SHOTS / "forge-after-reload.png"), full_page=False)
                    assert checkpoint_box.input_value().startswith(flux["flux"].name)

                    # a preset written by fluxq.js, then Forge's own Generate: the values must reach generation
                    page.get_by_role("tab", name="Txt2img").click()
                    assert page.evaluate("(s) => fluxqSetSize(s)", f"{GENERATE_SIZE[0]}x{GENERATE_SIZE[1]}")
                    page.locator("#txt2img_prompt textarea").fill("a lighthouse at dusk")
                    _set_number(page, "txt2img_steps", 1)
                    _set_number(page, "txt2img_cfg_scale", 1)
                    log_offset = len(log_path.read_text())
                    started = time.time()
                    page.locator("#txt2img_generate").click()
                    page.wait_for_function("() => /Size: \\d+x\\d+/.test((document.querySelector("
                                           "'#html_info_txt2img') || {}).innerText || '')", timeout=900_000)
                    generate_s = time.time() - started
                    info = page.locator("#html_info_txt2img").inner_text()
                    page.screenshot(path=str(SHOTS / "forge-generated.png"), full_page=True)
                    ours = [p for p in problems if "fluxq" in p.lower()]
                finally:
                    browser.close()
            log_text = log_path.read_text()
        log_job = log_text[log_offset:]
        print("REAL FORGE TAB:", json.dumps({
            "use_this": result, "generate_s": round(generate_s, 1), "infotext": info,
            "flux_gguf_gb": round(flux["flux"].stat().st_size / GB, 2), "sd15": sd15["first"].name,
            "console_errors": problems}, indent=1, ensure_ascii=False))

        assert f"Size: {GENERATE_SIZE[0]}x{GENERATE_SIZE[1]}" in info, info
        assert "Steps: 1," in info, info
        loads = model_loads(log_job)
        assert [name for name, _ in loads] == [flux["flux"].name], log_job[-3000:]
        assert sorted(loads[0][1]) == sorted(flux[part].name for part in ("clip", "t5", "ae")), loads
        assert ours == [], ours
        assert not our_tracebacks(log_text), our_tracebacks(log_text)


def _models_table(page) -> dict[str, dict[str, str]]:
    header = page.locator("#fluxq_models thead th").all_inner_texts()
    rows = [dict(zip(header, row.locator("td").all_inner_texts(), strict=True))
            for row in page.locator("#fluxq_models tbody tr").all()]
    return {row["file"]: row for row in rows}


def _field_values(page, elem_id: str) -> list[str]:
    return page.evaluate("(id) => [...document.querySelectorAll('#' + id + ' input')].map(i => i.value)", elem_id)
