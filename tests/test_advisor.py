"""The advisor against published figures, the community's VRAM table, and bad input.

Sources of the figures below (kept here so a reader can check them):
- stable-diffusion.cpp docs/flux.md, table "Memory" for flux1-dev: q8_0 12068.09 MB, q4_0 6394.53 MB,
  q3_k 4888.16 MB, q2_k 3735.73 MB (sd-cli with --clip-on-cpu). That figure is the diffusion model's parameter
  memory as sd.cpp logs it — not a peak incl. activations — so we compare it with our weight model under sd.cpp's own
  conversion rule (``sdcpp_params_bytes``: every weight whose row is a block multiple except img_in, the rest BF16,
  biases F32). The figure does not depend on the image size, so 1024x1024 or sd.cpp's default 512x512 read the same.
- city96/FLUX.1-dev-gguf file sizes (GB): F16 23.8, Q8_0 12.7, Q6_K 9.86, Q5_1 9.01, Q5_K_S 8.29, Q5_0 8.27, Q4_1 7.53,
  Q4_K_S 6.81, Q4_0 6.79, Q3_K_S 5.23, Q2_K 4.03. comfyanonymous/flux_text_encoders: t5xxl_fp16 9.5 GB, fp8 4.9 GB.
- RTX 2060 6 GB, schnell, 512x768, 4 steps: FP8 "Prompt executed in 107.47 seconds" (16.86 s/it, ComfyUI, first run,
  so it includes reading the files: @jaldpsd, 2024-08-05, quoted by decrypt.co); NF4 about 30 s (community reports).
  We compare our cold first-image time: steps + T5 round trip + VAE + reading the files at 0.5 GB/s.
- GTX 1060 3 GB, dev, NF4 about 7.9 s/it (community report, size not given). A 3.9 TFLOP/s card cannot do the
  74 TFLOP of a 1024^2 step in 7.9 s, so the report must be of a ~0.25 MP image: we evaluate 512x512.
- lllyasviel, Forge discussion #981: "3070 ti laptop (8GB VRAM): FP8 8.3 seconds per iteration; NF4 2.15".
- Hugging Face "Exploring Quantization Backends in Diffusers" (H100): BnB NF4 about as fast as BF16; GGUF (torch
  dequant) slower. ChrisGoringe/MixedQuantFlux on an A40: GGUF 40-55 s vs 27 s unquantized.
- Community table (seed guidance): 24 GB -> Q8_0; 16 GB -> Q6_K with text encoders in RAM; 12 GB -> Q5_1 (~10 GB
  used); under 10 GB -> Q4_0/Q4_1 (NF4 for speed); 6 GB -> 512x768-class renders, then upscale + refine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib_fluxq import advisor
from lib_fluxq.advisor import (
    FLUX_SCHNELL,
    LEVELS,
    Planner,
    advise,
    flux_step_flops,
    render_text,
    resolve_level,
    sdcpp_params_bytes,
    t5_bytes,
    transformer_bytes,
)
from lib_fluxq.errors import FluxqError
from lib_fluxq.flux import flux_param_shapes, parameter_count
from lib_fluxq.hardware import GIB, Hardware, detect, with_overrides

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def card(vram_gb: float, name: str | None = None, ram_gb: float = 32, backend: str = "cuda") -> Hardware:
    return Hardware(backend=backend, gpu_name=name, vram_total=int(vram_gb * GIB), ram_total=int(ram_gb * GIB),
                    cpu_cores=8)


# ------------------------------------------------------------------------------------------ memory calibration
@pytest.mark.parametrize("level,published_mb", [("Q8_0", 12068.09), ("Q4_0", 6394.53), ("Q3_K_S", 4888.16),
                                                ("Q2_K", 3735.73)])
def test_weights_match_stable_diffusion_cpp(level: str, published_mb: float) -> None:
    ours = sdcpp_params_bytes(LEVELS[level]) / 2 ** 20
    assert abs(ours - published_mb) / published_mb < 0.15, (level, ours, published_mb)
    # The mapping is exact enough to hold far tighter than the brief's 15%.
    assert abs(ours - published_mb) / published_mb < 0.01, (level, ours, published_mb)


@pytest.mark.parametrize("level,published_gb", [
    ("BF16", 23.8), ("Q8_0", 12.7), ("Q6_K", 9.86), ("Q5_1", 9.01), ("Q5_K_S", 8.29), ("Q5_0", 8.27),
    ("Q4_1", 7.53), ("Q4_K_S", 6.81), ("Q4_0", 6.79), ("Q3_K_S", 5.23), ("Q2_K", 4.03)])
def test_weights_match_published_city96_files(level: str, published_gb: float) -> None:
    ours = transformer_bytes(LEVELS[level]) / 1e9
    assert abs(ours - published_gb) / published_gb < 0.03, (level, ours, published_gb)


def test_nf4_bits_per_weight_from_bitsandbytes() -> None:
    import bitsandbytes.functional as bnb  # the reference (requirements-test.txt): missing is an error
    weight = torch.randn(256, 3072)
    packed, state = bnb.quantize_4bit(weight, blocksize=advisor.NF4_BLOCKSIZE, quant_type="nf4")
    measured_bits = (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()) \
        * 8 / weight.numel()
    assert LEVELS["NF4"].bits == pytest.approx(measured_bits)


def test_t5_sizes_match_published_files() -> None:
    assert t5_bytes("fp16") / 1e9 == pytest.approx(9.5, rel=0.03)
    assert t5_bytes("fp8") / 1e9 == pytest.approx(4.9, rel=0.03)


def test_flux_flops_follow_the_shapes() -> None:
    # Independent check of the FLOP formula from lib_fluxq.flux's shape table: matmul FLOPs = 2 x tokens x the block
    # weights each token passes through. A token crosses one stream (img or txt) of each double block, every single
    # block, and no modulation layer (those act on one vector per sample).
    config = advisor.FLUX_DEV
    per_token = 0
    for name, shape in flux_param_shapes(config).items():
        if len(shape) != 2 or "mod" in name or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        per_token += math.prod(shape) / (2 if name.startswith("double_blocks.") else 1)
    tokens = 64 * 64 + advisor.TEXT_TOKENS
    attention = 4 * tokens ** 2 * config.hidden * (config.depth + config.depth_single)
    assert flux_step_flops(1024, 1024) - attention == pytest.approx(2 * tokens * per_token, rel=1e-9)
    assert per_token < parameter_count(config)  # modulation and the other stream are excluded


# ------------------------------------------------------------------------------------------- speed calibration
def test_rtx_2060_schnell_nf4_vs_fp8_image_time() -> None:
    planner = Planner(card(6, "NVIDIA GeForce RTX 2060"), 512, 768, model="schnell")
    nf4, fp8 = planner.estimate(LEVELS["NF4"]), planner.estimate(LEVELS["FP8"])
    # NF4 all-in-one checkpoint holds T5 fp8; the FP8 run reads the transformer and a separate fp8 T5.
    nf4_file = transformer_bytes(LEVELS["NF4"], FLUX_SCHNELL) + t5_bytes("fp8")
    nf4_s = planner.image_seconds(LEVELS["NF4"], int(nf4.offloaded_gb * GIB), 512, 768, 4, file_bytes=nf4_file)
    fp8_s = planner.image_seconds(LEVELS["FP8"], int(fp8.offloaded_gb * GIB), 512, 768, 4)
    assert nf4_s < fp8_s
    assert 30 / 2 <= nf4_s <= 30 * 2, nf4_s
    assert 107 / 2 <= fp8_s <= 107 * 2, fp8_s


def test_gtx_1060_3gb_dev_nf4_step() -> None:
    step = Planner(card(3, "GeForce GTX 1060 3GB"), 512, 512).estimate(LEVELS["NF4"]).step_s
    assert step is not None and 7.9 / 2 <= step <= 7.9 * 2, step


def test_rtx_3070_ti_laptop_fp8_slower_than_nf4() -> None:
    planner = Planner(card(8, "NVIDIA GeForce RTX 3070 Ti Laptop GPU"))
    nf4, fp8 = planner.estimate(LEVELS["NF4"]).step_s, planner.estimate(LEVELS["FP8"]).step_s
    assert nf4 is not None and fp8 is not None and nf4 < fp8
    assert fp8 / nf4 > 1.5  # published 3.86x; offload + CPU upcast must dominate, not noise


def test_h100_bf16_nf4_q8_order() -> None:
    planner = Planner(card(80, "NVIDIA H100 80GB HBM3", ram_gb=256))
    bf16, nf4, q8 = (planner.estimate(LEVELS[n]) for n in ("BF16", "NF4", "Q8_0"))
    assert bf16.fit == nf4.fit == q8.fit == "resident"
    assert bf16.step_s <= nf4.step_s < q8.step_s


# ---------------------------------------------------------------------------------------- recommendations
@pytest.mark.parametrize("vram_gb,expected", [(24, {"Q8_0"}), (16, {"Q6_K"}), (12, {"Q5_1"}), (8, {"Q4_0", "Q4_1"})])
def test_community_table(vram_gb: float, expected: set[str]) -> None:
    result = advise(card(vram_gb, ram_gb=32))
    assert result.recommended.value in expected, (vram_gb, result.recommended)
    assert result.width * result.height >= 1024 * 1024 * 0.9
    assert not result.refine.value


def test_16gb_keeps_text_encoders_in_ram_and_12gb_uses_about_10gb() -> None:
    assert advise(card(16)).text_encoder.value["placement"] == "RAM"
    need = advise(card(12)).recommended.numbers["need_gb"]
    assert 9.0 <= need <= 11.0


def test_under_10gb_nf4_is_the_faster_alternative() -> None:
    result = advise(card(8, "RTX 4060"))
    assert result.faster is not None and result.faster.value == "NF4"


def test_6gb_small_render_then_refine() -> None:
    result = advise(card(6, "RTX 2060"))
    assert result.width * result.height <= 512 * 768
    assert result.refine.value is True
    assert LEVELS[result.recommended.value].fidelity_bits >= 4
    assert result.gpu_weights_mb.value < 6 * 1024


def test_4gb_gets_low_bits_or_a_reason() -> None:
    result = advise(card(4, ram_gb=16))
    if result.recommended.value is None:
        assert "won't fit" in result.recommended.reason and "GB" in result.recommended.reason
    else:
        assert result.recommended.value in ("Q2_K", "Q3_K_S")
        assert result.refine.value is True


def test_gpu_weights_is_total_minus_reserve_and_offload_follows_forge() -> None:
    result = advise(card(8))
    numbers = result.gpu_weights_mb.numbers
    assert result.gpu_weights_mb.value == numbers["total_mb"] - numbers["reserve_mb"]
    # Forge: free - weights - reserve < 0 -> offload, GPU share max((free - reserve)/1.3, free - reserve - 1.25 GB)
    free, reserve, weights = numbers["free_at_load_mb"], numbers["reserve_mb"], numbers["weights_mb"]
    assert free - weights - reserve < 0
    expected = max((free - reserve) / 1.3, free - reserve - 1.25 * 1024)
    assert numbers["resident_mb"] == pytest.approx(expected, abs=16)
    assert result.swap_method.value in ("Async", "Queue") and result.swap_location.value in ("Shared", "CPU")


def test_json_has_stable_fields() -> None:
    data = json.loads(advise(card(12)).to_json())
    for key in ("recommended", "faster", "resolution", "resolutions", "gpu_weights_mb", "swap_method",
                "swap_location", "text_encoder", "vae", "refine", "levels", "files", "warnings", "summary"):
        assert key in data
    assert {"value", "reason", "numbers"} <= set(data["recommended"])


def test_unknown_card_uses_vram_class_and_says_so() -> None:
    result = advise(card(12, "Some Future GPU 9000"))
    assert result.profile_assumed and any("speed table" in w for w in result.warnings)


def test_gpu_name_alone_takes_vram_from_table() -> None:
    cpu = Hardware(backend="cpu", ram_total=32 * GIB, cpu_cores=4)
    result = advise(with_overrides(cpu, gpu_name="RTX 3060"))
    assert result.vram_gb == 12 and result.recommended.value == "Q5_1"


# --------------------------------------------------------------------------------------------- model files
def test_rank_files_from_tuples() -> None:
    planner = Planner(card(12))
    files = [("flux1-dev-Q8_0.gguf", "Q8_0", 12_700_000_000, "flux-dev"),
             ("flux1-dev-Q5_1.gguf", "Q5_1", 9_010_000_000, "flux-dev"),
             ("flux1-dev-F16.safetensors", "BF16", 23_800_000_000, "flux-dev"),
             ("flux1-dev-bnb-nf4-v2.safetensors", "NF4 v2", 12_000_000_000, "flux-dev"),
             ("t5xxl_fp16.safetensors", "F16", 9_500_000_000, "t5xxl"),
             ("lora.safetensors", "BF16", 100_000_000, "flux-lora")]
    verdicts = {v.name: v for v in planner.rank_files(files)}
    assert verdicts["flux1-dev-Q5_1.gguf"].verdict == "fits"
    assert verdicts["flux1-dev-Q8_0.gguf"].verdict == "offloads" and verdicts["flux1-dev-Q8_0.gguf"].step_s
    assert verdicts["flux1-dev-bnb-nf4-v2.safetensors"].verdict == "fits"  # all-in-one: transformer ~6.7 GB
    assert verdicts["t5xxl_fp16.safetensors"].verdict == "component"
    assert verdicts["lora.safetensors"].verdict == "skipped"
    order = [v.name for v in planner.rank_files(files)]
    assert order.index("flux1-dev-Q5_1.gguf") < order.index("flux1-dev-Q8_0.gguf")
    tiny = Planner(card(4, ram_gb=8)).rank_files([("flux1-dev-F16.safetensors", "BF16", 23_800_000_000,
                                                   "flux-dev")])
    assert tiny[0].verdict == "won't fit"


@pytest.mark.parametrize("text,name", [("Q4_K_S", "Q4_K_S"), ("q8_0", "Q8_0"), ("NF4 v2", "NF4"),
                                       ("FP8 e4m3fn", "FP8"), ("F16", "FP16"), ("Q5_K_M", "Q5_K_S"),
                                       ("IQ4_XS", "IQ4_XS"), ("BF16", "BF16")])
def test_resolve_level(text: str, name: str) -> None:
    assert resolve_level(text).name == name
    assert resolve_level("mystery") is None


def test_models_folder_through_inspector(tmp_path: Path) -> None:
    import gguf

    from tests.fixtures import random_flux_state_dict, recipe_qtype, write_gguf
    write_gguf(tmp_path / "flux-small-Q4_0.gguf", random_flux_state_dict(),
               recipe_qtype(gguf.GGMLQuantizationType.Q4_0))
    files = advisor.scan_models(str(tmp_path))
    assert [f.name for f in files] == ["flux-small-Q4_0.gguf"]
    assert files[0].size_bytes == os.path.getsize(tmp_path / "flux-small-Q4_0.gguf")


# ----------------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "lib_fluxq", "advise", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_on_this_machine_text_and_json() -> None:
    hardware = detect()
    text = run_cli()
    assert text.returncode == 0, text.stderr
    data = json.loads(run_cli("--json").stdout)
    if hardware.has_gpu:
        assert data["recommended"]["value"] in LEVELS
    else:
        assert data["cpu_only"] is True and data["recommended"]["value"] is None
        assert "impractical" in text.stdout and "min per step" in text.stdout
        assert data["recommended"]["numbers"]["step_min_512"] > 0


def test_cli_override_plans_for_another_card() -> None:
    result = run_cli("--vram", "12", "--ram", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recommended"]["value"] == "Q5_1"


@pytest.mark.parametrize("args,needle", [
    (("--vram", "-1"), "--vram -1"), (("--vram", "10000"), "--vram 10000"), (("--ram", "0"), "--ram 0"),
    (("--vram", "nan"), "--vram nan"), (("--models", "/no/such/folder"), "no such folder"),
    (("--size", "1000x1000"), "not a Flux size"), (("--gpu", " "), "--gpu is empty")])
def test_cli_bad_input(args: tuple[str, ...], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lib_fluxq.__main__ import main
    code = main(["advise", *args])
    err = capsys.readouterr().err
    assert code != 0
    assert needle in err and err.startswith("error: ")


def test_cli_bad_input_in_a_real_process() -> None:
    result = run_cli("--vram", "-1")
    assert result.returncode != 0
    assert "--vram -1 GB is not plausible" in result.stderr and "Traceback" not in result.stderr


def test_models_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x")
    with pytest.raises(FluxqError, match="not a folder"):
        advisor.scan_models(str(path))


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root can read any folder")
def test_models_folder_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(FluxqError, match="cannot"):
            advisor.scan_models(str(folder))
    finally:
        folder.chmod(0o755)


def test_models_folder_unlistable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so simulate the OS refusing to list the folder.
    def refuse(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "listdir", refuse)
    with pytest.raises(FluxqError, match="cannot list"):
        advisor.scan_models(str(tmp_path))


def test_text_rendering_mentions_every_choice() -> None:
    text = render_text(advise(card(8, "RTX 4060")))
    for label in ("Quant level", "GPU Weights (MB)", "Swap method", "Text encoders", "Refine"):
        assert label in text


def test_3gb_explains_why_and_what_it_would_cost() -> None:
    result = advise(card(3, "GTX 1060 3GB", ram_gb=16))
    assert result.recommended.value is None
    assert "won't fit" in result.recommended.reason and "s/it" in result.recommended.reason


def test_gpu_weights_for_a_file_follow_its_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Forge hook's optional GPU Weights: the level is read from the file's header, the value is the plan's."""
    import gguf

    from tests.fixtures import random_flux_state_dict, recipe_qtype, write_gguf

    path = tmp_path / "flux1-dev-custom.gguf"
    write_gguf(path, random_flux_state_dict(), recipe_qtype(gguf.GGMLQuantizationType.Q8_0))
    hardware = card(24)
    planned = advise(hardware)
    assert planned.recommended.value == "Q8_0" and (planned.width, planned.height) == (1024, 1024)
    assert advisor.gpu_weights_mb_for_file(str(path), hardware) == planned.gpu_weights_mb.value

    class Loaded:  # what Forge's loaded model exposes
        sd_checkpoint_info = type("Info", (), {"filename": str(path)})()

    monkeypatch.setattr(advisor.plan, "detect", lambda *_: hardware)
    assert advisor.gpu_weights_mb_for_loaded_model(Loaded()) == planned.gpu_weights_mb.value
    assert advisor.gpu_weights_mb_for_loaded_model(object()) is None
    assert advisor.gpu_weights_mb_for_file(str(path), card(24, backend="cpu")) is None
    not_flux = tmp_path / "notes.gguf"
    not_flux.write_bytes(b"GGUF")
    assert advisor.gpu_weights_mb_for_file(str(not_flux), hardware) is None


