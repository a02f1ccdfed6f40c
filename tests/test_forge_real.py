"""Opt-in: the hook inside a REAL Forge (FORGE_DIR=/path/to/stable-diffusion-webui-forge with its venv in venv/).

Skipped unless FORGE_DIR is set. Prepare Forge as FORGE_NOTES §9 says (CPU torch, repositories/ present). The test
starts Forge CPU-only on 127.0.0.1 with a private --data-dir whose extensions/fluxq links to this repository, builds
a transformer-only FLUX.1-dev GGUF at full shape (Q2_K: ~4 GB; one random matrix per distinct shape, quantized by
ggml, reused — a load/memory test, not an image test), a full-shape T5-XXL GGUF (city96 names, Q2_K), and random
CLIP-L / VAE files (built by Forge's own transformers/diffusers from Forge's bundled configs), then asks for one
64x64 image through the API and checks: the extension loaded without errors, the hook is active, clip_l/t5xxl/ae
were paired at load, and the peak RSS stays near what was paged in from the files. Needs ~7 GB disk, ~8 GB RAM, and
several minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.real_forge import (
    GB,
    T,
    api,
    assert_clean_startup,
    build_flux_models,
    peak_rss,
    requires_forge,
    running_forge,
)

pytestmark = requires_forge


def _mapped_resident(pid: int, paths: list[str]) -> int:
    """Bytes of ``paths`` resident in the process (file pages counted in its RSS)."""
    total, current = 0, None
    real = {os.path.realpath(p) for p in paths}
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                current = parts[5].strip() if len(parts) == 6 else None
            elif line.startswith("Rss:") and current in real:
                total += int(line.split()[1]) * 1024
    return total


def test_real_forge_pairs_flux_parts_and_keeps_gguf_mapped(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = Path(os.environ.get("FLUXQ_FORGE_DATA", tmp_path_factory.mktemp("forge_data")))
    files = build_flux_models(data_dir)
    with running_forge(data_dir) as (forge, log_path):
        startup = log_path.read_text()
        assert "[fluxq] Forge load hook active" in startup, startup[-3000:]
        assert_clean_startup(startup)
        api("/sdapi/v1/options", {"sd_model_checkpoint": files["flux"].name, "forge_additional_modules": []})
        mapped = {"at_peak": 0}

        def measure_mapped() -> None:
            mapped["at_peak"] = _mapped_resident(forge.pid, [str(files["flux"]), str(files["t5"])])

        started = time.time()
        with peak_rss(forge.pid, on_peak=measure_mapped) as rss:
            result = api("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 64, "height": 64, "steps": 1,
                                               "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler",
                                               "scheduler": "Simple", "seed": 1}, timeout=1500)
        elapsed = time.time() - started
        log_text = log_path.read_text()
        report = {"baseline_rss_gb": rss["baseline"] / GB, "peak_rss_gb": rss["peak"] / GB,
                  "mapped_resident_at_peak_gb": mapped["at_peak"] / GB,
                  "flux_gguf_gb": files["flux"].stat().st_size / GB, "t5_gguf_gb": files["t5"].stat().st_size / GB,
                  "seconds": elapsed}
        print("REAL FORGE:", json.dumps(report))
        (data_dir / "report.json").write_text(json.dumps(report, indent=1))
        assert result.get("images"), log_text[-3000:]
        for part, name in (("clip_l", files["clip"].name), ("t5xxl", files["t5"].name), ("ae", files["ae"].name)):
            assert f"adding {part} from {name}" in log_text, log_text[-3000:]
        # Anonymous memory grown beyond the mapped file pages: CLIP-L + VAE (materialized by Forge) and activations.
        grown_private = rss["peak"] - rss["baseline"] - mapped["at_peak"]
        assert grown_private < 3 * GB, report
    sys.stdout.flush()


def _seconds_per_step(log_text: str) -> float | None:
    """The sampler's own figure from the last tqdm bar Forge printed ("1/1 [13:27<00:00, 807.93s/it]"), not the
    "Total progress" bar (that one also times the VAE decode)."""
    bars = re.findall(r"(Total progress: *)?\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*?, *([\d.]+)(s/it|it/s)\]", log_text)
    sampler = [(value, unit) for total, value, unit in bars if not total]
    if not sampler:
        return None
    value, unit = sampler[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value)


RUNS = {"forge": (False, None), "fluxq": (True, True), "fluxq_bake": (True, False)}


def test_real_forge_baked_q4_0_without_the_bake_copy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Full-size FLUX.1-dev Q4_0 (a type Forge "bakes": rewrites every weight into new memory) with clip_l / T5-XXL
    Q4_0 / ae selected, one 64x64 image, one step: Forge alone, then fluxq, in one session (same files, same data
    dir, one server at a time). fluxq serves Q4_0 from the mapped file (no bake copy): its peak RSS must stay
    <= 1.25x the four files and below Forge alone's. Step times (Forge's own s/it) are printed, not asserted.
    FLUXQ_FORGE_RUNS=forge,fluxq,fluxq_bake adds fluxq with its forward path off (Forge's bake, the old 19.1 GB).
    """
    base = Path(os.environ.get("FLUXQ_FORGE_Q4_DATA", tmp_path_factory.mktemp("forge_q4")))
    files = build_flux_models(base, qtype=T.Q4_0)
    total = sum(files[k].stat().st_size for k in ("flux", "t5", "clip", "ae"))
    modules = [str(files[k]) for k in ("clip", "t5", "ae")]
    results: dict[str, dict] = {}
    for label in os.environ.get("FLUXQ_FORGE_RUNS", "forge,fluxq").split(","):
        with_fluxq, forward = RUNS[label]
        # a full-size load on a busy 2-core machine can take minutes before the server answers
        start_timeout = int(os.environ.get("FLUXQ_FORGE_START_TIMEOUT", "900"))
        with running_forge(base, start_timeout, with_fluxq=with_fluxq) as (forge, log_path):
            options: dict = {"sd_model_checkpoint": files["flux"].name, "forge_additional_modules": modules}
            if forward is not None:
                options["fluxq_gguf_forward"] = forward
            api("/sdapi/v1/options", options)
            started = time.time()
            with peak_rss(forge.pid) as rss:
                result = api("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 64, "height": 64, "steps": 1,
                                                   "cfg_scale": 1.0, "distilled_cfg_scale": 3.5,
                                                   "sampler_name": "Euler", "scheduler": "Simple", "seed": 1},
                             timeout=5400)
            log_text = log_path.read_text()
            assert result.get("images"), log_text[-3000:]
            results[label] = {"peak_rss_gb": rss["peak"] / GB, "peak_over_files": rss["peak"] / total,
                              "seconds_per_step": _seconds_per_step(log_text),
                              "request_seconds": time.time() - started}
            if with_fluxq:
                assert "[fluxq] Forge load hook active" in log_text, log_text[-3000:]
        print(f"REAL FORGE Q4_0 {label}:", json.dumps(results[label]), flush=True)
    report = {"files_gb": total / GB, **results}
    (base / "report_q4_0.json").write_text(json.dumps(report, indent=1))
    print("REAL FORGE Q4_0:", json.dumps(report), flush=True)
    if "fluxq" in results:
        assert results["fluxq"]["peak_over_files"] <= 1.25, report
        if "forge" in results:
            assert results["fluxq"]["peak_rss_gb"] < results["forge"]["peak_rss_gb"], report
