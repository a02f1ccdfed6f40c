"""Pairing by content: which clip_l / t5xxl / ae a checkpoint gets, and the missing-files message."""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import pytest
import torch

from lib_fluxq.pairing import (
    DOWNLOADS,
    T5_FP16_MIN_FREE_RAM,
    MissingComponentsError,
    choose_pairing,
    describe_file,
    describe_files,
    missing_files_message,
)
from tests import fixtures
from tests import forge_standin as standin

GB = 1024**3


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    flux_sd = fixtures.random_flux_state_dict()
    out = {
        "flux_st": str(fixtures.write_safetensors(d / "flux_transformer.safetensors", flux_sd)),
        "flux_prefixed": str(fixtures.write_safetensors(
            d / "flux_prefixed.safetensors", {f"model.diffusion_model.{k}": v for k, v in flux_sd.items()})),
        "clip_l": standin.write(d / "te" / "clip_l.safetensors", standin.clip_l_state_dict()),
        "t5_fp16": standin.write(d / "te" / "t5xxl_fp16.safetensors", standin.t5xxl_state_dict(torch.float16)),
        "t5_fp8": standin.write(d / "te" / "t5xxl_fp8_e4m3fn.safetensors",
                                standin.t5xxl_state_dict(torch.float8_e4m3fn)),
        "t5_gguf": str(standin.write_city96_t5_gguf(d / "te" / "t5-v1_1-xxl-encoder-Q8_0.gguf")),
        "ae": standin.write(d / "vae" / "ae.safetensors", standin.vae_state_dict(16)),
        "sd_vae": standin.write(d / "vae" / "sdxl_vae.safetensors", standin.vae_state_dict(4)),
        "sdxl": standin.write(d / "sdxl.safetensors", standin.sd_checkpoint_state_dict("sdxl")),
        "sd1": standin.write(d / "sd15.safetensors", standin.sd_checkpoint_state_dict("sd1")),
        "sd3": standin.write(d / "sd3.safetensors", standin.sd_checkpoint_state_dict("sd3")),
        # Named like a T5 file, holds CLIP-L: content decides.
        "misnamed_clip": standin.write(d / "te2" / "t5xxl_fp16.safetensors", standin.clip_l_state_dict()),
    }
    aio = dict(flux_sd)
    aio.update(standin.clip_l_state_dict("text_encoders.clip_l.transformer."))
    aio.update(standin.t5xxl_state_dict(torch.float8_e4m3fn, "text_encoders.t5xxl.transformer."))
    aio.update(standin.vae_state_dict(16, "vae."))
    out["flux_aio"] = standin.write(d / "flux_aio.safetensors", {f"model.diffusion_model.{k}" if k in flux_sd else k: v
                                                                 for k, v in aio.items()})
    gguf_path = d / "flux-Q4_0.gguf"
    fixtures.write_gguf(gguf_path, flux_sd, fixtures.recipe_qtype(gguf.GGMLQuantizationType.Q4_0))
    out["flux_gguf"] = str(gguf_path)
    return out


def test_classify_each_file_by_content(files: dict[str, str]) -> None:
    got = {k: describe_file(p) for k, p in files.items()}
    for key in ("flux_st", "flux_prefixed", "flux_gguf"):
        assert (got[key].family, got[key].parts) == ("flux", frozenset({"transformer"})), key
    assert got["flux_aio"].parts == {"transformer", "clip_l", "t5xxl", "ae"}
    assert got["flux_aio"].t5_precision == "fp8"
    assert got["clip_l"].parts == {"clip_l"} and got["clip_l"].family is None
    assert got["misnamed_clip"].parts == {"clip_l"}
    assert [got[k].t5_precision for k in ("t5_fp16", "t5_fp8", "t5_gguf")] == ["fp16", "fp8", "gguf"]
    assert all(got[k].parts == {"t5xxl"} for k in ("t5_fp16", "t5_fp8", "t5_gguf"))
    assert got["ae"].parts == {"ae"} and got["sd_vae"].parts == {"sd_vae"}
    assert (got["sdxl"].family, got["sd1"].family, got["sd3"].family) == ("sdxl", "sd1", "sd3")
    assert got["sdxl"].parts == {"transformer", "clip_l", "sd_vae"}


@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)))
def test_pairing_for_every_combination_of_present_files(files: dict[str, str], present: tuple[bool, ...]) -> None:
    names = ("clip_l", "t5_fp8", "ae")
    available = describe_files([files[n] for n, here in zip(names, present, strict=True) if here] + [files["sd_vae"]])
    plan = choose_pairing(describe_file(files["flux_gguf"]), [], available, free_ram_bytes=16 * GB)
    parts = ("clip_l", "t5xxl", "ae")
    assert plan.added == {part: files[n] for part, n, here in zip(parts, names, present, strict=True) if here}
    assert plan.missing == [part for part, here in zip(parts, present, strict=True) if not here]
    assert files["sd_vae"] not in plan.modules