@pytest.mark.parametrize("level", ["BF16", "Q8_0", "Q5_1", "Q4_K_S", "NF4"])
def test_card_independent_vram_need_is_the_planners_need(level: str) -> None:
    """compare's VRAM column (transformer_vram_gb) is the need the Planner fits a card against, at the same size."""
    planner = Planner(card(24, "RTX 4090"), width=1024, height=1024)
    weights = transformer_bytes(LEVELS[level])
    need = planner.estimate(LEVELS[level]).need_gb
    assert advisor.transformer_vram_gb(level, weights, 1024, 1024) == pytest.approx(need, abs=0.011)
    assert advisor.transformer_vram_gb(level, weights, 512, 768) < need
    with pytest.raises(FluxqError, match="unknown weight level 'Q9'"):
        advisor.transformer_vram_gb("Q9", weights)


# ------------------------------------------------------------------------------------ issue 17: advise's bad input
def test_unknown_gpu_without_vram_asks_for_vram() -> None:
    """An unknown card name alone cannot be planned for: one error line asking for --vram, no plan, no header."""
    result = run_cli("--gpu", "RTX 9999")
    assert result.returncode == 1, result.stdout
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpu 'RTX 9999' is not a card") and "--vram" in lines[0]
    planned = run_cli("--gpu", "RTX 9999", "--vram", "10", "--ram", "32", "--json")
    assert planned.returncode == 0, planned.stderr
    data = json.loads(planned.stdout)
    assert data["vram_gb"] == 10 and data["recommended"]["value"] in LEVELS and data["profile_assumed"]


