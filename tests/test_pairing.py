"""Pairing by content: which text encoders / VAE each family's checkpoint gets from a folder holding several
families' files, the T5 RAM rule at its exact boundary, single-part files over bundles, dropping mismatched
modules, and the missing-files message (exact files, URLs, sizes, licences and the right folder per part).

Files are header-faithful (real names, shapes and dtypes; data sparse) from tests/family_files.py, plus the Forge
stand-in's minimal files (Forge's own recognition keys) for the SD checkpoints and the hook's cases.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import gguf
import pytest
import torch

from lib_fluxq import families as F
from lib_fluxq.flux import CHROMA_HD, FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B, FLUX_DEV, FLUX_SCHNELL
from lib_fluxq.pairing import (
    MissingComponentsError,
    choose_pairing,
    describe_file,
    describe_files,
    missing_files_message,
)
from tests import family_files as ff
from tests import fixtures
from tests import forge_standin as standin

Q = gguf.GGMLQuantizationType
GiB = 1024**3
# Typed here, not imported: a test must fail if the rule's boundary moves (issue 16).
T5_FP16_FROM = 32 * GiB


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A WebUI models folder holding several families' transformers and every companion, with neutral or
    misleading names where content must decide."""
    root = tmp_path_factory.mktemp("models")
    sd, te, vae = root / "Stable-diffusion", root / "text_encoder", root / "VAE"
    files: dict[str, Path] = {
        # transformers
        "flux_dev": ff.write_sparse_gguf(sd / "model-a.gguf", ff.flux_gguf_specs(FLUX_DEV, Q.Q4_0), "flux"),
        "flux_schnell": ff.write_sparse_safetensors(sd / "model-b.safetensors", ff.flux_fp8_specs(FLUX_SCHNELL)),
        "kontext": ff.write_sparse_gguf(sd / "flux1-kontext-dev-Q4_K_S.gguf", ff.flux_gguf_specs(FLUX_DEV, Q.Q4_K),
                                        "flux"),
        "chroma": ff.write_sparse_gguf(sd / "model-c.gguf", ff.flux_gguf_specs(CHROMA_HD, Q.Q8_0), "flux"),
        "flux2_dev": ff.write_sparse_gguf(sd / "model-d.gguf", ff.flux_gguf_specs(FLUX2_DEV, Q.Q4_K), "flux"),
        "klein_4b": ff.write_sparse_safetensors(sd / "model-e.safetensors", ff.flux_specs(FLUX2_KLEIN_4B)),
        "klein_9b": ff.write_sparse_gguf(sd / "model-f.gguf", ff.flux_gguf_specs(FLUX2_KLEIN_9B, Q.Q8_0), "flux"),
        "svdq": ff.write_sparse_safetensors(sd / "model-g.safetensors", *ff.nunchaku_flux_specs(False)),
        # companions (names chosen so that a name-based pick would be wrong)
        "clip_l": ff.write_sparse_safetensors(te / "text-encoder-1.safetensors", ff.clip_l_specs()),
        "t5_fp16": ff.write_sparse_safetensors(te / "text-encoder-2.safetensors", ff.t5xxl_specs("F16")),
        "t5_fp8": ff.write_sparse_safetensors(te / "text-encoder-3.safetensors", ff.t5xxl_specs("F8_E4M3")),
        "t5_gguf": ff.write_sparse_gguf(te / "text-encoder-4.gguf", ff.t5xxl_city96_gguf_specs(Q.Q8_0), "t5encoder"),
        "qwen3_4b": ff.write_sparse_safetensors(te / "qwen_3_8b.safetensors", ff.llm_specs(ff.QWEN3_4B)),
        "qwen3_8b": ff.write_sparse_gguf(te / "qwen_3_4b.gguf", ff.llm_gguf_specs(ff.QWEN3_8B, gguf.MODEL_ARCH.QWEN3),
                                         "qwen3"),
        "mistral": ff.write_sparse_safetensors(te / "text-encoder-5.safetensors",
                                               ff.llm_specs(ff.MISTRAL_24B, fp8_linears=True)),
        "ae": ff.write_sparse_safetensors(vae / "flux2-vae.safetensors", ff.vae_specs(16)),
        "flux2_vae": ff.write_sparse_safetensors(vae / "ae.safetensors", ff.vae_specs(32, flux2=True)),
        "sd_vae": ff.write_sparse_safetensors(vae / "sdxl_vae.safetensors", ff.vae_specs(4, "F16")),
    }
    out = {k: str(v) for k, v in files.items()}
    out["sdxl"] = standin.write(sd / "sdxl.safetensors", standin.sd_checkpoint_state_dict("sdxl"))
    out["sd1"] = standin.write(sd / "sd15.safetensors", standin.sd_checkpoint_state_dict("sd1"))
    out["sd3"] = standin.write(sd / "sd3.safetensors", standin.sd_checkpoint_state_dict("sd3"))
    return out


