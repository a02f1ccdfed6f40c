"""Header-faithful model files for every family, companion and format, written as real files.

Full-size tensor tables (real names, real shapes, real dtypes) with *sparse* data: the header is written and the
file is extended to its full length without writing the zeros, so a 64 GB FLUX.2 [dev] costs a few KB of disk.
Where the classifier reads bytes (Comfy ``.comfy_quant`` JSON), those bytes are written for real.

Where the names and shapes come from:
- FLUX.1 / Chroma / FLUX.2 transformers: lib_fluxq.flux (checked in test_families against diffusers' own FLUX.1
  model and conversion, and against published file sizes for every family).
- FLUX.1 / FLUX.2 VAE: diffusers' AutoencoderKL built on the meta device (its own names and shapes).
- T5-XXL, Qwen3, Mistral: the Hugging Face configs (d_model 4096 / d_ff 10240 / 24 blocks; Qwen3-4B 2560 / 9728 /
  36 layers; Qwen3-8B 4096 / 12288 / 36; Mistral-Small-3 5120 / 32768 / 40), checked against published sizes;
  their GGUF names come from gguf-py's own tensor name maps.
- Nunchaku SVDQuant: nunchaku src/FluxModel.cpp (block names) and src/Linear.cpp (GEMM_W4A4 tensors and dtypes);
  the unquantized layers keep diffusers' names (diffusers FluxTransformer2DModel on the meta device).
Files are validated by the reference readers (safetensors.safe_open, gguf.GGUFReader) in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from lib_fluxq.flux import FluxConfig, flux_param_shapes, is_quantized_by_recipe

Q = gguf.GGMLQuantizationType
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4,
               "I64": 8, "BOOL": 1}
Spec = tuple  # (dtype, shape) or (dtype, shape, data bytes)


# ----------------------------------------------------------------------------------------------------- writers

def write_sparse_safetensors(path: Path, specs: Mapping[str, Spec], metadata: Mapping[str, str] | None = None
                             ) -> Path:
    """A safetensors file whose header lists ``specs`` (name -> (dtype, shape[, bytes])), data sparse."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    payload: list[tuple[int, bytes]] = []
    for name, spec in specs.items():
        dtype, shape = spec[0], tuple(spec[1])
        n_bytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if len(spec) > 2:
            assert len(spec[2]) == n_bytes, name
            payload.append((offset, spec[2]))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the safetensors writer pads the header to 8 bytes the same way
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        start = f.tell()
        for at, data in payload:
            f.seek(start + at)
            f.write(data)
        f.truncate(start + offset)
    return path


def write_sparse_gguf(path: Path, specs: Mapping[str, tuple[Q, tuple[int, ...]]], arch: str | None,
                      kv: Mapping[str, object] | None = None) -> Path:
    """A GGUF whose tensor table (torch-order shapes) and metadata are written by gguf-py; data sparse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=arch or "unused")
    if arch is None:
        writer.kv_data[0].pop("general.architecture", None)
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
    sizes = []
    for name, (qtype, shape) in specs.items():
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = math.prod(shape) // block * type_size
        writer.add_tensor_info(name, tuple(shape), np.dtype(np.float32), n_bytes, raw_dtype=qtype)
        sizes.append(n_bytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handle = writer.fout[0]
    handle.flush()
    alignment = writer.data_alignment
    data_start = -(-handle.tell() // alignment) * alignment
    total = data_start + sum(-(-n // alignment) * alignment for n in sizes)
    writer.close()
    with open(path, "r+b") as f:
        f.truncate(total)
    return path


# ---------------------------------------------------------------------------------------------- transformers

def flux_specs(config: FluxConfig, dtype: str = "BF16", prefix: str = "") -> dict[str, Spec]:
    """BFL names; 1-D tensors are what the 2-D weights are stored as (BF16 files keep norms in BF16 too)."""
    return {prefix + name: (dtype, shape) for name, shape in flux_param_shapes(config).items()}


def flux_gguf_specs(config: FluxConfig, qtype: Q) -> dict[str, tuple[Q, tuple[int, ...]]]:
    """city96's recipe: block 2-D weights quantized, 1-D tensors F32, the rest F16."""
    out = {}
    for name, shape in flux_param_shapes(config).items():
        if is_quantized_by_recipe(name, shape):
            out[name] = (qtype, shape)
        else:
            out[name] = (Q.F32 if len(shape) == 1 else Q.F16, shape)
    return out