def test_planner_for_an_unknown_card_without_vram_says_so() -> None:
    """The tab passes overrides straight to the Planner: an unknown name without VRAM is a reason, not a CPU plan."""
    cpu = Hardware(backend="cpu", ram_total=32 * GIB, cpu_cores=4)
    result = advise(with_overrides(cpu, gpu_name="RTX 9999"))
    assert result.recommended.value is None and not result.cpu_only
    assert "'RTX 9999' is not a card the advisor knows" in result.recommended.reason
    assert "VRAM" in result.recommended.reason and "CPU" not in result.summary


def test_models_folder_lists_broken_files_last(tmp_path: Path) -> None:
    """advise --models: a truncated download and an empty file are listed as unreadable, with the inspector's
    reason, after every readable file (they no longer vanish from the ranking)."""
    import gguf

    from tests.fixtures import random_flux_state_dict, recipe_qtype, write_gguf
    good = tmp_path / "b-flux-Q4_0.gguf"
    write_gguf(good, random_flux_state_dict(), recipe_qtype(gguf.GGMLQuantizationType.Q4_0))
    (tmp_path / "a-truncated-Q8_0.gguf").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "c-empty.safetensors").write_bytes(b"")
    result = run_cli("--models", str(tmp_path), "--vram", "12", "--ram", "32", "--json")
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [f["name"] for f in files][-2:] == ["a-truncated-Q8_0.gguf", "c-empty.safetensors"]
    assert files[0]["name"] == "b-flux-Q4_0.gguf" and files[0]["verdict"] != "unreadable"
    for broken in files[-2:]:
        assert broken["verdict"] == "unreadable" and broken["reason"], broken
    text = run_cli("--models", str(tmp_path), "--vram", "12", "--ram", "32").stdout
    listed = [line for line in text.splitlines() if "a-truncated-Q8_0.gguf" in line]
    assert len(listed) == 1 and listed[0].lstrip().startswith("unreadable")


