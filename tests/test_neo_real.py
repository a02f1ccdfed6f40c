"""Opt-in: fluxq inside a REAL Forge Neo (NEO_DIR=/path/to/neo with its venv in venv/; NEO_NOTES §4), CPU-only.

Skipped unless NEO_DIR is set. Builds the random-weight files of tests/real_neo.py (full-shape FLUX.1-dev Q4_0 /
IQ4_XS / Q5_1 GGUFs, T5-XXL Q4_0 GGUF, CLIP-L, ae, SD1.5, a FLUX.1 LoRA: ~33 GB of disk, kept when FLUXQ_NEO_DATA
names a data dir) and runs each case of NEO_NOTES §4b on a fresh Neo, first WITHOUT fluxq ("Neo alone": only Neo's
built-in extensions) and then WITH it, asking for one 64x64 image through the API:

| case | Neo alone | with fluxq |
|---|---|---|
| Flux Q4_0, no modules selected | 500 "You do not have CLIP state dict!" | image (clip_l / t5xxl / ae paired) |
| Q4_0 + clip_l + T5 Q4_0 + ae | image | image |
| SD1.5 with the three Flux modules selected | 500 VAE size mismatch | image; infotext names no Flux module |
| IQ4_XS + modules | 500 "mat1 and mat2 shapes cannot be multiplied" | image |
| Q5_1 + modules + LoRA | image (per-step fp16 LoRA) | image; also with merge-once on (Settings -> fluxq) |

Each run's status, seconds, seconds per step (the sampler's tqdm rate) and peak RSS go to the console and to
<data dir>/neo-report-<case>.json; no timing is asserted. Also: refine via the API ("fluxq refine", SD1.5 after a
Flux image) and the Flux Quant tab in chromium with "Use this". Every start's console up to "Startup time:" has no
fluxq error. A Flux run peaks at ~18 GB RSS and takes minutes on a 2-core CPU: run under flock
/tmp/fluxq-bigmem.lock.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from lib_fluxq import refine as R
from tests.real_neo import (
    LORA_NAME,
    URL,
    api,
    api_status,
    build_neo_models,
    neo_commit,
    requires_neo,
    running_neo,
    seconds_per_step,
)
from tests.real_webui import GB, assert_clean_startup, model_data_dir, model_loads, our_tracebacks, peak_rss

pytestmark = requires_neo
FLUX_PAYLOAD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "cfg_scale": 1.0, "distilled_cfg_scale": 3.5,
                "sampler_name": "Euler", "scheduler": "Simple", "seed": 1}
SD_PAYLOAD = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "cfg_scale": 7.0, "sampler_name": "Euler",
              "scheduler": "Automatic", "seed": 1}
COMPANIONS = ("clip", "t5", "ae")


@dataclass(frozen=True)
class Case:
    checkpoint: str
    modules: tuple[str, ...]
    lora: bool
    alone_status: int
    alone_error: str | None   # what Neo alone answers (a regular expression), None for an image


CASES = {
    "flux_no_modules": Case("q4_0", (), False, 500, r"You do not have CLIP state dict"),
    "flux_q4_0_modules": Case("q4_0", COMPANIONS, False, 200, None),
    "sd15_with_flux_modules": Case("sd15", COMPANIONS, False, 500, r"size mismatch"),
    "flux_iq4_xs": Case("iq4_xs", COMPANIONS, False, 500, r"mat1 and mat2 shapes cannot be multiplied"),
    "flux_q5_1_lora": Case("q5_1", COMPANIONS, True, 200, None),
}


@pytest.fixture(scope="module")
def neo_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Path]]]:
    with model_data_dir(tmp_path_factory, "FLUXQ_NEO_DATA", "neo") as data_dir:
        yield data_dir, build_neo_models(data_dir)


def _decode(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def _generate(data_dir: Path, files: dict[str, Path], case: Case, with_fluxq: bool,
              options: dict | None = None) -> dict:
    """One fresh Neo, the case's selection, one txt2img; what happened."""
    with running_neo(data_dir, with_fluxq, start_timeout=900) as (neo, log_path):
        startup = log_path.read_text()
        if with_fluxq:
            assert "[fluxq] Forge load hook active" in startup, startup[-3000:]
        assert_clean_startup(startup)
        by_name = {Path(m["filename"]).name: m["filename"] for m in api("/sdapi/v1/sd-modules")}
        # fluxq's settings stay in the data dir's config between starts: say each one this run depends on
        settings = {"fluxq_lora_merge": False, **(options or {})} if with_fluxq else {}
        api("/sdapi/v1/options", {"sd_model_checkpoint": files[case.checkpoint].name,
                                  "forge_additional_modules": [by_name[files[k].name] for k in case.modules],
                                  **settings})
        payload = dict(SD_PAYLOAD if case.checkpoint == "sd15" else FLUX_PAYLOAD)
        if case.lora:
            payload["prompt"] += f" <lora:{LORA_NAME}:1>"
        offset = len(log_path.read_text())
        started = time.time()
        with peak_rss(neo.pid) as rss:
            status, body = api_status("/sdapi/v1/txt2img", payload, timeout=3600)
        seconds = time.time() - started
        log = log_path.read_text()[offset:]
    infotext = json.loads(body["info"])["infotexts"][0] if status == 200 else None
    return {"fluxq": with_fluxq, "options": options or {}, "status": status, "seconds": round(seconds, 1),
            "s_per_step": seconds_per_step(log), "peak_rss_gb": round(rss["peak"] / GB, 2),
            "baseline_rss_gb": round(rss["baseline"] / GB, 2),
            "error": None if status == 200 else json.dumps(body)[:400], "infotext": infotext,
            "images": len(body.get("images") or []), "loads": model_loads(log),
            "fluxq_lines": re.findall(r"^\[fluxq\].*$", log, flags=re.M), "our_tracebacks": our_tracebacks(log),
            "console_tail": log[-1500:] if status != 200 else ""}