def test_all_in_one_needs_nothing_and_user_selection_is_kept(files: dict[str, str]) -> None:
    available = describe_files([files["clip_l"], files["t5_fp16"], files["ae"]])
    aio = choose_pairing(describe_file(files["flux_aio"]), [], available, free_ram_bytes=64 * GB)
    assert (aio.added, aio.missing, aio.modules) == ({}, [], [])
    chosen = describe_files([files["t5_fp16"]])
    plan = choose_pairing(describe_file(files["flux_st"]), chosen, describe_files([files["t5_fp8"], files["clip_l"],
                                                                                   files["ae"]]), 8 * GB)
    assert plan.modules[0] == files["t5_fp16"] and "t5xxl" not in plan.added   # the user's T5 wins over RAM rule


@pytest.mark.parametrize(("free_gb", "have", "expected"), [
    (64, ("t5_fp16", "t5_fp8", "t5_gguf"), "t5_fp16"),
    (16, ("t5_fp16", "t5_fp8", "t5_gguf"), "t5_fp8"),
    (16, ("t5_fp16", "t5_gguf"), "t5_gguf"),
    (16, ("t5_fp16",), "t5_fp16"),       # only fp16 exists: better than nothing
    (64, ("t5_fp8",), "t5_fp8"),
])
def test_t5_precision_follows_free_ram(files: dict[str, str], free_gb: int, have: tuple[str, ...],
                                       expected: str) -> None:
    available = describe_files([files[h] for h in have])
    plan = choose_pairing(describe_file(files["flux_st"]), [], available, free_ram_bytes=free_gb * GB)
    assert plan.added["t5xxl"] == files[expected]
    assert (free_gb * GB >= T5_FP16_MIN_FREE_RAM) == (free_gb == 64)


def test_pairs_by_content_not_by_file_name(files: dict[str, str]) -> None:
    available = describe_files([files["misnamed_clip"], files["t5_fp8"], files["ae"]])
    plan = choose_pairing(describe_file(files["flux_st"]), [], available, free_ram_bytes=16 * GB)
    assert plan.added == {"clip_l": files["misnamed_clip"], "t5xxl": files["t5_fp8"], "ae": files["ae"]}


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_sd_checkpoints_drop_flux_modules_keep_sd_vae(files: dict[str, str], family: str) -> None:
    selected = describe_files([files["ae"], files["t5_fp16"], files["clip_l"], files["sd_vae"]])
    plan = choose_pairing(describe_file(files[family]), selected, describe_files(list(files.values())), 64 * GB)
    assert plan.modules == [files["sd_vae"]]
    assert sorted(plan.dropped) == sorted([files["ae"], files["t5_fp16"], files["clip_l"]])
    assert plan.added == {} and plan.missing == []


def test_sd3_keeps_its_text_encoders_and_flux_drops_sd_vae(files: dict[str, str]) -> None:
    selected = describe_files([files["ae"], files["t5_fp16"], files["clip_l"]])
    plan = choose_pairing(describe_file(files["sd3"]), selected, [], 64 * GB)
    assert plan.modules == [files["t5_fp16"], files["clip_l"]] and plan.dropped == [files["ae"]]
    flux = choose_pairing(describe_file(files["flux_st"]), describe_files([files["sd_vae"]]),
                          describe_files([files["ae"]]), 64 * GB)
    assert flux.dropped == [files["sd_vae"]] and flux.added["ae"] == files["ae"]


def test_switches_turn_pairing_and_dropping_off(files: dict[str, str]) -> None:
    available = describe_files([files["clip_l"], files["t5_fp8"], files["ae"]])
    plan = choose_pairing(describe_file(files["flux_st"]), [], available, 16 * GB, pair=False)
    assert plan.added == {} and plan.missing == ["clip_l", "t5xxl", "ae"]
    keep = choose_pairing(describe_file(files["sdxl"]), describe_files([files["ae"]]), [], 16 * GB, drop=False)
    assert keep.modules == [files["ae"]] and keep.dropped == []


def test_missing_files_message_names_parts_files_and_folders() -> None:
    folders = {"text_encoder": "/forge/models/text_encoder", "VAE": "/forge/models/VAE"}
    message = missing_files_message("/x/flux1-dev-Q4_0.gguf", ["clip_l", "t5xxl", "ae"], folders)
    for needle in ("flux1-dev-Q4_0.gguf", "CLIP-L", "T5-XXL", "VAE", "comfyanonymous/flux_text_encoders",
                   "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors",
                   "black-forest-labs/FLUX.1-schnell", "Apache", "ae.safetensors",
                   "/forge/models/text_encoder", "/forge/models/VAE"):
        assert needle in message, needle
    only_ae = missing_files_message("m.gguf", ["ae"], folders)
    assert "ae.safetensors" in only_ae and "clip_l.safetensors" not in only_ae and "/forge/models/VAE" in only_ae
    error = MissingComponentsError("m.gguf", ["t5xxl"], folders)
    assert error.missing == ["t5xxl"] and "t5xxl_fp16.safetensors" in str(error)
    assert set(DOWNLOADS) == {"clip_l", "t5xxl", "ae"}


def test_unreadable_candidates_are_skipped(tmp_path: Path, files: dict[str, str]) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05")
    legacy = tmp_path / "old.ckpt"
    legacy.write_bytes(b"")
    assert [c.path for c in describe_files([str(broken), str(legacy), files["ae"]])] == [files["ae"]]