# ------------------------------------------------------------------- issue 16 item 9: RAM as the user will see it
# Real-WebUI measurements: peak RSS for the four files they loaded (GiB / GiB or GB / GB: the factor is a ratio).
# Forge Q4_0 rows: tests/test_forge_real.py -k baked_q4_0 in Forge dfdcbab6, 2026-11-30 (16.18 and 11.39 GiB for
# 9.37 GiB); the rest: issue 16's text and NEO_NOTES section 2.
MEASURED_RAM_PEAKS = {("forge", "host", "baked"): (16.18, 9.37), ("forge", "fluxq", "baked"): (11.39, 9.37),
                      ("forge", "host", "mapped"): (21.3, 11.8), ("forge", "fluxq", "mapped"): (14.8, 11.8),
                      ("neo", "host", "baked"): (18.2, 9.55), ("neo", "host", "mapped"): (16.7, 11.8)}


@pytest.mark.parametrize("key", sorted(MEASURED_RAM_PEAKS))
def test_ram_peak_factors_are_the_measured_ones(key: tuple[str, str, str]) -> None:
    peak_gb, files_gb = MEASURED_RAM_PEAKS[key]
    row = advisor.RAM_PEAKS[key]
    assert row.measured and row.factor == pytest.approx(peak_gb / files_gb, rel=0.02), (key, row)
    assert f"{peak_gb:.1f} G" in row.source