COMPANION_KEYS = ("clip_l", "t5_fp16", "t5_fp8", "t5_gguf", "qwen3_4b", "qwen3_8b", "mistral", "ae", "flux2_vae",
                  "sd_vae")
# Family -> the file each part must come from (16 GiB free RAM: T5 fp8 over fp16).
EXPECTED = {
    "flux_dev": ("flux-dev", {"clip_l": "clip_l", "t5xxl": "t5_fp8", "ae": "ae"}),
    "flux_schnell": ("flux-schnell", {"clip_l": "clip_l", "t5xxl": "t5_fp8", "ae": "ae"}),
    "kontext": ("flux-kontext", {"clip_l": "clip_l", "t5xxl": "t5_fp8", "ae": "ae"}),
    "svdq": ("flux-dev", {"clip_l": "clip_l", "t5xxl": "t5_fp8", "ae": "ae"}),
    "chroma": ("chroma", {"t5xxl": "t5_fp8", "ae": "ae"}),
    "klein_4b": ("flux2-klein-4b", {"qwen3_4b": "qwen3_4b", "flux2_vae": "flux2_vae"}),
    "klein_9b": ("flux2-klein-9b", {"qwen3_8b": "qwen3_8b", "flux2_vae": "flux2_vae"}),
    "flux2_dev": ("flux2-dev", {"mistral3_24b": "mistral", "flux2_vae": "flux2_vae"}),
}


@pytest.mark.parametrize("checkpoint", list(EXPECTED))
def test_each_family_gets_its_own_companions_from_a_mixed_folder(models: dict[str, str], checkpoint: str) -> None:
    family, expected = EXPECTED[checkpoint]
    contents = describe_file(models[checkpoint])
    assert contents.family == family
    available = describe_files([models[k] for k in COMPANION_KEYS] + [models[k] for k in EXPECTED])
    plan = choose_pairing(contents, [], available, free_ram_bytes=16 * GiB)
    assert plan.added == {part: models[key] for part, key in expected.items()}
    assert plan.missing == [] and plan.dropped == []
    assert plan.modules == list(plan.added.values())


def test_chroma_never_gets_clip_l_and_klein_never_gets_the_other_qwen(models: dict[str, str]) -> None:
    every = describe_files([models[k] for k in COMPANION_KEYS])
    selected = describe_files([models["clip_l"], models["qwen3_8b"], models["ae"]])
    chroma = choose_pairing(describe_file(models["chroma"]), selected, every, 64 * GiB)
    assert chroma.dropped == [models["clip_l"], models["qwen3_8b"]] and chroma.modules[0] == models["ae"]
    assert chroma.added == {"t5xxl": models["t5_fp16"]}       # 64 GiB free: fp16
    klein = choose_pairing(describe_file(models["klein_4b"]), selected, every, 16 * GiB)
    assert sorted(klein.dropped) == sorted([models["clip_l"], models["qwen3_8b"], models["ae"]])
    assert klein.added == {"qwen3_4b": models["qwen3_4b"], "flux2_vae": models["flux2_vae"]}


