"""The inspector on files written by the real libraries (gguf-py, safetensors, bitsandbytes, diffusers).

Expected values come from the references: tensor tables from gguf-py's GGUFReader and safetensors' safe_open,
SD/Flux families from diffusers' own single-file classifier, T5 GGUF names from gguf-py's tensor name map,
diffusers Flux/VAE key names from diffusers models, NF4 layouts from bitsandbytes' QuantState.as_dict.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib_fluxq import families
from lib_fluxq.errors import FormatError
from lib_fluxq.flux import (
    CHROMA_HD,
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX_DEV,
    FLUX_FILL,
    FLUX_SCHNELL,
    FluxConfig,
)
from lib_fluxq.formats.gguf_header import read_gguf_header
from lib_fluxq.formats.safetensors_header import read_safetensors_header
from lib_fluxq.inspect import FileReport, inspect_file, scan
from tests import family_files
from tests.fixtures import SMALL_FLUX, drop_root_permission_override, random_flux_state_dict, recipe_qtype, write_gguf

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[1]
# Tiny Flux whose rows are still multiples of 256 (K-quants) — one block of each kind keeps files small.
TINY_FLUX = FluxConfig(hidden=256, heads=2, depth=1, depth_single=1, context_in=256, vec_in=256)
# Smaller still where no K-quant is involved (head_dim stays 128).
MINI_FLUX = FluxConfig(hidden=128, heads=1, depth=1, depth_single=1, context_in=128, vec_in=128)


# --------------------------------------------------------------------------------------------------- builders

def flux_sd(config: FluxConfig = MINI_FLUX, prefix: str = "", dtype: torch.dtype = torch.float16) -> dict:
    return random_flux_state_dict(config, dtype=dtype, prefix=prefix)


def diffusers_reference_type(path: Path) -> str:
    """diffusers' own single-file model classifier on the file's state dict."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    return infer_diffusers_model_type(load_file(str(path)))


