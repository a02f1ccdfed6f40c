"""lib_fluxq.flux_model against an independent Flux implementation: diffusers' FluxTransformer2DModel and blocks,
given the same weights (BFL -> diffusers key mapping below, as diffusers' own single-file converter does it)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers import transformer_flux  # the reference (pinned): missing is an error

from lib_fluxq.flux import FluxConfig
from lib_fluxq.flux_model import (
    DoubleStreamBlock,
    FluxConditioning,
    FluxTransformer,
    SingleStreamBlock,
    deterministic_inputs,
    image_ids,
    rope_embedding,
    text_ids,
)
from tests.fixtures import SMALL_FLUX, random_flux_state_dict

TOL = dict(rtol=1e-4, atol=1e-4)


def _split(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes, dim=0))


def _linear(out: dict[str, torch.Tensor], dst: str, sd: dict[str, torch.Tensor], src: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]


def double_block_to_diffusers(sd: dict[str, torch.Tensor], prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    """BFL ``double_blocks.N.`` keys -> diffusers ``FluxTransformerBlock`` keys (fused qkv split in three)."""
    out: dict[str, torch.Tensor] = {}
    _linear(out, "norm1.linear", sd, f"{prefix}img_mod.lin")
    _linear(out, "norm1_context.linear", sd, f"{prefix}txt_mod.lin")
    for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        weights = _split(sd[f"{prefix}{stream}_attn.qkv.weight"], [hidden] * 3)
        biases = _split(sd[f"{prefix}{stream}_attn.qkv.bias"], [hidden] * 3)
        for name, w, b in zip(names, weights, biases, strict=True):
            out[f"attn.{name}.weight"], out[f"attn.{name}.bias"] = w, b
    out["attn.norm_q.weight"] = sd[f"{prefix}img_attn.norm.query_norm.scale"]
    out["attn.norm_k.weight"] = sd[f"{prefix}img_attn.norm.key_norm.scale"]
    out["attn.norm_added_q.weight"] = sd[f"{prefix}txt_attn.norm.query_norm.scale"]
    out["attn.norm_added_k.weight"] = sd[f"{prefix}txt_attn.norm.key_norm.scale"]
    _linear(out, "attn.to_out.0", sd, f"{prefix}img_attn.proj")
    _linear(out, "attn.to_add_out", sd, f"{prefix}txt_attn.proj")
    _linear(out, "ff.net.0.proj", sd, f"{prefix}img_mlp.0")
    _linear(out, "ff.net.2", sd, f"{prefix}img_mlp.2")
    _linear(out, "ff_context.net.0.proj", sd, f"{prefix}txt_mlp.0")
    _linear(out, "ff_context.net.2", sd, f"{prefix}txt_mlp.2")
    return out


def single_block_to_diffusers(sd: dict[str, torch.Tensor], prefix: str, hidden: int,
                              mlp_hidden: int) -> dict[str, torch.Tensor]:
    """BFL ``single_blocks.N.`` keys -> diffusers ``FluxSingleTransformerBlock`` keys (linear1 split in four)."""
    out: dict[str, torch.Tensor] = {}
    sizes = [hidden, hidden, hidden, mlp_hidden]
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    weights = _split(sd[f"{prefix}linear1.weight"], sizes)
    biases = _split(sd[f"{prefix}linear1.bias"], sizes)
    for name, w, b in zip(names, weights, biases, strict=True):
        out[f"{name}.weight"], out[f"{name}.bias"] = w, b
    out["attn.norm_q.weight"] = sd[f"{prefix}norm.query_norm.scale"]
    out["attn.norm_k.weight"] = sd[f"{prefix}norm.key_norm.scale"]
    _linear(out, "proj_out", sd, f"{prefix}linear2")
    _linear(out, "norm.linear", sd, f"{prefix}modulation.lin")
    return out


def model_to_diffusers(sd: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    _linear(out, "x_embedder", sd, "img_in")
    _linear(out, "context_embedder", sd, "txt_in")
    _linear(out, "time_text_embed.timestep_embedder.linear_1", sd, "time_in.in_layer")
    _linear(out, "time_text_embed.timestep_embedder.linear_2", sd, "time_in.out_layer")
    _linear(out, "time_text_embed.guidance_embedder.linear_1", sd, "guidance_in.in_layer")
    _linear(out, "time_text_embed.guidance_embedder.linear_2", sd, "guidance_in.out_layer")
    _linear(out, "time_text_embed.text_embedder.linear_1", sd, "vector_in.in_layer")
    _linear(out, "time_text_embed.text_embedder.linear_2", sd, "vector_in.out_layer")
    for i in range(config.depth):
        for k, v in double_block_to_diffusers(sd, f"double_blocks.{i}.", config.hidden).items():
            out[f"transformer_blocks.{i}.{k}"] = v
    for i in range(config.depth_single):
        for k, v in single_block_to_diffusers(sd, f"single_blocks.{i}.", config.hidden, config.mlp_hidden).items():
            out[f"single_transformer_blocks.{i}.{k}"] = v
    # diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's LastLayer chunks (shift, scale).
    shift_w, scale_w = sd["final_layer.adaLN_modulation.1.weight"].chunk(2, dim=0)
    shift_b, scale_b = sd["final_layer.adaLN_modulation.1.bias"].chunk(2, dim=0)
    out["norm_out.linear.weight"] = torch.cat([scale_w, shift_w])
    out["norm_out.linear.bias"] = torch.cat([scale_b, shift_b])
    _linear(out, "proj_out", sd, "final_layer.linear")
    return out


def _block_sd(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def flux_sd() -> dict[str, torch.Tensor]:
    return random_flux_state_dict(SMALL_FLUX, seed=1)


@pytest.fixture(scope="module")
def inputs():
    return deterministic_inputs(SMALL_FLUX.hidden, height=64, width=96, text_tokens=7, seed=3)


def test_rope_matches_diffusers_pos_embed():
    ids = torch.cat((text_ids(5), image_ids(64, 96)), dim=1)
    ids[0, :5, 0] = torch.arange(5)  # exercise the t axis too
    ours = rope_embedding(ids)[0, 0]                  # (L, 64, 2, 2): [[cos, -sin], [sin, cos]]
    cos, sin = transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids[0])   # (L, 128) interleaved
    torch.testing.assert_close(ours[..., 0, 0], cos[:, ::2].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[..., 1, 0], sin[:, ::2].float(), rtol=1e-6, atol=1e-6)


def test_double_block_matches_diffusers(flux_sd, inputs):
    ours = DoubleStreamBlock(SMALL_FLUX.hidden, SMALL_FLUX.heads)
    ours.load_state_dict(_block_sd(flux_sd, "double_blocks.1."), strict=True)
    theirs = transformer_flux.FluxTransformerBlock(SMALL_FLUX.hidden, SMALL_FLUX.heads, 128)
    theirs.load_state_dict(double_block_to_diffusers(flux_sd, "double_blocks.1.", SMALL_FLUX.hidden), strict=True)
    ids = torch.cat((text_ids(inputs.txt.shape[1]), image_ids(64, 96)), dim=1)[0]
    rotary = transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    with torch.no_grad():
        img, txt = ours(inputs.img, inputs.txt, inputs.vec, inputs.pe)
        ref_txt, ref_img = theirs(inputs.img, inputs.txt, inputs.vec, image_rotary_emb=rotary)
    torch.testing.assert_close(img, ref_img, **TOL)
    torch.testing.assert_close(txt, ref_txt, **TOL)
    assert (img - inputs.img).abs().mean() > 1e-3  # the block did something


def test_single_block_matches_diffusers(flux_sd, inputs):
    ours = SingleStreamBlock(SMALL_FLUX.hidden, SMALL_FLUX.heads)
    ours.load_state_dict(_block_sd(flux_sd, "single_blocks.0."), strict=True)
    theirs = transformer_flux.FluxSingleTransformerBlock(SMALL_FLUX.hidden, SMALL_FLUX.heads, 128)
    theirs.load_state_dict(single_block_to_diffusers(flux_sd, "single_blocks.0.", SMALL_FLUX.hidden,
                                                     SMALL_FLUX.mlp_hidden), strict=True)
    ids = torch.cat((text_ids(inputs.txt.shape[1]), image_ids(64, 96)), dim=1)[0]
    rotary = transformer_flux.FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    with torch.no_grad():
        out = ours(inputs.joint, inputs.vec, inputs.pe)
        ref = theirs(inputs.joint, inputs.vec, image_rotary_emb=rotary)
    torch.testing.assert_close(out, ref, **TOL)


def test_whole_model_loads_bfl_state_dict_and_matches_diffusers(flux_sd):
    ours = FluxTransformer(SMALL_FLUX)
    ours.load_state_dict(flux_sd, strict=True)   # BFL names, every key used, none missing
    theirs = transformer_flux.FluxTransformer2DModel(
        patch_size=1, in_channels=SMALL_FLUX.in_channels, num_layers=SMALL_FLUX.depth,
        num_single_layers=SMALL_FLUX.depth_single, attention_head_dim=SMALL_FLUX.head_dim,
        num_attention_heads=SMALL_FLUX.heads, joint_attention_dim=SMALL_FLUX.context_in,
        pooled_projection_dim=SMALL_FLUX.vec_in, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    theirs.load_state_dict(model_to_diffusers(flux_sd, SMALL_FLUX), strict=True)
    gen = torch.Generator().manual_seed(5)
    img_ids, txt_ids = image_ids(32, 48), text_ids(6)
    latents = torch.randn(1, img_ids.shape[1], SMALL_FLUX.in_channels, generator=gen)
    t5 = torch.randn(1, 6, SMALL_FLUX.context_in, generator=gen)
    pooled = torch.randn(1, SMALL_FLUX.vec_in, generator=gen)
    timestep, guidance = torch.tensor([0.7]), torch.tensor([3.5])
    with torch.no_grad():
        out = ours(latents, img_ids, t5, txt_ids, timestep, pooled, guidance)
        ref = theirs(hidden_states=latents, encoder_hidden_states=t5, pooled_projections=pooled, timestep=timestep,
                     img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]
    torch.testing.assert_close(out, ref, **TOL)


def test_conditioning_loads_its_subset_and_matches_the_whole_model(flux_sd):
    subset = {k: v for k, v in flux_sd.items() if k.startswith(("time_in.", "vector_in.", "guidance_in."))}
    conditioning = FluxConditioning(SMALL_FLUX)
    conditioning.load_state_dict(subset, strict=True)
    model = FluxTransformer(SMALL_FLUX)
    model.load_state_dict(flux_sd)
    theirs = transformer_flux.CombinedTimestepGuidanceTextProjEmbeddings(SMALL_FLUX.hidden, SMALL_FLUX.vec_in)
    theirs.load_state_dict({k.removeprefix("time_text_embed."): v
                            for k, v in model_to_diffusers(flux_sd, SMALL_FLUX).items()
                            if k.startswith("time_text_embed.")})
    pooled = torch.randn(2, SMALL_FLUX.vec_in, generator=torch.Generator().manual_seed(2))
    t, g = torch.tensor([0.25, 1.0]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(conditioning(t, pooled, g), theirs(t * 1000, g * 1000, pooled), **TOL)


def test_image_ids_reject_sizes_off_the_16_pixel_grid():
    with pytest.raises(ValueError, match="multiples of 16"):
        image_ids(500, 512)