@pytest.mark.parametrize("present", list(itertools.product([False, True], repeat=3)))
def test_flux1_pairing_for_every_combination_of_present_files(models: dict[str, str],
                                                              present: tuple[bool, ...]) -> None:
    names = ("clip_l", "t5_fp8", "ae")
    here = [models[n] for n, on in zip(names, present, strict=True) if on]
    available = describe_files(here + [models["sd_vae"], models["flux2_vae"], models["qwen3_4b"]])
    plan = choose_pairing(describe_file(models["flux_dev"]), [], available, free_ram_bytes=16 * GiB)
    parts = ("clip_l", "t5xxl", "ae")
    assert plan.added == {part: models[n] for part, n, on in zip(parts, names, present, strict=True) if on}
    assert plan.missing == [part for part, on in zip(parts, present, strict=True) if not on]


def test_all_in_one_needs_nothing_and_user_selection_is_kept(models: dict[str, str], tmp_path: Path) -> None:
    specs = {**ff.nf4_specs(FLUX_DEV), **ff.clip_l_specs(prefix="text_encoders.clip_l.transformer."),
             **ff.t5xxl_specs("F8_E4M3", prefix="text_encoders.t5xxl.transformer."),
             **{f"vae.{n}": s for n, s in ff.vae_specs(16, "BF16").items()}}
    aio = describe_file(ff.write_sparse_safetensors(tmp_path / "flux1-dev-bnb-nf4-v2.safetensors", specs))
    assert (aio.family, aio.format, aio.t5_precision) == ("flux-dev", "bnb-nf4", "fp8")
    every = describe_files([models[k] for k in COMPANION_KEYS])
    plan = choose_pairing(aio, [], every, 64 * GiB)
    assert (plan.added, plan.missing, plan.modules) == ({}, [], [])
    chosen = describe_files([models["t5_fp16"]])
    mine = choose_pairing(describe_file(models["flux_dev"]), chosen, every, 8 * GiB)
    assert mine.modules[0] == models["t5_fp16"] and "t5xxl" not in mine.added   # the user's T5 wins over RAM rule
    over_aio = choose_pairing(aio, chosen, every, 8 * GiB)
    assert over_aio.modules == [models["t5_fp16"]] and over_aio.dropped == []


# ------------------------------------------------------------------------------- the RAM rule, exactly at its edge

@pytest.mark.parametrize(("free", "expected"), [(T5_FP16_FROM, "t5_fp16"), (T5_FP16_FROM - 1, "t5_fp8"),
                                                (T5_FP16_FROM + 1, "t5_fp16"), (0, "t5_fp8")])
def test_t5_fp16_from_32_gib_free_exactly(models: dict[str, str], free: int, expected: str) -> None:
    available = describe_files([models["t5_fp16"], models["t5_fp8"], models["t5_gguf"]])
    plan = choose_pairing(describe_file(models["flux_dev"]), [], available, free_ram_bytes=free)
    assert plan.added["t5xxl"] == models[expected]


@pytest.mark.parametrize(("free", "have", "expected"), [
    (16 * GiB, ("t5_fp16", "t5_gguf"), "t5_gguf"),       # no fp8: GGUF is next below fp16
    (16 * GiB, ("t5_fp16",), "t5_fp16"),                 # only fp16 exists: better than nothing
    (64 * GiB, ("t5_fp8", "t5_gguf"), "t5_fp8"),         # no fp16: the best small one
])
def test_t5_fallbacks(models: dict[str, str], free: int, have: tuple[str, ...], expected: str) -> None:
    plan = choose_pairing(describe_file(models["chroma"]), [], describe_files([models[h] for h in have]), free)
    assert plan.added["t5xxl"] == models[expected]


# ------------------------------------------------------------------------------- single-part files over bundles

@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, models: dict[str, str]) -> dict[str, str]:
    # Named to sort first: with the preference gone, the name order would pick the bundle.
    d = tmp_path_factory.mktemp("bundles")
    te_bundle = {**ff.clip_l_specs(prefix="text_encoders.clip_l.transformer."),
                 **ff.t5xxl_specs("F8_E4M3", prefix="text_encoders.t5xxl.transformer.")}
    vae_bundle = {**{f"vae.{n}": s for n, s in ff.vae_specs(16).items()}, **ff.clip_l_specs(prefix="clip_l.")}
    return {"te": str(ff.write_sparse_safetensors(d / "0-clip-t5-bundle.safetensors", te_bundle)),
            "vae": str(ff.write_sparse_safetensors(d / "0-ae-clip-bundle.safetensors", vae_bundle))}