def test_every_ram_peak_is_a_measurement_or_says_it_is_not() -> None:
    """No target figure is left in the table, and a figure not measured for its very case says so wherever the
    warning shows it (issue 16 item 9: never "measured" for an unmeasured number)."""
    for key, row in advisor.RAM_PEAKS.items():
        assert "target" not in row.source, key
        assert row.measured == (key in MEASURED_RAM_PEAKS), key
    hardware = card(24, "RTX 4090", ram_gb=8)
    for host in advisor.HOSTS:
        for fluxq_loading in (True, False):
            planner = Planner(hardware, host=host, fluxq_loading=fluxq_loading)
            for level in (LEVELS["Q4_0"], LEVELS["Q5_1"], LEVELS["BF16"]):
                row = planner.ram_peak(level)
                text = planner._ram_peak_warning(level, 10 * 10 ** 9)
                assert f"({row.factor:g}x the files: " in text, text
                assert ("not measured" in text) == (not row.measured), text
                assert ("measured in a real" in text) == row.measured, text
                assert ("with fluxq" in text) == fluxq_loading, text


def test_forge_with_fluxq_quotes_the_measured_fluxq_figure() -> None:
    """A 24 GB card plans Q8_0 (a baked type): on 16 GB of RAM the load warning quotes fluxq's measured Forge factor
    (1.22x), not Forge alone's (1.73x), and says it was measured with fluxq."""
    with_fluxq = advise(card(24, "RTX 4090", ram_gb=16))
    assert with_fluxq.recommended.value == "Q8_0"
    warning = next(w for w in with_fluxq.warnings if "peaks at" in w)
    assert "1.22x the files: measured in a real Forge with fluxq" in warning, warning
    alone = advise(card(24, "RTX 4090", ram_gb=16), fluxq_loading=False)
    warning = next(w for w in alone.warnings if "peaks at" in w)
    assert "1.73x the files: measured in a real Forge without fluxq" in warning, warning


def test_ram_peak_follows_host_loader_and_type() -> None:
    hardware = card(12, "RTX 3060", ram_gb=32)
    fluxq, alone = Planner(hardware), Planner(hardware, fluxq_loading=False)
    neo = Planner(hardware, host="neo", fluxq_loading=False)
    files = 12 * 10 ** 9
    q5, q4 = LEVELS["Q5_1"], LEVELS["Q4_0"]
    assert fluxq.load_peak_bytes(q5, files) < alone.load_peak_bytes(q5, files)   # memory-mapped, not copied
    assert fluxq.load_peak_bytes(q4, files) < alone.load_peak_bytes(q4, files)   # no double residency at bake
    assert neo.load_peak_bytes(q5, files) < alone.load_peak_bytes(q5, files)     # Neo maps GGUFs itself
    assert fluxq.ram_peak(q4) is advisor.RAM_PEAKS[("forge", "fluxq", "baked")]
    assert fluxq.ram_peak(q5) is advisor.RAM_PEAKS[("forge", "fluxq", "mapped")]
    assert fluxq.ram_peak(LEVELS["NF4"]) is advisor.SAFETENSORS_RAM_PEAK
    with pytest.raises(FluxqError, match="unknown host"):
        Planner(hardware, host="comfy")


def test_ram_warning_is_what_fluxq_users_see() -> None:
    """The old warning ("peaks at ~33 GB of RAM (2.63x, measured)") assumed Forge's own loading even with fluxq
    installed. With fluxq a 32 GB machine loads the 24 GB plan's files without a warning; the host alone would not."""
    with_fluxq = advise(card(24, "RTX 4090", ram_gb=32))
    assert not any("RAM" in w for w in with_fluxq.warnings), with_fluxq.warnings
    assert "2.63" not in json.dumps(with_fluxq.to_dict())
    numbers = with_fluxq.text_encoder.numbers
    assert numbers["ram_load_peak_gb"] <= 32
    alone = advise(card(24, "RTX 4090", ram_gb=32), fluxq_loading=False)
    assert alone.text_encoder.numbers["ram_load_peak_gb"] > numbers["ram_load_peak_gb"]
    tight = advise(card(12, "RTX 3060", ram_gb=16), fluxq_loading=False)
    warning = next(w for w in tight.warnings if "peaks at" in w)
    assert "Forge without fluxq" in warning and ("1.81x" in warning or "1.73x" in warning), warning


def test_text_encoder_precision_keeps_the_load_within_ram() -> None:
    result = advise(card(12, "RTX 3060", ram_gb=16))
    assert result.text_encoder.value["t5"] != "fp16"
    assert "while loading" in result.text_encoder.reason


# ------------------------------------------------------------------------------ issue 15: every family and format
from lib_fluxq.families import FAMILIES  # noqa: E402