def flux_fp8_specs(config: FluxConfig, dtype: str = "F8_E4M3") -> dict[str, Spec]:
    """Kijai's plain fp8 layout: every 2-D weight fp8, biases and norms bf16 (11.9 GB as listed; keeping the
    embedders bf16 as well would give 11.97 GB)."""
    return {n: (dtype if len(s) == 2 else "BF16", s) for n, s in flux_param_shapes(config).items()}


def flux_scaled_fp8_specs(config: FluxConfig) -> dict[str, Spec]:
    """ComfyUI legacy 'fp8_scaled' (comfy/utils.py convert_old_quants): a root 'scaled_fp8' marker whose dtype picks
    e4m3, block weights F8_E4M3 with a scalar F32 'scale_weight' (and 'scale_input')."""
    specs: dict[str, Spec] = {"scaled_fp8": ("F8_E4M3", (0,))}
    for name, shape in flux_param_shapes(config).items():
        if is_quantized_by_recipe(name, shape):
            specs[name] = ("F8_E4M3", shape)
            layer = name[:-len(".weight")]
            specs[f"{layer}.scale_weight"] = ("F32", ())
            specs[f"{layer}.scale_input"] = ("F32", ())
        else:
            specs[name] = ("BF16", shape)
    return specs


def flux_comfy_mixed_specs(config: FluxConfig, layer_format: str, per_layer_json: bool) -> tuple[dict, dict]:
    """ComfyUI mixed quant (comfy/quant_ops.py QUANT_ALGOS; Neo backend/quant_ops.py): per quantized layer its
    storage, 'weight_scale' (+ 'weight_scale_2' for nvfp4), and either a '<layer>.comfy_quant' U8 JSON tensor or
    one '_quantization_metadata' entry. Block-scale shapes follow the format's group size (16 nvfp4, 32 mxfp8)."""
    specs: dict[str, Spec] = {}
    layers: dict[str, dict[str, str]] = {}
    for name, shape in flux_param_shapes(config).items():
        if not is_quantized_by_recipe(name, shape):
            specs[name] = ("BF16", shape)
            continue
        out, inp = shape
        layer = name[:-len(".weight")]
        if layer_format == "nvfp4":
            specs[name] = ("U8", (out, inp // 2))
            specs[f"{layer}.weight_scale"] = ("F8_E4M3", (out, inp // 16))
            specs[f"{layer}.weight_scale_2"] = ("F32", ())
        elif layer_format == "mxfp8":
            specs[name] = ("F8_E4M3", shape)
            specs[f"{layer}.weight_scale"] = ("U8", (out, inp // 32))   # e8m0 block scales
        elif layer_format == "int8_tensorwise":
            specs[name] = ("I8", shape)
            specs[f"{layer}.weight_scale"] = ("F32", ())
        else:
            specs[name] = ("F8_E4M3", shape)
            specs[f"{layer}.weight_scale"] = ("F32", ())
        conf = {"format": layer_format}
        layers[layer] = conf
        if per_layer_json:
            data = json.dumps(conf).encode()
            specs[f"{layer}.comfy_quant"] = ("U8", (len(data),), data)
    metadata = {} if per_layer_json else {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                                               "layers": layers})}
    return specs, metadata


def nf4_specs(config: FluxConfig, prefix: str = "model.diffusion_model.") -> dict[str, Spec]:
    """Forge's NF4 layout (bitsandbytes QuantState.as_dict(packed=True), blocksize 64): each block linear weight a
    packed uint8 [n/2, 1] plus absmax, quant_map and the quant_state JSON marker tensor."""
    specs: dict[str, Spec] = {}
    for name, shape in flux_param_shapes(config).items():
        if is_quantized_by_recipe(name, shape):
            n = math.prod(shape)
            specs[prefix + name] = ("U8", (n // 2, 1))
            specs[f"{prefix}{name}.absmax"] = ("F32", (n // 64,))
            specs[f"{prefix}{name}.quant_map"] = ("F32", (16,))
            specs[f"{prefix}{name}.quant_state.bitsandbytes__nf4"] = ("U8", (100,))
        else:
            specs[prefix + name] = ("BF16", shape)
    return specs


def _diffusers_flux_unquantized() -> dict[str, tuple[int, ...]]:
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if "transformer_blocks." not in n}


def nunchaku_flux_specs(fp4: bool, rank: int = 32) -> tuple[dict[str, Spec], dict[str, str]]:
    """svdq-{int4,fp4}_r32-flux.1-dev: nunchaku FluxModel.cpp block names, Linear.cpp GEMM_W4A4 tensors
    (qweight int8 [out, in/2]; wscales [in/64, out] bf16 or [in/16, out] fp8; smooth, lora_down/up, bias; fp4 adds
    wcscales [out] and wtscale), AdaNorm linears as GEMV_AWQ (qweight int32 [out/4, in/2], wscales/wzeros
    [in/64, out]); unquantized layers under diffusers names."""
    h, group = 3072, (16 if fp4 else 64)
    specs: dict[str, Spec] = {n: ("BF16", s) for n, s in _diffusers_flux_unquantized().items()}

    def w4a4(layer: str, out: int, inp: int) -> None:
        specs[f"{layer}.qweight"] = ("I8", (out, inp // 2))
        specs[f"{layer}.wscales"] = ("F8_E4M3" if fp4 else "BF16", (inp // group, out))
        specs[f"{layer}.bias"] = ("BF16", (out,))
        specs[f"{layer}.smooth"] = ("BF16", (inp,))
        specs[f"{layer}.lora_down"] = ("BF16", (inp, rank))
        specs[f"{layer}.lora_up"] = ("BF16", (out, rank))
        if fp4:
            specs[f"{layer}.wcscales"] = ("BF16", (out,))
            specs[f"{layer}.wtscale"] = ("F32", ())

    def awq(layer: str, out: int, inp: int) -> None:
        specs[f"{layer}.qweight"] = ("I32", (out // 4, inp // 2))
        specs[f"{layer}.wscales"] = ("BF16", (inp // 64, out))
        specs[f"{layer}.wzeros"] = ("BF16", (inp // 64, out))
        specs[f"{layer}.bias"] = ("BF16", (out,))

    for i in range(19):
        p = f"transformer_blocks.{i}"
        awq(f"{p}.norm1.linear", 6 * h, h)
        awq(f"{p}.norm1_context.linear", 6 * h, h)
        for name in ("qkv_proj", "qkv_proj_context"):
            w4a4(f"{p}.{name}", 3 * h, h)
        for name in ("out_proj", "out_proj_context"):
            w4a4(f"{p}.{name}", h, h)
        for name in ("mlp_fc1", "mlp_context_fc1"):
            w4a4(f"{p}.{name}", 4 * h, h)
        for name in ("mlp_fc2", "mlp_context_fc2"):
            w4a4(f"{p}.{name}", h, 4 * h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            specs[f"{p}.{norm}.weight"] = ("BF16", (128,))
    for i in range(38):
        p = f"single_transformer_blocks.{i}"
        awq(f"{p}.norm.linear", 3 * h, h)
        w4a4(f"{p}.qkv_proj", 3 * h, h)
        w4a4(f"{p}.out_proj", h, h)
        w4a4(f"{p}.mlp_fc1", 4 * h, h)
        w4a4(f"{p}.mlp_fc2", h, 4 * h)
        for norm in ("norm_q", "norm_k"):
            specs[f"{p}.{norm}.weight"] = ("BF16", (128,))
    quant = {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": group},
             "activation": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "group_size": group}, "rank": rank}
    metadata = {"model_class": "NunchakuFluxTransformer2dModel", "quantization_config": json.dumps(quant)}
    return specs, metadata


# ---------------------------------------------------------------------------------------------- text encoders

def clip_l_specs(dtype: str = "F16", prefix: str = "") -> dict[str, Spec]:
    """CLIPTextModel ViT-L/14 (hidden 768, 12 layers, MLP 3072, vocab 49408, 77 positions). 123.06 M parameters:
    246 MB in fp16, the size of comfyanonymous/flux_text_encoders clip_l.safetensors (so no text_projection)."""
    p = prefix + "text_model."
    specs: dict[str, Spec] = {f"{p}embeddings.token_embedding.weight": (dtype, (49408, 768)),
                              f"{p}embeddings.position_embedding.weight": (dtype, (77, 768))}
    for i in range(12):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs[f"{layer}self_attn.{proj}.weight"] = (dtype, (768, 768))
            specs[f"{layer}self_attn.{proj}.bias"] = (dtype, (768,))
        for norm in ("layer_norm1", "layer_norm2"):
            specs[f"{layer}{norm}.weight"] = (dtype, (768,))
            specs[f"{layer}{norm}.bias"] = (dtype, (768,))
        specs[f"{layer}mlp.fc1.weight"] = (dtype, (3072, 768))
        specs[f"{layer}mlp.fc1.bias"] = (dtype, (3072,))
        specs[f"{layer}mlp.fc2.weight"] = (dtype, (768, 3072))
        specs[f"{layer}mlp.fc2.bias"] = (dtype, (768,))
    specs[f"{p}final_layer_norm.weight"] = (dtype, (768,))
    specs[f"{p}final_layer_norm.bias"] = (dtype, (768,))
    return specs


def t5xxl_hf_shapes(with_embed_copy: bool = True) -> dict[str, tuple[int, ...]]:
    """T5 v1.1 XXL encoder (d_model 4096, d_ff 10240 gated, 64 heads x 64, 24 blocks, vocab 32128). Comfy's
    t5xxl_fp16.safetensors (9.79 GB) also stores encoder.embed_tokens.weight, a copy of shared.weight."""
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (32128, 4096)}
    if with_embed_copy:
        shapes["encoder.embed_tokens.weight"] = (32128, 4096)
    for i in range(24):
        b = f"encoder.block.{i}.layer."
        for proj in "qkvo":
            shapes[f"{b}0.SelfAttention.{proj}.weight"] = (4096, 4096)
        if i == 0:
            shapes[f"{b}0.SelfAttention.relative_attention_bias.weight"] = (32, 64)
        shapes[f"{b}0.layer_norm.weight"] = (4096,)
        shapes[f"{b}1.DenseReluDense.wi_0.weight"] = (10240, 4096)
        shapes[f"{b}1.DenseReluDense.wi_1.weight"] = (10240, 4096)
        shapes[f"{b}1.DenseReluDense.wo.weight"] = (4096, 10240)
        shapes[f"{b}1.layer_norm.weight"] = (4096,)
    shapes["encoder.final_layer_norm.weight"] = (4096,)
    return shapes


def t5xxl_specs(dtype: str = "F16", scaled: bool = False, prefix: str = "") -> dict[str, Spec]:
    """fp16 / fp8 e4m3fn (2-D weights fp8, norms fp16: Comfy's t5xxl_fp8_e4m3fn, 4.89 GB) / Comfy 'scaled' fp8
    (the embeddings stay fp16 there: that is the published 5.16 GB)."""
    specs: dict[str, Spec] = {"scaled_fp8": ("F8_E4M3", (0,))} if scaled else {}
    for name, shape in t5xxl_hf_shapes().items():
        two_d = len(shape) == 2 and "relative_attention_bias" not in name and not (scaled and "embed" in name
                                                                                  or scaled and name == "shared.weight")
        specs[prefix + name] = (dtype if two_d or dtype in ("F16", "BF16", "F32") else "F16", shape)
        if scaled and two_d and ".block." in name:
            specs[prefix + name[:-len("weight")] + "scale_weight"] = ("F32", ())
    return specs


def t5xxl_city96_gguf_specs(qtype: Q = Q.Q8_0) -> dict[str, tuple[Q, tuple[int, ...]]]:
    """city96/t5-v1_1-xxl-encoder-gguf: llama.cpp names from gguf-py's T5ENCODER map; 2-D weights quantized,
    norms F32 (no embed_tokens copy: the f16 GGUF is 9.53 GB, not 9.79)."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 24)
    out = {}
    for name, shape in t5xxl_hf_shapes(with_embed_copy=False).items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        assert gguf_name, name
        out[gguf_name] = (qtype if len(shape) == 2 and "rel_b" not in gguf_name else Q.F32, shape)
    return out


def llm_hf_shapes(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, qk_norm: bool,
                  tied: bool, head_dim: int = 128) -> dict[str, tuple[int, ...]]:
    """Qwen3 / Mistral causal LM names (transformers): model.embed_tokens, model.layers.N.{self_attn,mlp,norms}."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[f"{p}self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[f"{p}self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if qk_norm:
            shapes[f"{p}self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{p}self_attn.k_norm.weight"] = (head_dim,)
        shapes[f"{p}mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# Hugging Face config.json values (Qwen/Qwen3-4B, Qwen/Qwen3-8B, mistralai/Mistral-Small-3.x-24B).
QWEN3_4B = {"hidden": 2560, "inter": 9728, "layers": 36, "heads": 32, "kv_heads": 8, "vocab": 151936,
            "qk_norm": True, "tied": True}
QWEN3_8B = {"hidden": 4096, "inter": 12288, "layers": 36, "heads": 32, "kv_heads": 8, "vocab": 151936,
            "qk_norm": True, "tied": False}
MISTRAL_24B = {"hidden": 5120, "inter": 32768, "layers": 40, "heads": 32, "kv_heads": 8, "vocab": 131072,
               "qk_norm": False, "tied": False}


def llm_specs(config: Mapping[str, object], dtype: str = "BF16", prefix: str = "", fp8_linears: bool = False
              ) -> dict[str, Spec]:
    return {prefix + n: ("F8_E4M3" if fp8_linears and len(s) == 2 and "embed" not in n else dtype, s)
            for n, s in llm_hf_shapes(**config).items()}


def llm_gguf_specs(config: Mapping[str, object], arch: gguf.MODEL_ARCH, qtype: Q = Q.Q8_0
                   ) -> dict[str, tuple[Q, tuple[int, ...]]]:
    name_map = gguf.get_tensor_name_map(arch, int(config["layers"]))
    out = {}
    for name, shape in llm_hf_shapes(**config).items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        assert gguf_name, name
        out[gguf_name] = (qtype if len(shape) == 2 else Q.F32, shape)
    return out


# ------------------------------------------------------------------------------------------------------ VAEs

def vae_specs(latent_channels: int, dtype: str = "F32", flux2: bool = False) -> dict[str, Spec]:
    """diffusers AutoencoderKL with the FLUX autoencoder's config (ch 128, mult 1-2-4-4, 2 res blocks). FLUX.1:
    z 16, no quant convs (244 tensors, 83.8 M: 335 MB fp32 as published). FLUX.2: z 32 with quant convs and the
    latent BatchNorm buffers BFL's autoencoder adds (bn.running_mean / running_var [4z], num_batches_tracked)."""
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                              layers_per_block=2, latent_channels=latent_channels, use_quant_conv=flux2,
                              use_post_quant_conv=flux2)
    specs: dict[str, Spec] = {n: (dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
    if flux2:
        specs["bn.running_mean"] = (dtype, (4 * latent_channels,))
        specs["bn.running_var"] = (dtype, (4 * latent_channels,))
        specs["bn.num_batches_tracked"] = ("I64", ())
    return specs


def data_bytes(specs: Mapping[str, Spec]) -> int:
    return sum(math.prod(s[1]) * DTYPE_BYTES[s[0]] for s in specs.values())


def gguf_data_bytes(specs: Mapping[str, tuple[Q, tuple[int, ...]]]) -> int:
    total = 0
    for qtype, shape in specs.values():
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        total += math.prod(shape) // block * size
    return total