def test_a_file_with_only_that_part_beats_a_bundle(models: dict[str, str], bundles: dict[str, str]) -> None:
    available = describe_files([bundles["te"], bundles["vae"], models["clip_l"], models["t5_fp8"], models["ae"]])
    assert {len(c.parts) for c in available} == {1, 2}
    plan = choose_pairing(describe_file(models["flux_dev"]), [], available, 16 * GiB)
    assert plan.added == {"clip_l": models["clip_l"], "t5xxl": models["t5_fp8"], "ae": models["ae"]}
    # without the single files, the bundles serve: the first one picked for CLIP-L also brings the ae
    only_bundles = choose_pairing(describe_file(models["flux_dev"]), [], describe_files(list(bundles.values())), 0)
    assert only_bundles.added == {"clip_l": bundles["vae"], "t5xxl": bundles["te"]}
    assert only_bundles.missing == [] and sorted(only_bundles.modules) == sorted(bundles.values())


def test_pairs_by_content_not_by_file_name(models: dict[str, str]) -> None:
    # "qwen_3_8b.safetensors" holds Qwen3-4B, "ae.safetensors" holds the FLUX.2 VAE, "flux2-vae" the FLUX.1 ae.
    got = {Path(models[k]).name: describe_file(models[k]).parts for k in ("qwen3_4b", "qwen3_8b", "ae", "flux2_vae")}
    assert got == {"qwen_3_8b.safetensors": {"qwen3_4b"}, "qwen_3_4b.gguf": {"qwen3_8b"},
                   "flux2-vae.safetensors": {"ae"}, "ae.safetensors": {"flux2_vae"}}


# ------------------------------------------------------------------------------------------- dropping modules

@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_sd_checkpoints_drop_flux_modules_keep_sd_vae(models: dict[str, str], family: str) -> None:
    selected = describe_files([models[k] for k in ("ae", "t5_fp16", "clip_l", "qwen3_4b", "flux2_vae", "sd_vae")])
    plan = choose_pairing(describe_file(models[family]), selected, describe_files(list(models.values())), 64 * GiB)
    assert plan.modules == [models["sd_vae"]]
    assert sorted(plan.dropped) == sorted(models[k] for k in ("ae", "t5_fp16", "clip_l", "qwen3_4b", "flux2_vae"))
    assert plan.added == {} and plan.missing == []


def test_sd3_keeps_its_text_encoders_and_flux_drops_sd_vae(models: dict[str, str]) -> None:
    selected = describe_files([models["ae"], models["t5_fp16"], models["clip_l"]])
    plan = choose_pairing(describe_file(models["sd3"]), selected, [], 64 * GiB)
    assert plan.modules == [models["t5_fp16"], models["clip_l"]] and plan.dropped == [models["ae"]]
    flux = choose_pairing(describe_file(models["flux_dev"]), describe_files([models["sd_vae"]]),
                          describe_files([models["ae"]]), 64 * GiB)
    assert flux.dropped == [models["sd_vae"]] and flux.added["ae"] == models["ae"]


def test_switches_turn_pairing_and_dropping_off(models: dict[str, str]) -> None:
    available = describe_files([models["clip_l"], models["t5_fp8"], models["ae"]])
    plan = choose_pairing(describe_file(models["flux_dev"]), [], available, 16 * GiB, pair=False)
    assert plan.added == {} and plan.missing == ["clip_l", "t5xxl", "ae"]
    keep = choose_pairing(describe_file(models["sdxl"]), describe_files([models["ae"]]), [], 16 * GiB, drop=False)
    assert keep.modules == [models["ae"]] and keep.dropped == []


