"""The family table and the one classifier, on header-faithful files of every family, companion and format.

References: diffusers' own FLUX.1 model and BFL->diffusers conversion (FLUX.1 geometry), published Hugging Face
file sizes (every family's geometry, the companions', city96's GGUF recipe for FLUX.2, Nunchaku's layout),
gguf-py's tensor name maps (GGUF names of T5 / Qwen3 / Mistral) and the reference readers (safetensors.safe_open,
gguf.GGUFReader) that every file written here must satisfy. Nothing expected is computed by fluxq.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open

from lib_fluxq import families as F
from lib_fluxq.classify import classify_file
from lib_fluxq.flux import (
    CHROMA_HD,
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX_DEV,
    FLUX_FILL,
    FLUX_SCHNELL,
    flux_param_shapes,
)
from tests import family_files as ff

Q = gguf.GGMLQuantizationType
GB = 1e9

# One neutral-named file per geometry: what content alone must say. Kontext / Krea / Klein base share weights with
# the family named here, which content alone returns (and then says which look-alikes exist).
CONTENT = {"flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL, "flux-fill": FLUX_FILL, "chroma": CHROMA_HD,
           "flux2-dev": FLUX2_DEV, "flux2-klein-4b": FLUX2_KLEIN_4B, "flux2-klein-9b": FLUX2_KLEIN_9B}


# --------------------------------------------------------------------------------------- geometry vs references

@pytest.mark.parametrize("guidance", [True, False])
def test_flux1_geometry_is_diffusers_flux_after_diffusers_own_conversion(guidance: bool) -> None:
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    config = FLUX_DEV if guidance else FLUX_SCHNELL
    bfl = {n: torch.empty(s, device="meta") for n, s in flux_param_shapes(config).items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=guidance).state_dict()
    assert {n: tuple(t.shape) for n, t in converted.items()} == {n: tuple(t.shape) for n, t in reference.items()}


# (what, bytes our key set / recipe gives, published figure, its decimals). Published: the Hugging Face listings.
PUBLISHED = [
    ("FLUX.1 dev bf16", lambda: ff.data_bytes(ff.flux_specs(FLUX_DEV)), 23.8, 1),
    ("FLUX.1 dev Q4_0 (city96)", lambda: ff.gguf_data_bytes(ff.flux_gguf_specs(FLUX_DEV, Q.Q4_0)), 6.79, 2),
    ("FLUX.1 dev fp8 (Kijai)", lambda: ff.data_bytes(ff.flux_fp8_specs(FLUX_DEV)), 11.9, 1),
    ("Chroma bf16", lambda: ff.data_bytes(ff.flux_specs(CHROMA_HD)), 17.8, 1),
    ("FLUX.2 dev Q4_0 (city96)", lambda: ff.gguf_data_bytes(ff.flux_gguf_specs(FLUX2_DEV, Q.Q4_0)), 19.3, 1),
    ("FLUX.2 dev Q4_K_S (city96)", lambda: ff.gguf_data_bytes(ff.flux_gguf_specs(FLUX2_DEV, Q.Q4_K)), 19.3, 1),
    ("FLUX.2 dev Q5_K_S (city96)", lambda: ff.gguf_data_bytes(ff.flux_gguf_specs(FLUX2_DEV, Q.Q5_K)), 23.2, 1),
    ("FLUX.2 klein 4B bf16", lambda: ff.data_bytes(ff.flux_specs(FLUX2_KLEIN_4B)), 7.75, 2),
    ("SVDQ INT4 r32 FLUX.1 dev", lambda: ff.data_bytes(ff.nunchaku_flux_specs(False)[0]), 6.77, 2),
    ("SVDQ FP4 r32 FLUX.1 (depth/canny)", lambda: ff.data_bytes(ff.nunchaku_flux_specs(True)[0]), 7.04, 2),
    ("CLIP-L fp16", lambda: ff.data_bytes(ff.clip_l_specs()), 0.246, 3),
    ("T5-XXL fp16 (Comfy)", lambda: ff.data_bytes(ff.t5xxl_specs()), 9.79, 2),
    ("T5-XXL fp8 e4m3fn (Comfy)", lambda: ff.data_bytes(ff.t5xxl_specs("F8_E4M3")), 4.89, 2),
    ("T5-XXL fp8 scaled (Comfy)", lambda: ff.data_bytes(ff.t5xxl_specs("F8_E4M3", scaled=True)), 5.16, 2),
    ("T5-XXL Q8_0 (city96)", lambda: ff.gguf_data_bytes(ff.t5xxl_city96_gguf_specs(Q.Q8_0)), 5.06, 2),
    ("T5-XXL f16 GGUF (city96)", lambda: ff.gguf_data_bytes(ff.t5xxl_city96_gguf_specs(Q.F16)), 9.53, 2),
    ("Qwen3-8B bf16 (Comfy)", lambda: ff.data_bytes(ff.llm_specs(ff.QWEN3_8B)), 16.4, 1),
    ("FLUX.1 ae fp32", lambda: ff.data_bytes(ff.vae_specs(16)), 0.335, 3),
    ("FLUX.2 VAE fp32", lambda: ff.data_bytes(ff.vae_specs(32, flux2=True)), 0.336, 3),
]


@pytest.mark.parametrize(("what", "compute", "published", "decimals"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_key_sets_reproduce_published_sizes(what: str, compute, published: float, decimals: int) -> None:
    # within the listing's rounding, plus 0.1% for what a converter keeps at other precisions (city96's FLUX.1
    # Q4_0 is listed 6.79 GB; this recipe gives 6.797): a wrong block, width or dtype moves it far more
    assert abs(compute() / GB - published) <= 0.5 * 10 ** -decimals + 0.001 * published, what


def test_exact_published_byte_counts_leave_only_a_header() -> None:
    # Hub byte counts: lodestones chroma-v1.safetensors 17,800,038,288; Comfy-Org qwen_3_4b.safetensors
    # 8,044,982,048. The difference to our data bytes is the 8-byte length + JSON header (~100 bytes a tensor).
    for specs, published in ((ff.flux_specs(CHROMA_HD), 17_800_038_288), (ff.llm_specs(ff.QWEN3_4B), 8_044_982_048)):
        header = published - ff.data_bytes(specs)
        assert 60 * len(specs) < header < 160 * len(specs)


def test_table_geometry_is_the_published_parameter_count() -> None:
    # BFL / model cards: Klein "4B" and "9B", FLUX.2 dev 32B, FLUX.1 12B, Chroma 8.9B.
    expected = {"flux-dev": 11.9, "flux-schnell": 11.9, "chroma": 8.9, "flux2-dev": 32.2, "flux2-klein-4b": 3.9,
                "flux2-klein-9b": 9.1}
    for key, billions in expected.items():
        assert round(F.family(key).parameters / 1e9, 1) == billions, key


# ------------------------------------------------------------------------------------------------ table shape

def test_table_rows_are_consistent() -> None:
    for fam in F.FAMILIES.values():
        assert set(fam.hosts) <= set(F.HOSTS), fam.key
        assert set(fam.companions) <= set(F.COMPANIONS) and set(fam.companions) <= fam.accepts, fam.key
        assert fam.accepts | fam.accepts_if_missing <= set(F.COMPANIONS), fam.key
        if fam.same_weights_as:
            base = F.family(fam.same_weights_as)
            assert (fam.signature, fam.geometry, fam.companions) == (base.signature, base.geometry, base.companions)
            assert fam.name_hints, fam.key
        for download in fam.transformers:
            assert download.path.endswith((".gguf", ".safetensors")) and download.size_gb > 0
    for comp in F.COMPANIONS.values():
        assert comp.kind in F.FOLDERS
        if any(comp.key in fam.companions for fam in F.FAMILIES.values()):
            assert comp.downloads, comp.key
            assert all(d.path.endswith((".gguf", ".safetensors")) and d.licence for d in comp.downloads)


def test_each_family_needs_the_right_parts() -> None:
    needs = {k: F.family(k).companions for k in ("flux-dev", "flux-schnell", "flux-kontext", "flux-krea", "flux-fill",
                                                 "chroma", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")}
    assert needs == {"flux-dev": ("clip_l", "t5xxl", "ae"), "flux-schnell": ("clip_l", "t5xxl", "ae"),
                     "flux-kontext": ("clip_l", "t5xxl", "ae"), "flux-krea": ("clip_l", "t5xxl", "ae"),
                     "flux-fill": ("clip_l", "t5xxl", "ae"), "chroma": ("t5xxl", "ae"),
                     "flux2-dev": ("mistral3_24b", "flux2_vae"), "flux2-klein-4b": ("qwen3_4b", "flux2_vae"),
                     "flux2-klein-9b": ("qwen3_8b", "flux2_vae")}
    # txt_in's input is 3 x the text encoder's hidden size (InvokeAI flux2_variant.py), for every FLUX.2 row.
    for key in ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"):
        fam = F.family(key)
        encoder = F.companion(fam.companions[0])
        assert fam.geometry.context_in == 3 * encoder.size


# --------------------------------------------------------------------------------------- files: transformers

# The reference readers map the whole file; this machine refuses maps much larger than its RAM, so files above
# this size are checked by them in test_sparse_writers_satisfy_the_reference_readers at a smaller size only.
REFERENCE_MAP_LIMIT = 12 * 10**9


def _st(path: Path, specs: dict, metadata: dict | None = None) -> Path:
    ff.write_sparse_safetensors(path, specs, metadata)
    if path.stat().st_size < REFERENCE_MAP_LIMIT:
        with safe_open(str(path), "pt") as f:   # the reference reader accepts the file as written
            assert set(f.keys()) == set(specs)
    return path


def _gguf(path: Path, specs: dict, arch: str | None, kv: dict | None = None) -> Path:
    ff.write_sparse_gguf(path, specs, arch, kv)
    if path.stat().st_size < REFERENCE_MAP_LIMIT:
        reader = gguf.GGUFReader(str(path))
        assert {t.name for t in reader.tensors} == set(specs)
    return path


def test_sparse_writers_satisfy_the_reference_readers(tmp_path: Path) -> None:
    specs = ff.flux_specs(FLUX2_KLEIN_4B)
    specs["x.comfy_quant"] = ("U8", (17,), b'{"format":"mxfp8"}'[:17])
    path = ff.write_sparse_safetensors(tmp_path / "k.safetensors", specs, {"modelspec.title": "t"})
    assert path.stat().st_size - ff.data_bytes(specs) < 40_000      # sparse: data never written ...
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"modelspec.title": "t"}
        for name, (dtype, shape, *_) in specs.items():
            assert (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) == (dtype, shape), name
        assert bytes(f.get_tensor("x.comfy_quant").numpy()) == b'{"format":"mxfp8"}'[:17]   # ... except markers
    gspecs = ff.flux_gguf_specs(FLUX2_KLEIN_4B, Q.Q4_K)
    gpath = ff.write_sparse_gguf(tmp_path / "k.gguf", gspecs, "flux", {"general.name": "n"})
    reader = gguf.GGUFReader(str(gpath))
    assert reader.fields["general.name"].contents() == "n"
    for tensor in reader.tensors:
        qtype, shape = gspecs[tensor.name]
        assert (tensor.tensor_type, tuple(int(d) for d in reversed(list(tensor.shape)))) == (qtype, shape)
    assert int(reader.tensors[-1].data_offset) + int(reader.tensors[-1].n_bytes) <= gpath.stat().st_size


@pytest.mark.parametrize("family", list(CONTENT))
def test_every_family_by_content_from_a_neutral_name(tmp_path: Path, family: str) -> None:
    config = CONTENT[family]
    got = classify_file(_st(tmp_path / "model.safetensors", ff.flux_specs(config)))
    assert (got.family, got.decided_by, got.format) == (family, "content", "bf16")
    assert got.parts == {"transformer"} and got.needs == F.family(family).companions
    assert got.details["hidden_size"] == config.hidden and got.details["in_channels"] == config.in_channels
    assert (got.details["double_blocks"], got.details["single_blocks"]) == (config.depth, config.depth_single)
    prefixed = classify_file(_st(tmp_path / "p.safetensors", ff.flux_specs(config, prefix="model.diffusion_model.")))
    assert prefixed.family == family


@pytest.mark.parametrize("family", list(CONTENT))
def test_every_family_as_city96_gguf_says_flux_and_is_told_apart_by_tensors(tmp_path: Path, family: str) -> None:
    path = _gguf(tmp_path / "model.gguf", ff.flux_gguf_specs(CONTENT[family], Q.Q4_K), arch="flux")
    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "flux"
    got = classify_file(path)
    assert (got.family, got.format, got.precisions["transformer"]) == (family, "gguf", "gguf")
    assert got.details["in_channels"] == CONTENT[family].in_channels


@pytest.mark.parametrize(("name", "family"), [
    ("flux1-kontext-dev-Q4_K_S.gguf", "flux-kontext"), ("FLUX.1-Kontext-dev.safetensors", "flux-kontext"),
    ("flux1-krea-dev_fp8_scaled.safetensors", "flux-krea"), ("flux1-dev-Q4_K_S.gguf", "flux-dev"),
    ("flux-2-klein-base-4b.safetensors", "flux2-klein-base-4b"), ("flux-2-klein-4b.safetensors", "flux2-klein-4b"),
    ("flux-2-klein-base-9b-Q8_0.gguf", "flux2-klein-base-9b"), ("database-klein-4b.safetensors", "flux2-klein-4b"),
])
def test_same_weights_decided_by_name_and_says_so(tmp_path: Path, name: str, family: str) -> None:
    config = FLUX2_KLEIN_9B if "9b" in name else FLUX2_KLEIN_4B if "klein" in name else FLUX_DEV
    if name.endswith(".gguf"):
        path = _gguf(tmp_path / name, ff.flux_gguf_specs(config, Q.Q8_0), arch="flux")
    else:
        path = _st(tmp_path / name, ff.flux_specs(config))
    got = classify_file(path)
    base = F.family(family).same_weights_as or family
    assert got.family == family and got.look_alikes[0] == (base if base != family else got.look_alikes[0])
    assert got.decided_by == ("content" if family == base else "name")
    if got.decided_by == "name":
        assert got.decided_text().startswith("decided by: name")


def test_metadata_decides_before_the_name(tmp_path: Path) -> None:
    path = _st(tmp_path / "flux1-krea-dev.safetensors", ff.flux_specs(FLUX_DEV),
               {"modelspec.title": "FLUX.1 Kontext [dev]"})
    got = classify_file(path)
    assert (got.family, got.decided_by) == ("flux-kontext", "metadata")
    gguf_path = _gguf(tmp_path / "x.gguf", ff.flux_gguf_specs(FLUX_DEV, Q.Q8_0), "flux",
                      {"general.name": "FLUX.1 Krea dev"})
    assert (classify_file(gguf_path).family, classify_file(gguf_path).decided_by) == ("flux-krea", "metadata")


def test_diffusers_named_flux1(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    for guidance, family in ((True, "flux-dev"), (False, "flux-schnell")):
        with torch.device("meta"):
            model = FluxTransformer2DModel(guidance_embeds=guidance)
        specs = {n: ("BF16", tuple(t.shape)) for n, t in model.state_dict().items()}
        got = classify_file(_st(tmp_path / f"diffusers-{guidance}.safetensors", specs))
        assert got.family == family and got.details["double_blocks"] == 19 and got.details["single_blocks"] == 38


def test_unknown_flux_variants_fall_back_to_their_architecture(tmp_path: Path) -> None:
    control = ff.flux_specs(FLUX_DEV)
    control["img_in.weight"] = ("BF16", (3072, 128))           # Depth / Canny: 128 input channels
    assert classify_file(_st(tmp_path / "depth.safetensors", control)).family == "flux-other"
    odd = ff.flux_specs(FLUX2_KLEIN_4B)
    odd["txt_in.weight"] = ("BF16", (3072, 512))
    got = classify_file(_st(tmp_path / "odd.safetensors", odd))
    assert got.family == "flux2-other" and got.needs == ("flux2_vae",)


# ------------------------------------------------------------------------------------------ files: companions

def _llm(config: dict, **kw) -> dict:
    return ff.llm_specs(config, **kw)


COMPANION_FILES = {
    "clip_l fp16": (lambda p: _st(p / "a.safetensors", ff.clip_l_specs()), "clip_l", "fp16"),
    "t5xxl fp16": (lambda p: _st(p / "a.safetensors", ff.t5xxl_specs()), "t5xxl", "fp16"),
    "t5xxl fp8": (lambda p: _st(p / "a.safetensors", ff.t5xxl_specs("F8_E4M3")), "t5xxl", "fp8"),
    "t5xxl fp8 scaled": (lambda p: _st(p / "a.safetensors", ff.t5xxl_specs("F8_E4M3", scaled=True)), "t5xxl", "fp8"),
    "t5xxl city96 Q8_0": (lambda p: _gguf(p / "a.gguf", ff.t5xxl_city96_gguf_specs(Q.Q8_0), "t5encoder"),
                          "t5xxl", "gguf"),
    "t5xxl city96 F16": (lambda p: _gguf(p / "a.gguf", ff.t5xxl_city96_gguf_specs(Q.F16), "t5encoder"),
                         "t5xxl", "fp16"),
    "qwen3_4b bf16": (lambda p: _st(p / "a.safetensors", _llm(ff.QWEN3_4B)), "qwen3_4b", "bf16"),
    "qwen3_4b GGUF": (lambda p: _gguf(p / "a.gguf", ff.llm_gguf_specs(ff.QWEN3_4B, gguf.MODEL_ARCH.QWEN3), "qwen3"),
                      "qwen3_4b", "gguf"),
    "qwen3_8b fp8": (lambda p: _st(p / "a.safetensors", _llm(ff.QWEN3_8B, fp8_linears=True)), "qwen3_8b", "fp8"),
    "qwen3_8b GGUF": (lambda p: _gguf(p / "a.gguf", ff.llm_gguf_specs(ff.QWEN3_8B, gguf.MODEL_ARCH.QWEN3), "qwen3"),
                      "qwen3_8b", "gguf"),
    "mistral 40 layers bf16": (lambda p: _st(p / "a.safetensors", _llm(ff.MISTRAL_24B)), "mistral3_24b", "bf16"),
    "mistral 30 layers fp8, text_encoder. prefix": (
        lambda p: _st(p / "a.safetensors", _llm({**ff.MISTRAL_24B, "layers": 30}, prefix="text_encoder.",
                                                fp8_linears=True)), "mistral3_24b", "fp8"),
    "mistral GGUF (arch llama)": (
        lambda p: _gguf(p / "a.gguf", ff.llm_gguf_specs(ff.MISTRAL_24B, gguf.MODEL_ARCH.LLAMA, Q.Q4_K), "llama"),
        "mistral3_24b", "gguf"),
    "FLUX.1 ae": (lambda p: _st(p / "a.safetensors", ff.vae_specs(16)), "ae", "fp32"),
    "FLUX.2 VAE": (lambda p: _st(p / "a.safetensors", ff.vae_specs(32, flux2=True)), "flux2_vae", "fp32"),
    "SD VAE": (lambda p: _st(p / "a.safetensors", ff.vae_specs(4, dtype="F16")), "sd_vae", "fp16"),
}


@pytest.mark.parametrize("case", list(COMPANION_FILES))
def test_every_companion_is_told_by_content(tmp_path: Path, case: str) -> None:
    build, part, precision = COMPANION_FILES[case]
    got = classify_file(build(tmp_path))
    assert (got.family, got.parts, got.precisions.get(part)) == (None, {part}, precision)


def test_lookalike_encoders_are_not_companions(tmp_path: Path) -> None:
    # Llama-2-13B has Mistral-Small's hidden size but a 32000 vocabulary (InvokeAI rejects it the same way);
    # Qwen3-1.7B (hidden 2048) fits neither Klein.
    llama13 = {**ff.MISTRAL_24B, "vocab": 32000, "inter": 13824, "kv_heads": 40, "heads": 40}
    assert classify_file(_st(tmp_path / "l.safetensors", _llm(llama13))).parts == set()
    qwen17 = {**ff.QWEN3_4B, "hidden": 2048, "inter": 6144, "heads": 16, "layers": 28}
    assert classify_file(_st(tmp_path / "q.safetensors", _llm(qwen17))).parts == set()


def test_all_in_one_checkpoint_holds_every_part(tmp_path: Path) -> None:
    specs = {**ff.flux_specs(FLUX_DEV, "F8_E4M3", prefix="model.diffusion_model."),
             **ff.clip_l_specs(prefix="text_encoders.clip_l.transformer."),
             **ff.t5xxl_specs("F8_E4M3", prefix="text_encoders.t5xxl.transformer."),
             **{f"vae.{n}": s for n, s in ff.vae_specs(16, dtype="BF16").items()}}
    got = classify_file(_st(tmp_path / "aio.safetensors", specs))
    assert got.family == "flux-dev" and got.parts == {"transformer", "clip_l", "t5xxl", "ae"} and got.needs == ()
    assert got.precisions == {"transformer": "fp8", "clip_l": "fp16", "t5xxl": "fp8", "ae": "bf16"}


# --------------------------------------------------------------------------------------------------- formats

FORMAT_FILES = {
    "bnb-nf4": lambda p: _st(p / "a.safetensors", ff.nf4_specs(FLUX_DEV)),
    "fp8-e4m3fn": lambda p: _st(p / "a.safetensors", ff.flux_fp8_specs(FLUX_DEV)),
    "fp8-e5m2": lambda p: _st(p / "a.safetensors", ff.flux_fp8_specs(FLUX_DEV, "F8_E5M2")),
    "fp8-scaled": lambda p: _st(p / "a.safetensors", ff.flux_scaled_fp8_specs(FLUX_DEV)),
    "comfy-nvfp4 (metadata)": lambda p: _st(p / "a.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "nvfp4", False)),
    "comfy-nvfp4 (per layer)": lambda p: _st(p / "a.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "nvfp4", True)),
    "comfy-mxfp8": lambda p: _st(p / "a.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "mxfp8", True)),
    "comfy-int8": lambda p: _st(p / "a.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "int8_tensorwise", True)),
    "comfy-fp8": lambda p: _st(p / "a.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "float8_e4m3fn", False)),
    "svdq-int4": lambda p: _st(p / "a.safetensors", *ff.nunchaku_flux_specs(False)),
    "svdq-fp4": lambda p: _st(p / "a.safetensors", *ff.nunchaku_flux_specs(True)),
}


@pytest.mark.parametrize("case", list(FORMAT_FILES))
def test_every_format_is_named_and_keeps_the_family(tmp_path: Path, case: str) -> None:
    got = classify_file(FORMAT_FILES[case](tmp_path))
    assert got.format == case.split(" ")[0] and got.family == "flux-dev", (got.format, got.family)


def test_svdq_hosts_say_nunchaku_on_neo_only() -> None:
    assert F.runs_on("flux-dev", "svdq-int4", "neo").runs
    assert "needs Nunchaku" in F.runs_on("flux-dev", "svdq-int4", "neo").note
    assert not F.runs_on("flux-dev", "svdq-int4", "forge").runs
    assert "Forge Neo (2.26): yes (needs Nunchaku" in F.host_summary("flux-dev", "svdq-int4")
    # a family no host runs stays refused whatever the format
    assert not F.runs_on("flux2-dev", "gguf", "neo").runs and F.runs_on("flux2-klein-4b", "gguf", "neo").runs


def test_comfy_mixed_reads_only_the_marker_bytes(tmp_path: Path) -> None:
    path = FORMAT_FILES["comfy-nvfp4 (per layer)"](tmp_path)
    got = classify_file(path)
    layers = sum(1 for n, s in flux_param_shapes(FLUX_DEV).items() if len(s) == 2 and "blocks." in n)
    assert dict(got.format_mix) == {"nvfp4": layers}
    size = path.stat().st_size
    assert math.isclose(size / GB, 6.8, abs_tol=0.3)   # nvfp4 FLUX.1 dev is about 6.8 GB; we read kilobytes of it


def test_readme_and_docs_tables_are_the_table() -> None:
    """README.md and docs/families.md show the rows this module generates (regenerate them when the table grows)."""
    root = Path(__file__).resolve().parents[1]
    for doc, generated in (("README.md", {"families.markdown_families(compact=True)": F.markdown_families(True)}),
                           ("docs/families.md", {"families.markdown_families()": F.markdown_families(),
                                                 "families.markdown_companions()": F.markdown_companions(),
                                                 "families.markdown_formats()": F.markdown_formats()})):
        text = (root / doc).read_text()
        for marker, table in generated.items():
            begin = f"<!-- generated: {marker} -->\n"
            assert begin + table + "\n<!-- end generated -->" in text, (doc, marker)


def test_diffusers_named_flux2(tmp_path: Path) -> None:
    """FLUX.2 under diffusers' names (FLUX2_TRANSFORMER_KEYS_RENAME_DICT and the block maps, as listed in
    shared/FAMILY_NOTES.md §3): told apart by context_embedder's width and the guidance embedder, like BFL names."""
    def diffusers_flux2(config) -> dict:
        h, m = config.hidden, config.mlp_hidden
        specs = {"x_embedder.weight": (h, 128), "context_embedder.weight": (h, config.context_in),
                 "time_guidance_embed.timestep_embedder.linear_1.weight": (h, 256),
                 "time_guidance_embed.timestep_embedder.linear_2.weight": (h, h),
                 "double_stream_modulation_img.linear.weight": (6 * h, h),
                 "double_stream_modulation_txt.linear.weight": (6 * h, h),
                 "single_stream_modulation.linear.weight": (3 * h, h),
                 "norm_out.linear.weight": (2 * h, h), "proj_out.weight": (128, h)}
        if config.guidance:
            specs["time_guidance_embed.guidance_embedder.linear_1.weight"] = (h, 256)
            specs["time_guidance_embed.guidance_embedder.linear_2.weight"] = (h, h)
        for i in range(config.depth):
            p = f"transformer_blocks.{i}."
            for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                specs[f"{p}attn.{proj}.weight"] = (h, h)
            specs[f"{p}attn.to_out.0.weight"] = (h, h)
            specs[f"{p}attn.to_add_out.weight"] = (h, h)
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                specs[f"{p}attn.{norm}.weight"] = (128,)
            for ff_name in ("ff", "ff_context"):
                specs[f"{p}{ff_name}.linear_in.weight"] = (2 * m, h)
                specs[f"{p}{ff_name}.linear_out.weight"] = (h, m)
        for i in range(config.depth_single):
            p = f"single_transformer_blocks.{i}.attn."
            specs[f"{p}to_qkv_mlp_proj.weight"] = (3 * h + 2 * m, h)
            specs[f"{p}to_out.weight"] = (h, h + m)
            specs[f"{p}norm_q.weight"] = (128,)
            specs[f"{p}norm_k.weight"] = (128,)
        return {n: ("BF16", s) for n, s in specs.items()}

    for config, family in ((FLUX2_KLEIN_4B, "flux2-klein-4b"), (FLUX2_KLEIN_9B, "flux2-klein-9b"),
                           (FLUX2_DEV, "flux2-dev")):
        path = _st(tmp_path / f"{family}.safetensors", diffusers_flux2(config))
        got = classify_file(path)
        assert (got.family, got.details["double_blocks"], got.details["single_blocks"]) == \
            (family, config.depth, config.depth_single)