PLANNED = [key for key, fam in FAMILIES.items() if fam.geometry is not None and fam.same_weights_as is None]


@pytest.mark.parametrize("family", PLANNED)
@pytest.mark.parametrize("vram_gb", [6, 8, 12, 16, 24])
def test_every_family_gets_a_plan_or_a_better_family(family: str, vram_gb: float) -> None:
    """On 6/8/12/16/24 GB every family gets a level, or a reason plus another family that does run well."""
    result = advise(card(vram_gb, ram_gb=64), model=family, host="neo")
    assert result.model == family and result.model_title == FAMILIES[family].title
    assert {row["family"] for row in result.families} == set(PLANNED)
    if result.recommended.value is None:
        assert "won't fit" in result.recommended.reason
        assert result.alternative is not None and result.alternative.value != family
        assert result.alternative.numbers["fit"] in ("resident", "near-resident")
    else:
        assert result.recommended.value in LEVELS
    text = render_text(result)
    assert FAMILIES[family].title in text or "won't fit" in text


# Published transformer files (GB): city96/FLUX.2-dev-gguf listing (via the family table's downloads), the BFL /
# Comfy-Org bf16 single files (Klein 4B 7.75 GB; HF tree per smeltcore's Klein 4B recipes).
@pytest.mark.parametrize("family,level,published_gb", [
    ("flux2-dev", "Q4_K_S", 19.3), ("flux2-dev", "Q4_0", 19.3), ("flux2-dev", "Q5_K_S", 23.2),
    ("flux2-klein-4b", "BF16", 7.75)])
def test_family_weights_match_published_files(family: str, level: str, published_gb: float) -> None:
    ours = transformer_bytes(LEVELS[level], FAMILIES[family].geometry) / 1e9
    assert ours == pytest.approx(published_gb, rel=0.02), (family, level, ours)


def _notes_flux2_shapes(h: int, double: int, single: int, ctx: int, guidance: bool) -> dict[str, tuple[int, int]]:
    """FLUX.2 2-D weights as shared/FAMILY_NOTES.md §3 tabulates them from BFL flux2 model.py (M = 3H), written out
    independently of lib_fluxq.flux; 1-D tensors are the 128-wide q/k norm scales (4 per double block, 2 per single)."""
    m = 3 * h
    shapes = {"img_in": (h, 128), "txt_in": (h, ctx), "time_in.in": (h, 256), "time_in.out": (h, h),
              "mod_img": (6 * h, h), "mod_txt": (6 * h, h), "mod_single": (3 * h, h), "final.linear": (128, h),
              "final.adaLN": (2 * h, h)}
    if guidance:
        shapes.update({"guidance.in": (h, 256), "guidance.out": (h, h)})
    for i in range(double):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks.{i}.{s}.qkv": (3 * h, h), f"double_blocks.{i}.{s}.proj": (h, h),
                           f"double_blocks.{i}.{s}.mlp0": (2 * m, h), f"double_blocks.{i}.{s}.mlp2": (h, m)})
    for i in range(single):
        shapes.update({f"single_blocks.{i}.linear1": (3 * h + 2 * m, h), f"single_blocks.{i}.linear2": (h, h + m)})
    return shapes


@pytest.mark.parametrize("family,h,double,single,ctx,guidance,params_g", [
    ("flux2-dev", 6144, 8, 48, 15360, True, 32.223), ("flux2-klein-9b", 4096, 8, 24, 12288, False, 9.079),
    ("flux2-klein-4b", 3072, 5, 20, 7680, False, 3.876)])
@pytest.mark.parametrize("level", ["Q8_0", "Q5_1", "Q4_K_S", "Q2_K"])
def test_family_weights_by_an_independent_path(family: str, h: int, double: int, single: int, ctx: int,
                                               guidance: bool, params_g: float, level: str) -> None:
    """Weights per level = the notes' shapes quantized by gguf-py's GGML_QUANT_SIZES (block weights at the level,
    the rest F16, norm scales F32): the advisor's figure must be that, and the parameter count the notes' one."""
    import gguf

    qtype = LEVELS[level].qtype
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    total = 0
    params = 0
    for name, (rows, cols) in _notes_flux2_shapes(h, double, single, ctx, guidance).items():
        params += rows * cols
        total += rows * cols // block * type_size if name.startswith(("double_", "single_")) else rows * cols * 2
    norms = (4 * double + 2 * single) * 2 * 128
    params += norms // 2
    total += norms // 2 * 4
    assert params / 1e9 == pytest.approx(params_g, abs=0.0015)
    assert transformer_bytes(LEVELS[level], FAMILIES[family].geometry) == total


def test_klein_4b_speed_matches_comfyuis_rtx_5090_figure() -> None:
    """ComfyUI's FLUX.2 Klein tutorial (quoted by smeltcore's Klein 4B RTX 5090 recipe): distilled 4B, FP8,
    ~1.2 s per 1024x1024 image at 4 steps on an RTX 5090, 8.4 GB VRAM. Our image time (steps x s/it) within 2x."""
    planner = Planner(card(32, "NVIDIA GeForce RTX 5090", ram_gb=64), model="flux2-klein-4b", host="neo")
    est = planner.estimate(LEVELS["FP8"])
    assert est.fit == "resident" and est.step_s is not None
    assert 1.2 / 2 <= est.step_s * 4 <= 1.2 * 2, est.step_s
    assert est.need_gb <= 8.4 * 1.1   # the transformer's share of the published 8.4 GB peak