def test_forge_standin_files_still_pair(tmp_path: Path) -> None:
    """The hook's tests use Forge's minimal recognition keys; the classifier must accept them too."""
    paths = {"clip_l": standin.write(tmp_path / "c.safetensors", standin.clip_l_state_dict()),
             "t5": standin.write(tmp_path / "t.safetensors", standin.t5xxl_state_dict(torch.float8_e4m3fn)),
             "t5_gguf": str(standin.write_city96_t5_gguf(tmp_path / "t.gguf")),
             "ae": standin.write(tmp_path / "a.safetensors", standin.vae_state_dict(16))}
    flux = tmp_path / "f.gguf"
    fixtures.write_gguf(flux, fixtures.random_flux_state_dict(), fixtures.recipe_qtype(Q.Q4_0))
    plan = choose_pairing(describe_file(flux), [], describe_files(list(paths.values())), 16 * GiB)
    assert plan.added == {"clip_l": paths["clip_l"], "t5xxl": paths["t5"], "ae": paths["ae"]}


# ------------------------------------------------------------------------------------- the missing-files message

FOLDERS = {"text_encoder": "/webui/models/text_encoder", "VAE": "/webui/models/VAE"}


def _part_lines(message: str) -> dict[str, list[str]]:
    """The message's block per part: its header line ("  - <title>  ->  <folder>") and download lines."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in message.splitlines():
        if line.startswith("  - "):
            current = line[4:].split("  ->  ")[0]
            blocks[current] = [line]
        elif current and line.startswith("      "):
            blocks[current].append(line)
    return blocks


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell", "flux-kontext", "flux-krea", "flux-fill", "chroma",
                                    "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_missing_message_names_files_urls_and_the_right_folder_per_part(family: str) -> None:
    parts = F.family(family).companions
    message = missing_files_message("/x/model.gguf", parts, FOLDERS, family=family)
    assert message.splitlines()[0].startswith(f"model.gguf ({F.family(family).title}) ")
    blocks = _part_lines(message)
    assert list(blocks) == [F.companion(p).title for p in parts]
    for part in parts:
        comp = F.companion(part)
        header, *downloads = blocks[comp.title]
        right = FOLDERS["VAE" if comp.kind == "vae" else "text_encoder"]
        wrong = FOLDERS["text_encoder" if comp.kind == "vae" else "VAE"]
        assert header.endswith(f"->  {right}") and wrong not in header, header
        assert len(downloads) == len(comp.downloads)
        for line, download in zip(downloads, comp.downloads, strict=True):
            assert download.filename in line and download.url in line and download.licence in line
            assert re.search(rf"\b{download.size_gb:g} GB\b", line), line
    # exactly the parts asked for: nothing of other families
    others = {p for fam in F.FAMILIES.values() for p in fam.companions} - set(parts)
    for part in others:
        for download in F.companion(part).downloads:
            assert download.url not in message


def test_missing_message_known_files_and_error() -> None:
    message = missing_files_message("/x/flux1-dev-Q4_0.gguf", ["clip_l", "t5xxl", "ae"], FOLDERS)
    for needle in ("flux1-dev-Q4_0.gguf", "comfyanonymous/flux_text_encoders/blob/main/clip_l.safetensors",
                   "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors", "t5-v1_1-xxl-encoder-Q8_0.gguf",
                   "black-forest-labs/FLUX.1-schnell/blob/main/ae.safetensors", "Apache-2.0"):
        assert needle in message, needle
    only_ae = missing_files_message("m.gguf", ["ae"], {})
    assert "clip_l.safetensors" not in only_ae and "models/VAE" in only_ae     # default folder when none known
    error = MissingComponentsError("m.gguf", ["qwen3_4b"], FOLDERS, family="flux2-klein-4b")
    assert error.missing == ["qwen3_4b"] and error.family == "flux2-klein-4b"
    assert "qwen_3_4b.safetensors" in str(error) and "/webui/models/text_encoder" in str(error)


def test_unreadable_candidates_are_skipped(tmp_path: Path, models: dict[str, str]) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05")
    legacy = tmp_path / "old.ckpt"
    legacy.write_bytes(b"")
    assert [c.path for c in describe_files([str(broken), str(legacy), models["ae"]])] == [models["ae"]]