def t(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def sd15_unet_keys(prefix: str = "model.diffusion_model.", context: int = 768) -> dict:
    # Marker keys used by diffusers/huggingface_guess/ComfyUI for ldm UNets (tiny widths, real context dims).
    return {f"{prefix}input_blocks.0.0.weight": t(8, 4, 3, 3), f"{prefix}input_blocks.0.0.bias": t(8),
            f"{prefix}input_blocks.1.1.proj_in.weight": t(8, 8, 1, 1),
            f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(8, context),
            f"{prefix}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": t(8, context),
            f"{prefix}middle_block.1.proj_in.weight": t(8, 8, 1, 1),
            f"{prefix}output_blocks.11.0.skip_connection.weight": t(8, 8, 1, 1),
            f"{prefix}out.2.weight": t(4, 8, 3, 3), f"{prefix}time_embed.0.weight": t(8, 8)}


def ldm_vae_keys(prefix: str, latent: int) -> dict:
    return {f"{prefix}encoder.conv_in.weight": t(8, 3, 3, 3), f"{prefix}encoder.down.0.block.0.conv1.weight":
            t(8, 8, 3, 3), f"{prefix}encoder.conv_out.weight": t(2 * latent, 8, 3, 3),
            f"{prefix}decoder.conv_in.weight": t(8, latent, 3, 3), f"{prefix}decoder.mid.attn_1.q.weight":
            t(8, 8, 1, 1), f"{prefix}decoder.up.0.block.0.conv1.weight": t(8, 8, 3, 3),
            f"{prefix}decoder.conv_out.weight": t(3, 8, 3, 3)}


def hf_clip_keys(prefix: str, width: int) -> dict:
    p = f"{prefix}text_model."
    return {f"{p}embeddings.token_embedding.weight": t(4, width), f"{p}embeddings.position_embedding.weight":
            t(4, width), f"{p}encoder.layers.0.self_attn.q_proj.weight": t(8, width),
            f"{p}encoder.layers.0.mlp.fc1.weight": t(8, width), f"{p}final_layer_norm.weight": t(width)}


def open_clip_g_keys(prefix: str) -> dict:
    keys = {f"{prefix}model.positional_embedding": t(4, 1280), f"{prefix}model.ln_final.weight": t(1280),
            f"{prefix}model.token_embedding.weight": t(4, 1280), f"{prefix}model.text_projection": t(1280, 8)}
    for i in range(10):
        keys[f"{prefix}model.transformer.resblocks.{i}.attn.in_proj_weight"] = t(24, 1280)
        keys[f"{prefix}model.transformer.resblocks.{i}.mlp.c_proj.bias"] = t(1280)
    return keys


def hf_t5_keys(prefix: str = "", width: int = 64, blocks: int = 2) -> dict:
    keys = {f"{prefix}shared.weight": t(32, width), f"{prefix}encoder.final_layer_norm.weight": t(width)}
    for i in range(blocks):
        b = f"{prefix}encoder.block.{i}.layer."
        for proj in "qkvo":
            keys[f"{b}0.SelfAttention.{proj}.weight"] = t(width, width)
        keys[f"{b}0.layer_norm.weight"] = t(width)
        for proj in ("wi_0", "wi_1"):
            keys[f"{b}1.DenseReluDense.{proj}.weight"] = t(2 * width, width)
        keys[f"{b}1.DenseReluDense.wo.weight"] = t(width, 2 * width)
        keys[f"{b}1.layer_norm.weight"] = t(width)
    keys[f"{prefix}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = t(32, 2)
    return keys


def write_city96_t5(path: Path, qtype: Q = Q.Q8_0, extra: dict | None = None) -> dict:
    """T5 encoder GGUF with llama.cpp names obtained from gguf-py's own HF->GGUF name map."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 2)
    sd = {name_map.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in hf_t5_keys().items()}
    assert all(sd), "gguf-py must map every T5 name"

    def choose(name: str, shape: tuple[int, ...]) -> Q:
        return qtype if len(shape) == 2 and shape[-1] % 32 == 0 and "token_embd" not in name else Q.F32
    write_gguf(path, {**sd, **(extra or {})}, choose, arch="t5encoder")
    return sd


def nf4_flux_sd(double_quant: bool, prefix: str = "model.diffusion_model.") -> tuple[dict, int]:
    """Forge's NF4 layout: every block Linear weight packed by bitsandbytes + its QuantState.as_dict(packed=True)."""
    import bitsandbytes.functional as bnbf
    sd = flux_sd(prefix=prefix, dtype=torch.bfloat16)
    n_params = sum(v.numel() for v in sd.values())
    out: dict[str, torch.Tensor] = {}
    for name, value in sd.items():
        if value.ndim == 2 and ("blocks." in name or name.startswith(prefix + "img_in")):
            packed, state = bnbf.quantize_4bit(value.float(), quant_type="nf4", blocksize=64,
                                               compress_statistics=double_quant)
            out[name] = packed
            for key, aux in state.as_dict(packed=True).items():
                out[f"{name}.{key}"] = aux
        else:
            out[name] = value
    return out, n_params


def save(path: Path, sd: dict) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def gguf_reference_storage(path: Path) -> dict[str, tuple[int, int]]:
    reader = gguf.GGUFReader(str(path))
    out: dict[str, list[int]] = {}
    for tensor in reader.tensors:
        entry = out.setdefault(tensor.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(tensor.n_bytes)
    return {k: tuple(v) for k, v in out.items()}


def storage_of(report: FileReport) -> dict[str, tuple[int, int]]:
    return {e.dtype: (e.tensors, e.bytes) for e in report.storage}


# -------------------------------------------------------------------------------------- parsers vs references

def test_gguf_header_matches_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    write_gguf(path, flux_sd(SMALL_FLUX), recipe_qtype(Q.Q4_K))
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, ref in zip(header.tensors, reader.tensors, strict=True):
        assert ours.ggml_type == int(ref.tensor_type)
        assert ours.shape == tuple(int(s) for s in reversed(list(ref.shape)))
        assert (ours.offset, ours.n_bytes, ours.n_elements) == (ref.data_offset, ref.n_bytes, ref.n_elements)
    assert header.metadata["general.architecture"] == "flux"
    assert header.bytes_read < header.data_start + 4096


def test_safetensors_header_matches_safe_open(tmp_path: Path) -> None:
    sd = {**flux_sd(), "fp8": t(4, 4, dtype=torch.float8_e4m3fn), "i": torch.arange(3)}
    path = save(tmp_path / "f.safetensors", sd)
    header = read_safetensors_header(path)
    with safe_open(str(path), "pt") as f:
        assert set(header.tensors) == set(f.keys())
        for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
            ref = f.get_slice(name)
            assert header.tensors[name].shape == tuple(ref.get_shape())
            assert header.tensors[name].dtype == ref.get_dtype()
            assert header.tensors[name].n_bytes == sd[name].numel() * sd[name].element_size()


def test_unknown_ggml_type_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    write_gguf(path, {"a.weight": torch.ones(4, 32), "b.weight": torch.ones(4, 32)}, lambda n, s: Q.F32)
    raw = bytearray(path.read_bytes())
    # the type id of 'b.weight' (F32 = 0) sits after its name, n_dims and two dims
    at = raw.index(b"b.weight") + len(b"b.weight") + 4 + 16
    raw[at:at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as info:
        read_gguf_header(path)
    assert info.value.tensor == "b.weight" and "250" in info.value.reason


def test_truncated_gguf_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    write_gguf(path, {"a.weight": torch.ones(4, 32), "b.weight": torch.ones(64, 32)}, lambda n, s: Q.F32)
    last = gguf.GGUFReader(str(path)).tensors[-1]
    with open(path, "r+b") as f:
        f.truncate(int(last.data_offset) + 100)
    with pytest.raises(FormatError) as info:
        read_gguf_header(path)
    assert info.value.tensor == last.name and "truncated" in info.value.reason


# ---------------------------------------------------------------------------------------------- families

@pytest.mark.parametrize("qtype, level", [(Q.Q8_0, "Q8_0"), (Q.Q4_K, "Q4_K_S"), (Q.Q4_0, "Q4_0")])
def test_city96_flux_gguf(tmp_path: Path, qtype: Q, level: str) -> None:
    path = tmp_path / "flux1-dev.gguf"
    sd = flux_sd(TINY_FLUX)
    write_gguf(path, sd, recipe_qtype(qtype))
    r = inspect_file(path)
    assert r.status == "ok", r.error
    assert (r.family, r.key_naming, r.level, r.architecture) == ("flux-dev", "bfl", level, "flux")
    assert r.components == ["transformer"] and r.missing_for_flux == ["clip_l", "t5xxl", "ae"]
    assert storage_of(r) == gguf_reference_storage(path)
    assert r.parameters == sum(v.numel() for v in sd.values())
    assert r.details["in_channels"] == 64 and r.details["guidance"] is True
    assert r.file_size == path.stat().st_size


def test_k_quant_mix_reads_as_m_and_file_type_wins(tmp_path: Path) -> None:
    sd = flux_sd(TINY_FLUX)

    def mixed(name: str, shape: tuple[int, ...]) -> Q:
        base = recipe_qtype(Q.Q4_K)(name, shape)
        return Q.Q6_K if base == Q.Q4_K and ("mlp.2" in name or "linear2" in name) else base
    write_gguf(tmp_path / "m.gguf", sd, mixed)
    assert inspect_file(tmp_path / "m.gguf").level == "Q4_K_M"

    # llama-quantize records its own label in general.file_type; it beats the heuristic (a full-size FLUX.1 dev
    # tensor table in Q4_K, header written by gguf-py, data sparse)
    specs = family_files.flux_gguf_specs(FLUX_DEV, Q.Q4_K)
    family_files.write_sparse_gguf(tmp_path / "ft.gguf", specs, "flux",
                                   {"general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_K_M)})
    r = inspect_file(tmp_path / "ft.gguf")
    assert (r.level, r.level_source) == ("Q4_K_M", "general.file_type")


@pytest.mark.parametrize("guidance, family", [(True, "flux-dev"), (False, "flux-schnell")])
def test_dev_vs_schnell_agrees_with_diffusers(tmp_path: Path, guidance: bool, family: str) -> None:
    config = FluxConfig(**{**MINI_FLUX.__dict__, "guidance": guidance})
    path = save(tmp_path / "f.safetensors", flux_sd(config, prefix="model.diffusion_model.", dtype=torch.bfloat16))
    r = inspect_file(path)
    assert r.family == diffusers_reference_type(path) == family
    assert (r.key_naming, r.level) == ("prefixed", "BF16")


def test_sd_cpp_gguf_without_architecture(tmp_path: Path) -> None:
    path = tmp_path / "sdcpp.gguf"
    write_gguf(path, flux_sd(prefix="model.diffusion_model."), recipe_qtype(Q.Q5_0), arch=None)
    assert "general.architecture" not in read_gguf_header(path).metadata
    r = inspect_file(path)
    assert (r.family, r.key_naming, r.level, r.architecture) == ("flux-dev", "prefixed", "Q5_0", None)


def test_diffusers_named_flux(tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel
    for guidance, family in ((True, "flux-dev"), (False, "flux-schnell")):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=guidance)
        path = save(tmp_path / f"diffusers-{guidance}.safetensors", model.state_dict())
        r = inspect_file(path)
        assert (r.family, r.key_naming, r.components) == (family, "diffusers", ["transformer"])
        assert r.details["single_blocks"] == 2 and r.details["double_blocks"] == 1
        assert r.parameters == sum(p.numel() for p in model.state_dict().values())


def test_flux_fill_in_channels(tmp_path: Path) -> None:
    sd = flux_sd()
    sd["img_in.weight"] = t(MINI_FLUX.hidden, 384)  # Fill: 64 latent + 320 mask/image channels
    write_gguf(tmp_path / "fill.gguf", sd, recipe_qtype(Q.Q8_0))
    r = inspect_file(tmp_path / "fill.gguf")
    assert (r.family, r.details["in_channels"]) == ("flux-fill", 384)


@pytest.mark.parametrize("double_quant, level", [(True, "NF4 v1"), (False, "NF4 v2")])
def test_nf4_all_in_one(tmp_path: Path, double_quant: bool, level: str) -> None:
    transformer, n_params = nf4_flux_sd(double_quant)
    sd = {**transformer, **ldm_vae_keys("vae.", 16), **hf_clip_keys("text_encoders.clip_l.transformer.", 768),
          **{k: v.to(torch.float8_e4m3fn) for k, v in hf_t5_keys("text_encoders.t5xxl.transformer.").items()}}
    path = save(tmp_path / "flux1-dev-bnb-nf4.safetensors", sd)
    r = inspect_file(path)
    assert (r.family, r.key_naming, r.level) == ("flux-dev", "prefixed", level)
    assert r.components == ["transformer", "ae", "clip_l", "t5xxl"] and r.missing_for_flux == []
    levels = {c.name: c.level for c in r.component_details}
    assert levels == {"transformer": level, "ae": "F16", "clip_l": "F16", "t5xxl": "FP8 e4m3fn"}
    transformer_report = r.component_details[0]
    assert transformer_report.parameters == n_params  # 4-bit packed weights count two values per byte
    assert transformer_report.bytes == sum(v.numel() * v.element_size() for v in transformer.values())
    assert r.details["in_channels"] == 64  # recovered from the packed img_in
    assert r.details["bnb_double_quant"] is double_quant


@pytest.mark.parametrize("dtype, level", [(torch.float8_e4m3fn, "FP8 e4m3fn"), (torch.float8_e5m2, "FP8 e5m2")])
def test_fp8_transformer(tmp_path: Path, dtype: torch.dtype, level: str) -> None:
    sd = {k: (v.to(dtype) if v.ndim == 2 else v) for k, v in flux_sd(prefix="model.diffusion_model.").items()}
    r = inspect_file(save(tmp_path / "fp8.safetensors", sd))
    assert (r.family, r.level) == ("flux-dev", level)


def test_city96_t5_gguf(tmp_path: Path) -> None:
    sd = write_city96_t5(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf")
    r = inspect_file(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf")
    assert (r.family, r.key_naming, r.components, r.level) == ("t5xxl", "city96", ["t5xxl"], "Q8_0")
    assert r.missing_for_flux == []   # a part file: nothing is missing *from it*
    assert r.architecture == "t5encoder" and r.tensors == len(sd)


def test_text_encoders_and_vaes(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    cases = {
        "t5xxl_fp16.safetensors": (hf_t5_keys(), "t5xxl", "hf"),
        "clip_l.safetensors": (hf_clip_keys("", 768), "clip_l", "hf"),
        "clip_g.safetensors": (hf_clip_keys("", 1280), "clip_g", "hf"),
        "ae.safetensors": (ldm_vae_keys("", 16), "ae", "ldm"),
        "sd-vae.safetensors": (ldm_vae_keys("", 4), "sd_vae", "ldm"),
    }
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(8,), latent_channels=16, norm_num_groups=4)
    cases["diffusers-vae.safetensors"] = (vae.state_dict(), "ae", "diffusers")
    for name, (sd, family, naming) in cases.items():
        r = inspect_file(save(tmp_path / name, sd))
        assert (r.family, r.key_naming) == (family, naming), name
    assert inspect_file(tmp_path / "ae.safetensors").components == ["ae"]


def test_sd_checkpoints_agree_with_diffusers(tmp_path: Path) -> None:
    sd15 = {**sd15_unet_keys(), **ldm_vae_keys("first_stage_model.", 4),
            **hf_clip_keys("cond_stage_model.transformer.", 768)}
    sd2 = {**sd15_unet_keys(context=1024), **ldm_vae_keys("first_stage_model.", 4)}
    sdxl = {**sd15_unet_keys(context=2048), "model.diffusion_model.label_emb.0.0.weight": t(8, 2816),
            **ldm_vae_keys("first_stage_model.", 4), **hf_clip_keys("conditioner.embedders.0.transformer.", 768),
            **open_clip_g_keys("conditioner.embedders.1.")}
    p = "model.diffusion_model."
    sd3 = {f"{p}joint_blocks.0.context_block.attn.qkv.weight": t(24, 8),
           f"{p}joint_blocks.0.context_block.adaLN_modulation.1.bias": t(9216),
           f"{p}joint_blocks.0.x_block.attn.qkv.weight": t(24, 8), f"{p}x_embedder.proj.weight": t(8, 16, 2, 2),
           f"{p}context_embedder.weight": t(8, 64), f"{p}final_layer.linear.weight": t(64, 8),
           **ldm_vae_keys("first_stage_model.", 16), **hf_clip_keys("text_encoders.clip_l.transformer.", 768),
           **hf_clip_keys("text_encoders.clip_g.transformer.", 1280),
           **hf_t5_keys("text_encoders.t5xxl.transformer.")}
    expected = {"sd15": (sd15, "v1", ["unet", "sd_vae", "clip_l"]), "sd2": (sd2, "v2", ["unet", "sd_vae"]),
                "sdxl": (sdxl, "xl_base", ["unet", "sd_vae", "clip_l", "clip_g"]),
                "sd3": (sd3, "sd3", ["transformer", "ae", "clip_l", "clip_g", "t5xxl"])}
    for family, (sd, diffusers_type, components) in expected.items():
        path = save(tmp_path / f"{family}.safetensors", sd)
        assert diffusers_reference_type(path) == diffusers_type  # the key set is what diffusers calls it
        r = inspect_file(path)
        assert (r.family, r.components, r.missing_for_flux) == (family, components, []), family


def lora_cases() -> dict[str, tuple[dict, str, str, str, int]]:
    rank = 4
    kohya_flux, xlabs, bfl, diffusers_flux, kohya_sd, kohya_sdxl = {}, {}, {}, {}, {}, {}
    for i in range(2):
        kohya_flux[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight"] = t(rank, 64)
        kohya_flux[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.weight"] = t(192, rank)
        kohya_flux[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = t(1)
        kohya_flux[f"lora_unet_single_blocks_{i + 5}_linear1.lora_down.weight"] = t(rank, 64)
        kohya_flux[f"lora_unet_single_blocks_{i + 5}_linear1.lora_up.weight"] = t(448, rank)
        xlabs[f"double_blocks.{i}.processor.qkv_lora1.down.weight"] = t(rank, 64)
        xlabs[f"double_blocks.{i}.processor.qkv_lora1.up.weight"] = t(192, rank)
        xlabs[f"double_blocks.{i}.processor.proj_lora2.down.weight"] = t(rank, 64)
        xlabs[f"double_blocks.{i}.processor.proj_lora2.up.weight"] = t(64, rank)
        bfl[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_A.weight"] = t(rank, 64)
        bfl[f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_B.weight"] = t(192, rank)
        diffusers_flux[f"transformer.single_transformer_blocks.{i}.attn.to_k.lora_A.weight"] = t(rank, 64)
        diffusers_flux[f"transformer.single_transformer_blocks.{i}.attn.to_k.lora_B.weight"] = t(64, rank)
        kohya_sd[f"lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_down.weight"] = t(rank, 32)
        kohya_sd[f"lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_up.weight"] = t(32, rank)
        kohya_sdxl[f"lora_unet_input_blocks_{i + 4}_1_transformer_blocks_0_attn1_to_k.lora_down.weight"] = \
            t(rank, 32)
    kohya_sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = t(rank, 32)
    kohya_sdxl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = t(rank, 32)
    return {
        "kohya_flux": (kohya_flux, "flux-lora", "kohya", "flux", rank),
        "xlabs": (xlabs, "flux-lora", "xlabs", "flux", rank),
        "bfl": (bfl, "flux-lora", "bfl", "flux", rank),
        "diffusers_flux": (diffusers_flux, "flux-lora", "diffusers", "flux", rank),
        "kohya_sd": (kohya_sd, "sd-lora", "kohya", "sd", rank),
        "kohya_sdxl": (kohya_sdxl, "sd-lora", "kohya", "sdxl", rank),
    }


def test_loras(tmp_path: Path) -> None:
    for name, (sd, family, naming, target, rank) in lora_cases().items():
        r = inspect_file(save(tmp_path / f"{name}.safetensors", sd))
        assert r.lora is not None, name
        assert (r.family, r.lora.naming, r.lora.target, r.lora.rank) == (family, naming, target, rank), name
    kohya = inspect_file(tmp_path / "kohya_flux.safetensors").lora
    assert kohya.blocks == {"double_blocks": [0, 1], "single_blocks": [5, 6]} and kohya.modules == 4
    assert inspect_file(tmp_path / "kohya_sd.safetensors").lora.text_encoder is True


# ----------------------------------------------------------------------------------------------- bad input

def bad_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    files["empty"] = root / "empty.safetensors"
    files["empty"].write_bytes(b"")
    good = save(root / "good.safetensors", flux_sd())
    raw = good.read_bytes()
    files["truncated_header"] = root / "truncated.safetensors"
    files["truncated_header"].write_bytes(raw[:40])
    files["length_too_big"] = root / "biglen.safetensors"
    files["length_too_big"].write_bytes((10 ** 12).to_bytes(8, "little") + raw[8:200])
    body = b"[1, 2, 3]"
    files["json_not_object"] = root / "list.safetensors"
    files["json_not_object"].write_bytes(len(body).to_bytes(8, "little") + body)
    body = b'{"\xff\xfe": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}'
    files["non_utf8_name"] = root / "nonutf8.safetensors"
    files["non_utf8_name"].write_bytes(len(body).to_bytes(8, "little") + body + b"\0\0")
    good_gguf = root / "good.gguf"
    write_gguf(good_gguf, {"a.weight": torch.ones(4, 32)}, lambda n, s: Q.F32)
    graw = bytearray(good_gguf.read_bytes())
    at = graw.index(b"a.weight")
    graw[at] = 0xFF  # tensor name no longer UTF-8
    files["non_utf8_gguf_name"] = root / "nonutf8.gguf"
    files["non_utf8_gguf_name"].write_bytes(bytes(graw))
    files["truncated_gguf"] = root / "short.gguf"
    files["truncated_gguf"].write_bytes(good_gguf.read_bytes()[:30])
    files["directory"] = root / "folder.safetensors"
    files["directory"].mkdir()
    files["symlink_loop"] = root / "loop.safetensors"
    os.symlink(root / "loop2.safetensors", files["symlink_loop"])
    os.symlink(files["symlink_loop"], root / "loop2.safetensors")
    return files


def test_bad_files_are_unreadable_and_scan_continues(tmp_path: Path) -> None:
    files = bad_files(tmp_path)
    for kind, path in files.items():
        r = inspect_file(path)
        assert r.status == "unreadable" and r.error, (kind, r)
    reports = {Path(r.path).name: r for r in scan([tmp_path])}
    assert reports["good.safetensors"].family == "flux-dev"
    assert reports["good.gguf"].status == "ok"
    for kind, path in files.items():
        assert reports[path.name].status == "unreadable", kind
    assert "is empty" in reports["empty.safetensors"].error
    assert "truncated safetensors" in reports["biglen.safetensors"].error
    assert "expected an object" in reports["list.safetensors"].error
    assert "is a folder" in reports["folder.safetensors"].error
    assert "symbolic link loop" in reports["loop.safetensors"].error
    # broken files come after every readable one
    statuses = [r.status for r in scan([tmp_path])]
    assert statuses == sorted(statuses, key=lambda s: s != "ok")


def test_permission_denied(tmp_path: Path) -> None:
    """A file and a folder without read permission: in a child process that meets permission bits even as root."""
    path = save(tmp_path / "locked.safetensors", flux_sd())
    (tmp_path / "locked_folder").mkdir()
    save(tmp_path / "locked_folder" / "inside.safetensors", flux_sd())
    path.chmod(0)
    (tmp_path / "locked_folder").chmod(0)
    probe = ("import json, sys; from lib_fluxq.inspect import inspect_file, scan; "
             "r = inspect_file(sys.argv[1]); s = scan([sys.argv[2]]); "
             "print(json.dumps([[r.status, r.error], [[x.path, x.status, x.error] for x in s]]))")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(path), str(tmp_path)], capture_output=True, text=True,
                              timeout=120, preexec_fn=drop_root_permission_override,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert done.returncode == 0, done.stderr
        (status, error), scanned = json.loads(done.stdout)
        assert status == "unreadable" and "permission denied" in error
        assert [(Path(p).name, s) for p, s, _ in scanned] == [("locked.safetensors", "unreadable"),
                                                             ("locked_folder", "unreadable")]
        assert all("permission denied" in e for _, _, e in scanned)
    finally:
        path.chmod(0o644)
        (tmp_path / "locked_folder").chmod(0o755)


def test_scan_of_webui_root_and_symlinked_folder_loop(tmp_path: Path) -> None:
    models = tmp_path / "webui" / "models"
    for folder in ("Stable-diffusion", "text_encoder", "VAE", "Lora", "ESRGAN"):
        (models / folder).mkdir(parents=True)
    write_gguf(models / "Stable-diffusion" / "flux.gguf", flux_sd(), recipe_qtype(Q.Q8_0))
    save(models / "VAE" / "ae.safetensors", ldm_vae_keys("", 16))
    save(models / "VAE" / "t5.safetensors", hf_t5_keys())  # misplaced
    save(models / "ESRGAN" / "not-a-model-folder.safetensors", ldm_vae_keys("", 4))
    os.symlink(models / "Lora", models / "Lora" / "again")  # folder loop
    save(models / "Lora" / "l.safetensors", lora_cases()["kohya_flux"][0])
    reports = scan([tmp_path / "webui"])
    names = [Path(r.path).name for r in reports]
    assert sorted(names) == ["ae.safetensors", "flux.gguf", "l.safetensors", "t5.safetensors"]
    by_name = {Path(r.path).name: r for r in reports}
    assert by_name["flux.gguf"].folder == "Stable-diffusion"
    assert any("text_encoder" in n for n in by_name["t5.safetensors"].notes)


# ------------------------------------------------------------------------------------ speed and bytes read

def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
    except (OSError, StopIteration):
        return None


def test_scan_200_files_reads_under_one_percent(tmp_path: Path) -> None:
    """Timing is informative only on this shared machine: the bound is generous (brief: < 2 s)."""
    if _rchar() is None:
        pytest.skip("/proc/self/io not available")
    templates = tmp_path / "templates"
    templates.mkdir()
    pad = {"pad": torch.zeros(1 << 18)}  # a real model is GBs: pad small files to >= 1 MB with a real tensor
    made = [
        save(templates / "prefixed.safetensors", flux_sd(MINI_FLUX, prefix="model.diffusion_model.")),
        save(templates / "t5.safetensors", hf_t5_keys()),
        save(templates / "ae.safetensors", ldm_vae_keys("", 16)),
        save(templates / "lora.safetensors", lora_cases()["kohya_flux"][0]),
        save(templates / "sd15.safetensors", {**sd15_unet_keys(), **ldm_vae_keys("first_stage_model.", 4)}),
        save(templates / "nf4.safetensors", nf4_flux_sd(double_quant=False)[0]),
    ]
    for qtype, config in ((Q.Q8_0, MINI_FLUX), (Q.Q4_0, MINI_FLUX), (Q.Q4_K, TINY_FLUX)):
        path = templates / f"flux-{qtype.name}.gguf"
        write_gguf(path, {**flux_sd(config), **pad}, recipe_qtype(qtype))
        made.append(path)
    for path in made:
        if path.suffix == ".safetensors" and path.stat().st_size < 1 << 20:
            save(path, {**load_file(str(path)), **pad})
    write_city96_t5(templates / "t5.gguf", extra=pad)
    made.append(templates / "t5.gguf")
    folder = tmp_path / "models"
    folder.mkdir()
    for i in range(200):
        source = made[i % len(made)]
        shutil.copyfile(source, folder / f"{i:03d}-{source.name}")
    total = sum(p.stat().st_size for p in folder.iterdir())
    before, start = _rchar(), time.perf_counter()
    reports = scan([folder])
    elapsed, read = time.perf_counter() - start, _rchar() - before
    assert len(reports) == 200 and all(r.status == "ok" for r in reports)
    assert read < 0.01 * total, f"read {read} of {total} bytes"
    assert sum(r.header_bytes_read for r in reports) <= read
    print(f"\nscan of 200 files ({total / 1e6:.0f} MB): {elapsed:.3f} s, read {read} bytes "
          f"({100 * read / total:.3f}%)")


# -------------------------------------------------------------------------------------------------- CLI/JSON

def test_cli_json_and_table(tmp_path: Path) -> None:
    write_gguf(tmp_path / "flux.gguf", flux_sd(), recipe_qtype(Q.Q4_0))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lib_fluxq", "inspect", str(tmp_path)]
    out = subprocess.run(cmd + ["--json", "--hash"], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 1, out.stderr  # listed, but a broken file is a failure to report
    data = {Path(d["path"]).name: d for d in json.loads(out.stdout)}
    flux = data["flux.gguf"]
    import hashlib
    assert flux["sha256"] == hashlib.sha256((tmp_path / "flux.gguf").read_bytes()).hexdigest()
    documented = {"schema", "path", "status", "error", "format", "file_size", "folder", "family", "family_title",
                  "decided_by", "key_naming", "level", "level_source", "quant_format", "runs_on", "parameters",
                  "tensors", "storage", "storage_summary", "components", "component_details", "missing_for_flux",
                  "details", "lora", "architecture", "metadata", "sha256", "header_bytes_read", "notes"}
    assert set(flux) == documented
    assert (flux["family"], flux["level"], data["empty.safetensors"]["status"]) == ("flux-dev", "Q4_0",
                                                                                   "unreadable")
    assert [d["status"] for d in json.loads(out.stdout)] == ["ok", "unreadable"]  # broken files last
    table = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert table.returncode == 1
    assert "flux-dev" in table.stdout and "unreadable:" in table.stdout and "Q4_0" in table.stdout
    assert "also select: clip_l, t5xxl, ae" in table.stdout


# ------------------------------------------------------------------- every family, companion and format, with hosts

def _st(path: Path, specs: dict, metadata: dict | None = None) -> Path:
    return family_files.write_sparse_safetensors(path, specs, metadata)


def _gg(path: Path, specs: dict, arch: str) -> Path:
    return family_files.write_sparse_gguf(path, specs, arch)


ff = family_files
FAMILY_CASES = {
    # name: (writer, family, level, quant format, components, missing parts, Forge runs, Neo runs)
    "klein-4b bf16": (lambda d: _st(d / "m.safetensors", ff.flux_specs(FLUX2_KLEIN_4B)), "flux2-klein-4b", "BF16",
                      "bf16", ["transformer"], ["qwen3_4b", "flux2_vae"], False, True),
    "klein-9b Q8_0": (lambda d: _gg(d / "m.gguf", ff.flux_gguf_specs(FLUX2_KLEIN_9B, Q.Q8_0), "flux"),
                      "flux2-klein-9b", "Q8_0", "gguf", ["transformer"], ["qwen3_8b", "flux2_vae"], False, True),
    "flux2-dev Q4_K_S": (lambda d: _gg(d / "m.gguf", ff.flux_gguf_specs(FLUX2_DEV, Q.Q4_K), "flux"), "flux2-dev",
                         "Q4_K_S", "gguf", ["transformer"], ["mistral3_24b", "flux2_vae"], False, False),
    "chroma Q8_0": (lambda d: _gg(d / "m.gguf", ff.flux_gguf_specs(CHROMA_HD, Q.Q8_0), "flux"), "chroma", "Q8_0",
                    "gguf", ["transformer"], ["t5xxl", "ae"], True, True),
    "fill bf16": (lambda d: _st(d / "m.safetensors", ff.flux_specs(FLUX_FILL)), "flux-fill", "BF16", "bf16",
                  ["transformer"], ["clip_l", "t5xxl", "ae"], False, False),
    "kontext by name": (lambda d: _gg(d / "flux1-kontext-dev-Q4_0.gguf", ff.flux_gguf_specs(FLUX_DEV, Q.Q4_0),
                                      "flux"), "flux-kontext", "Q4_0", "gguf", ["transformer"],
                        ["clip_l", "t5xxl", "ae"], False, True),
    "SVDQ INT4": (lambda d: _st(d / "m.safetensors", *ff.nunchaku_flux_specs(False)), "flux-dev",
                  "SVDQuant INT4 (Nunchaku)", "svdq-int4", ["transformer"], ["clip_l", "t5xxl", "ae"], False, True),
    "SVDQ FP4": (lambda d: _st(d / "m.safetensors", *ff.nunchaku_flux_specs(True)), "flux-dev",
                 "SVDQuant NVFP4 (Nunchaku)", "svdq-fp4", ["transformer"], ["clip_l", "t5xxl", "ae"], False, True),
    "Comfy nvfp4": (lambda d: _st(d / "m.safetensors", *ff.flux_comfy_mixed_specs(FLUX_DEV, "nvfp4", True)),
                    "flux-dev", "NVFP4 mixed (Comfy quant)", "comfy-nvfp4", ["transformer"],
                    ["clip_l", "t5xxl", "ae"], False, True),
    "fp8 scaled": (lambda d: _st(d / "m.safetensors", ff.flux_scaled_fp8_specs(FLUX_SCHNELL)), "flux-schnell",
                   "fp8 scaled (Comfy legacy)", "fp8-scaled", ["transformer"], ["clip_l", "t5xxl", "ae"], True, True),
    "qwen3-4b": (lambda d: _st(d / "m.safetensors", ff.llm_specs(ff.QWEN3_4B)), "qwen3_4b", "BF16", "bf16",
                 ["qwen3_4b"], [], None, None),
    "mistral GGUF": (lambda d: _gg(d / "m.gguf", ff.llm_gguf_specs(ff.MISTRAL_24B, gguf.MODEL_ARCH.LLAMA, Q.Q4_K),
                                   "llama"), "mistral3_24b", "Q4_K_S", "gguf", ["mistral3_24b"], [], None, None),
    "FLUX.2 VAE": (lambda d: _st(d / "m.safetensors", ff.vae_specs(32, flux2=True)), "flux2_vae", "F32", "fp32",
                   ["flux2_vae"], [], None, None),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_inspect_names_family_format_parts_and_hosts(tmp_path: Path, case: str) -> None:
    write, family, level, quant, components, missing, forge, neo = FAMILY_CASES[case]
    r = inspect_file(write(tmp_path))
    assert r.status == "ok", r.error
    assert (r.family, r.level, r.quant_format, r.components, r.missing_for_flux) == \
        (family, level, quant, components, missing)
    assert r.lora is None
    if forge is None:
        assert r.runs_on == {}
        return
    assert r.family_title == families.family(family).title
    assert r.runs_on["Forge (dfdcbab6)"].startswith("yes" if forge else "no")
    assert r.runs_on["Forge Neo (2.26)"].startswith("yes" if neo else "no")
    assert any(n.startswith(f"{r.family_title} as ") and "Forge Neo" in n for n in r.notes)


def test_inspect_says_svdq_needs_nunchaku_on_neo(tmp_path: Path) -> None:
    r = inspect_file(FAMILY_CASES["SVDQ INT4"][0](tmp_path))
    assert r.runs_on["Forge Neo (2.26)"].startswith("yes (needs Nunchaku")
    assert r.runs_on["Forge (dfdcbab6)"] == "no (no Nunchaku support)"
    # packed 4-bit weights count two per int8 byte (eight per int32): at least FLUX.1's 11.9 B, plus the rank-32 branch
    assert families.family("flux-dev").parameters <= r.parameters < 1.1 * families.family("flux-dev").parameters


def test_inspect_says_what_decided_a_look_alike(tmp_path: Path) -> None:
    named = inspect_file(FAMILY_CASES["kontext by name"][0](tmp_path))
    assert named.decided_by == "name" and any(n.startswith("decided by: name") for n in named.notes)
    neutral = inspect_file(_gg(tmp_path / "x.gguf", ff.flux_gguf_specs(FLUX_DEV, Q.Q8_0), "flux"))
    assert neutral.family == "flux-dev" and neutral.decided_by == "content"
    assert any("Kontext" in n and "same weights" in n for n in neutral.notes)