def test_8gb_flux1_q4_versus_klein_9b_q8() -> None:
    """An 8 GB user choosing between FLUX.1 dev Q4 and Klein 9B Q8 gets an answer: Klein 9B's Q8_0 (9.6 GB of
    weights) cannot stay on an 8 GB card, FLUX.1 dev's Q4_0 can; Klein 9B's own plan is a lower level that fits,
    and at its 4 steps it finishes an image sooner than dev at 20."""
    hardware = card(8, "RTX 4060", ram_gb=32)
    klein = Planner(hardware, model="flux2-klein-9b", host="neo")
    dev = Planner(hardware, model="dev", host="neo")
    assert klein.estimate(LEVELS["Q8_0"]).fit not in ("resident", "near-resident")
    assert dev.estimate(LEVELS["Q4_0"]).fit in ("resident", "near-resident")
    advice = advise(hardware, model="flux2-klein-9b", host="neo")
    assert LEVELS[advice.recommended.value].fidelity_bits < LEVELS["Q8_0"].fidelity_bits
    rows = {row["family"]: row for row in advice.families}
    assert rows["flux2-klein-9b"]["image_s"] < rows["flux-dev"]["image_s"]
    assert "Q8_0" in render_text(advice)


def test_family_hosts_are_respected() -> None:
    """Forge runs no FLUX.2: planning Klein for Forge warns and points at Neo; FLUX.2 dev runs poorly on 12 GB and
    a family that runs well there is named with its numbers."""
    forge = advise(card(12, "RTX 3060"), model="flux2-klein-4b", host="forge")
    assert any("does not run FLUX.2 [klein] 4B" in w for w in forge.warnings)
    dev2 = advise(card(12, "RTX 3060"), model="flux2-dev", host="neo")
    assert dev2.alternative is not None and "s per image" in dev2.alternative.reason
    with pytest.raises(FluxqError, match="unknown model 'flux3'"):
        advise(card(12), model="flux3")


def _family_folder(tmp_path: Path) -> Path:
    """Header-faithful files of several families and parts (tests/family_files.py: real names and shapes)."""
    from lib_fluxq.flux import CHROMA_HD, FLUX2_KLEIN_4B
    from tests import family_files as ff

    ff.write_sparse_gguf(tmp_path / "chroma-Q4_0.gguf", ff.flux_gguf_specs(CHROMA_HD, ff.Q.Q4_0), "flux")
    ff.write_sparse_gguf(tmp_path / "klein-Q8_0.gguf", ff.flux_gguf_specs(FLUX2_KLEIN_4B, ff.Q.Q8_0), "flux")
    ff.write_sparse_safetensors(tmp_path / "ae.safetensors", ff.vae_specs(16))
    ff.write_sparse_safetensors(tmp_path / "te.safetensors", ff.llm_specs(ff.QWEN3_4B))
    return tmp_path


def test_every_familys_file_is_judged_with_its_own_geometry(tmp_path: Path) -> None:
    """--models on a folder of several families: Chroma and Klein files are judged (not skipped as "not Flux") each
    with its own family's plan; the VAE and the Qwen3 encoder are parts; planning for Forge, Klein's verdict (the
    card's) says that Forge does not run it."""
    from lib_fluxq.inspect import scan

    files = advisor.files_from_reports(scan([str(_family_folder(tmp_path))]))
    hardware = card(12, "RTX 3060")
    verdicts = {v.name: v for v in Planner(hardware, host="neo").rank_files(files)}
    assert verdicts["chroma-Q4_0.gguf"].verdict == "fits" and verdicts["klein-Q8_0.gguf"].verdict == "fits"
    klein = Planner(hardware, model="flux2-klein-4b", host="neo").estimate(
        LEVELS["Q8_0"], weight_bytes=(tmp_path / "klein-Q8_0.gguf").stat().st_size)
    assert verdicts["klein-Q8_0.gguf"].step_s == klein.step_s
    assert {verdicts[n].verdict for n in ("ae.safetensors", "te.safetensors")} == {"component"}
    forge = {v.name: v for v in Planner(hardware, host="forge").rank_files(files)}
    klein_on_forge = forge["klein-Q8_0.gguf"]
    assert klein_on_forge.verdict == "fits"
    assert "Forge (dfdcbab6) does not run FLUX.2 [klein] 4B" in klein_on_forge.reason
    assert forge["chroma-Q4_0.gguf"].verdict == "fits"


def test_gpu_weights_for_a_file_use_its_familys_geometry(tmp_path: Path) -> None:
    """The hook's GPU Weights for a Klein 4B file is Klein's plan (its activations and reserve), not FLUX.1 dev's."""
    path = _family_folder(tmp_path) / "klein-Q8_0.gguf"
    hardware = card(24, "RTX 4090")
    klein = Planner(hardware, model="flux2-klein-4b")
    level = LEVELS["Q8_0"]
    expected = klein._gpu_weights(level, klein.estimate(level), klein.reserve_bytes(level, 1024, 1024),
                                  klein.weights(level)).value
    assert advisor.gpu_weights_mb_for_file(str(path), hardware) == expected
    assert expected != advise(hardware).gpu_weights_mb.value


# ----------------------------------------------------------------------- issue 15: SVDQuant (Nunchaku) as a level
def test_svdq_weights_match_the_published_file_and_an_independent_layout() -> None:
    """svdq-int4_r32-flux.1-dev.safetensors 6.77 GB (FAMILY_NOTES §6, also tests/test_families.py); the header-
    faithful file layout of tests/family_files.py (written from nunchaku Linear.cpp / FluxModel.cpp) within 0.1%."""
    from tests import family_files as ff

    for level, published in (("SVDQ_INT4", 6.77), ("SVDQ_FP4", 7.04)):
        ours = transformer_bytes(LEVELS[level])
        assert ours / 1e9 == pytest.approx(published, abs=0.01), (level, ours)
        layout = ff.data_bytes(ff.nunchaku_flux_specs(level == "SVDQ_FP4")[0])
        assert ours == pytest.approx(layout, rel=1e-3), (level, ours, layout)
    assert resolve_level("SVDQuant INT4 (Nunchaku)") is LEVELS["SVDQ_INT4"]
    assert resolve_level("SVDQuant NVFP4 (Nunchaku)") is LEVELS["SVDQ_FP4"]