@pytest.mark.parametrize("name", list(CASES))
def test_real_neo_case_alone_then_with_fluxq(neo_files: tuple[Path, dict[str, Path]], name: str) -> None:
    data_dir, files = neo_files
    case = CASES[name]
    runs = [_generate(data_dir, files, case, with_fluxq=False), _generate(data_dir, files, case, with_fluxq=True)]
    if case.lora:
        runs.append(_generate(data_dir, files, case, with_fluxq=True, options={"fluxq_lora_merge": True}))
    report = {"case": name, "neo": neo_commit(), "runs": runs,
              "files_gb": {k: round(files[k].stat().st_size / GB, 2) for k in (case.checkpoint, *case.modules)}}
    print(f"REAL NEO {name}:", json.dumps(report, indent=1, ensure_ascii=False))
    (data_dir / f"neo-report-{name}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))

    alone, ours = runs[0], runs[1]
    assert alone["status"] == case.alone_status, alone
    if case.alone_error:
        assert re.search(case.alone_error, alone["error"]), alone
    for run in runs[1:]:
        assert run["status"] == 200 and run["images"] == 1, run
        assert run["our_tracebacks"] == [], run["our_tracebacks"]
    if name == "flux_no_modules":
        added = " ".join(ours["fluxq_lines"])
        for part, key in (("clip_l", "clip"), ("t5xxl", "t5"), ("ae", "ae")):
            assert f"adding {part} from {files[key].name}" in added, ours["fluxq_lines"]
    if name == "sd15_with_flux_modules":
        # issue 16.3 on Neo: loaded without the Flux modules, and neither the console nor the image claims them
        assert ours["loads"] == [(files["sd15"].name, [])], ours["loads"]
        assert "Module" not in ours["infotext"], ours["infotext"]
    if case.lora:
        merged = runs[2]
        assert any("LoRA merged into" in line for line in merged["fluxq_lines"]), merged["fluxq_lines"]
        assert not any("LoRA merged into" in line for line in ours["fluxq_lines"]), ours["fluxq_lines"]


def test_real_neo_missing_parts_are_one_line(neo_files: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    """Issue 16.7 in Neo: a Flux GGUF whose parts are nowhere on disk answers one line through the API and prints
    one line in the console, before the checkpoint is read."""
    data_dir, files = neo_files
    lonely = tmp_path / "lonely"
    os.makedirs(lonely / "models" / "Stable-diffusion")
    os.link(files["q4_0"], lonely / "models" / "Stable-diffusion" / files["q4_0"].name)
    with running_neo(lonely, start_timeout=900) as (neo, log_path):
        assert_clean_startup(log_path.read_text())
        api("/sdapi/v1/options", {"sd_model_checkpoint": files["q4_0"].name, "forge_additional_modules": []})
        offset = len(log_path.read_text())
        started = time.time()
        status, body = api_status("/sdapi/v1/txt2img", FLUX_PAYLOAD, timeout=600)
        seconds = time.time() - started
        log = log_path.read_text()[offset:]
    print("REAL NEO missing parts:", json.dumps({"status": status, "body": body, "seconds": round(seconds, 1),
                                                  "console": log}, indent=1))
    assert status == 500 and "\n" not in body["detail"] and "ae.safetensors" in body["detail"], body
    printed = [line for line in log.splitlines() if line.strip() and not line.startswith("API ")]
    assert [line for line in printed if "Traceback" in line] == []
    assert [line for line in printed if line.startswith("[fluxq]")] == [f"[fluxq] {body['detail']}"], printed


def test_real_neo_refine_via_api(neo_files: tuple[Path, dict[str, Path]]) -> None:
    """The product's workflow in Neo: a Flux image with "fluxq refine" on (SD1.5, scale 1.5, faces on); Neo keeps the
    ``hr_additional_modules=None`` crash, which the script's before_process guards (hires fix off here)."""
    data_dir, files = neo_files
    with running_neo(data_dir, start_timeout=900) as (neo, log_path):
        assert_clean_startup(log_path.read_text())
        by_name = {Path(m["filename"]).name: m["filename"] for m in api("/sdapi/v1/sd-modules")}
        user_modules = [by_name[files[k].name] for k in COMPANIONS]
        api("/sdapi/v1/options", {"sd_model_checkpoint": files["q4_0"].name, "forge_additional_modules": user_modules})
        before = api("/sdapi/v1/options")
        refine = {"enable": True, "checkpoint": files["sd15"].name, "scale": 1.5, "steps": 2, "denoise": 0.3,
                  "faces": True, "sampler": "Euler", "scheduler": "Automatic"}
        payload = dict(FLUX_PAYLOAD, alwayson_scripts={"fluxq refine": {"args": [refine]}})
        offset = len(log_path.read_text())
        started = time.time()
        with peak_rss(neo.pid) as rss:
            result = api("/sdapi/v1/txt2img", payload, timeout=3600)
        seconds = time.time() - started
        after = api("/sdapi/v1/options")
        log = log_path.read_text()[offset:]
    loads = model_loads(log)
    refine_log = re.findall(r"(?:^|\x1b\[A|\r)(\[fluxq refine\].*)$", log, flags=re.M)   # after tqdm's escapes too
    print("REAL NEO refine:", json.dumps({"seconds": round(seconds, 1), "peak_rss_gb": round(rss["peak"] / GB, 2),
                                          "loads": loads, "refine_log": refine_log,
                                          "infotext": json.loads(result["info"])["infotexts"][0],
                                          "console_tail": log[-4000:]}, indent=1))
    assert len(result["images"]) == 1
    assert _decode(result["images"][0]).size == R.target_size(64, 64, 1.5) == (96, 96)
    assert [name for name, _ in loads] == [files["q4_0"].name, files["sd15"].name], log[-3000:]
    assert sorted(loads[0][1]) == sorted(files[k].name for k in COMPANIONS) and loads[1][1] == [], loads
    assert "fluxq refine: True" in json.loads(result["info"])["infotexts"][0]
    for key in ("sd_model_checkpoint", "forge_additional_modules"):
        assert after[key] == before[key], (key, before[key], after[key])
    assert not our_tracebacks(log), our_tracebacks(log)


CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "out" / "ui"


def test_real_neo_tab_use_this(neo_files: tuple[Path, dict[str, Path]]) -> None:
    """The Flux Quant tab in Neo's page (chromium, offline): it lists the Flux GGUFs; "Use this" selects the
    checkpoint, its three modules (remembered for the UI preset) and GPU Weights as Neo's 0..1 fraction."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    from playwright import sync_api  # pinned in requirements-test.txt: missing is an error
    SHOTS.mkdir(parents=True, exist_ok=True)
    data_dir, files = neo_files
    with running_neo(data_dir, start_timeout=900) as (neo, log_path):
        api("/sdapi/v1/options", {"sd_model_checkpoint": files["sd15"].name, "forge_additional_modules": []})
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
            try:
                context = browser.new_context(viewport={"width": 1400, "height": 1100})
                context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())
                page = context.new_page()
                problems: list[str] = []
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(URL, timeout=120_000)
                page.wait_for_selector("#txt2img_generate", timeout=120_000)
                page.get_by_role("tab", name="Flux Quant").click()
                page.wait_for_selector("#fluxq_recommendation .fluxq-note", timeout=60_000)
                listed = page.locator("#fluxq_models tbody").inner_text()
                page.screenshot(path=str(SHOTS / "neo-tab.png"), full_page=True)
                before = page.locator("#fluxq_recommendation").inner_text()
                page.locator("#fluxq_vram input").fill("8")
                page.locator("#fluxq_plan").click()
                page.wait_for_function("(old) => document.querySelector('#fluxq_recommendation').innerText !== old",
                                       arg=before, timeout=60_000)
                choice = page.locator("#fluxq_use_choice input").input_value()
                page.locator("#fluxq_use").click()
                page.wait_for_function("() => document.querySelector('#fluxq_use_result').innerText"
                                       ".includes('Selected: checkpoint')", timeout=60_000)
                result = page.locator("#fluxq_use_result").inner_text()
                page.locator("#fluxq_use_result").scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / "neo-use-this.png"), full_page=True)
                ours = [p for p in problems if "fluxq" in p.lower()]
            finally:
                browser.close()
        options = api("/sdapi/v1/options")
        log = log_path.read_text()
    print("REAL NEO tab:", json.dumps({"use_this": result, "choice": choice, "console_errors": problems,
                                       "setting_allocated_vram": options.get("setting_allocated_vram")}, indent=1))
    for key in ("q4_0", "iq4_xs", "q5_1"):
        assert files[key].name in listed, listed
    chosen = Path(choice).name
    assert options["sd_model_checkpoint"].startswith(chosen), options["sd_model_checkpoint"]
    assert sorted(Path(m).name for m in options["forge_additional_modules"]) == \
        sorted(files[k].name for k in COMPANIONS), options["forge_additional_modules"]
    preset = options.get("forge_preset")
    assert options.get(f"forge_checkpoint_{preset}", "").startswith(chosen)
    fraction = re.search(r"GPU Weights (\d\.\d\d) \((\d+) MB of (\d+) MB\)", result)
    assert fraction, result
    assert abs(float(options["setting_allocated_vram"]) - float(fraction.group(1))) < 1e-6
    assert ours == [], ours
    assert not our_tracebacks(log), our_tracebacks(log)