def test_svdq_speed_is_nunchakus_published_ratio_over_nf4() -> None:
    """nunchaku README: "3.0x speedups over the NF4 W4A16 baseline on both the desktop and laptop NVIDIA RTX 4090"."""
    planner = Planner(card(24, "RTX 4090", ram_gb=64), host="neo")
    nf4 = planner.step_seconds(LEVELS["NF4"], 0, 1024, 1024)
    svdq = planner.step_seconds(LEVELS["SVDQ_INT4"], 0, 1024, 1024)
    assert nf4 / svdq == pytest.approx(3.0, rel=0.05)


@pytest.mark.parametrize("gpu,vram,host,model,int4,fp4", [
    ("RTX 3060", 12, "neo", "dev", True, False),           # Ampere: INT4 kernels
    ("RTX 2060", 6, "neo", "schnell", True, False),        # Turing: INT4
    ("RTX 5090", 32, "neo", "dev", False, True),           # Blackwell: FP4 only
    ("GTX 1080", 8, "neo", "dev", False, False),           # Pascal: no Nunchaku kernels
    ("H100", 80, "neo", "dev", False, False),              # Hopper: not a Nunchaku target
    ("RTX 3060", 12, "forge", "dev", False, False),        # Forge: no Nunchaku at all
    ("RTX 3060", 12, "neo", "chroma", False, False),       # Neo loads SVDQuant as FLUX.1 only
    ("RTX 3060", 12, "neo", "klein-4b", False, False),
])
def test_svdq_runs_only_where_the_family_table_says(gpu: str, vram: float, host: str, model: str, int4: bool,
                                                     fp4: bool) -> None:
    planner = Planner(card(vram, gpu, ram_gb=64), host=host, model=model)
    for level, expected in (("SVDQ_INT4", int4), ("SVDQ_FP4", fp4)):
        why = planner.supported(LEVELS[level])
        assert (why is None) == expected, (level, why)
        if why is not None:
            assert why.startswith("SVDQuant") and len(why.splitlines()) == 1
    assert Planner(card(12, "RTX 3060", backend="rocm"), host="neo").supported(LEVELS["SVDQ_INT4"]) is not None


def test_neo_offers_svdq_as_the_fast_choice_and_forge_never() -> None:
    """On a 12 GB RTX 3060 in Neo the plan stays Q5_1 (best fidelity) and names SVDQ INT4 as the faster choice, with
    Nunchaku in the reason; in Forge no SVDQ level is ever recommended or offered."""
    neo = advise(card(12, "RTX 3060", ram_gb=32), host="neo")
    assert neo.recommended.value == "Q5_1"
    assert neo.faster is not None and neo.faster.value == "SVDQ_INT4" and "Nunchaku" in neo.faster.reason
    for vram in (6, 8, 12, 16, 24):
        forge = advise(card(vram, ram_gb=32), host="forge")
        assert forge.recommended.value not in ("SVDQ_INT4", "SVDQ_FP4")
        assert forge.faster is None or forge.faster.value not in ("SVDQ_INT4", "SVDQ_FP4")
        assert {e.fit for e in forge.levels if e.level.startswith("SVDQ")} == {"unsupported"}


def test_an_svdq_file_is_judged_for_the_host(tmp_path: Path) -> None:
    """A header-faithful Nunchaku INT4 file in --models: fits in Neo on 12 GB, and in Forge it is refused with why."""
    from lib_fluxq.inspect import scan
    from tests import family_files as ff

    ff.write_sparse_safetensors(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", *ff.nunchaku_flux_specs(False))
    files = advisor.files_from_reports(scan([str(tmp_path)]))
    neo = Planner(card(12, "RTX 3060"), host="neo").rank_files(files)
    assert [(v.level, v.verdict) for v in neo] == [("SVDQ_INT4", "fits")]
    forge = Planner(card(12, "RTX 3060"), host="forge").rank_files(files)
    assert forge[0].verdict == "won't fit" and "Forge" in forge[0].reason and "IQ" not in forge[0].reason


# ------------------------------------------------------------------- issue 15: VRAM figures for every family
@pytest.mark.parametrize("level", ["Q8_0", "Q5_1", "Q4_0", "NF4", "FP8", "BF16", "SVDQ_INT4"])
def test_family_vram_is_the_planners_need_for_each_family(level: str) -> None:
    """compare's per-family VRAM and the Planner's need at 1024x1024 are one figure, from each family's geometry."""
    figures = advisor.family_vram_gb(level)
    from lib_fluxq.advisor.model import distinct_families

    assert set(figures) == {f.key for f in distinct_families()}
    for key, vram in figures.items():
        if vram is None:   # SVDQuant files exist (and run) as FLUX.1 only
            assert level.startswith("SVDQ") and FAMILIES[key].arch != "flux1", key
            continue
        planner = Planner(card(80, "H100", ram_gb=256), model=key, host="neo")
        assert vram == planner.estimate(LEVELS[level]).need_gb, (key, level)
    if not level.startswith("SVDQ"):
        assert figures["flux2-dev"] > figures["flux-dev"] > figures["flux2-klein-9b"] > figures["flux2-klein-4b"]


def test_family_vram_matches_the_published_klein_figure() -> None:
    """ComfyUI's Klein tutorial: FLUX.2 [klein] 4B FP8 at 1024x1024 peaks at 8.4 GB; our transformer share below."""
    assert advisor.family_vram_gb("FP8")["flux2-klein-4b"] <= 8.4 * 1.1
