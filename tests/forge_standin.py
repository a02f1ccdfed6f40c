"""A stand-in for exactly the Forge functions the fluxq hook touches, mirroring lllyasviel/stable-diffusion-webui-forge
at commit dfdcbab6 (2025-06-26): modules/sd_models.py (model_data, forge_model_reload), modules/processing.py (its own
binding of forge_model_reload, create_infotext's "Module N" from the user's selection), backend/loader.py
(split_state_dict, replace_state_dict's key sniffing, forge_loader and its component assertions), backend/utils.py
(load_torch_file), backend/operations_gguf.py (``import gguf``, quants_mapping, ParameterGGUF, dequantize_tensor, the
quant-class protocol of packages_3rdparty/gguf/quants.py, with the byte rewriting of its bake_inner for Q4_0 / Q4_1 /
Q8_0 / Q4_K), backend/operations.py (ForgeOperationsGGUF.Linear), backend/patcher/lora.py (LoraLoader.refresh's GGUF
branch), backend/args.py (dynamic_args, a dict), modules_forge/main_entry.py (module_list, refresh_models,
refresh_model_loading_parameters, checkpoint_change / modules_change without a preset, total_vram,
refresh_memory_management_settings), modules_forge/main_thread.py (Task.work: print_exc + print(e), the exception
object kept in last_exception), and what both Forge and Neo keep from A1111 (tests/webui_standin.py).

Written from reading that source, not copied. Each module-level binding is a separate attribute on its own fake
module, and callers look names up through their own module (as Python does for ``from x import f``), so a hook that
wraps only one binding is caught. Quant classes dequantize/quantize with gguf-py's numpy reference (Forge's own
torch kernels are its business; what matters here is the protocol), except for the four types Forge rewrites at
bake (Q4_0, Q4_1, Q8_0, Q4_K): their bake_inner re-lays the bytes and their dequantizers read that layout in the
computation dtype, as Forge's do.

Also builds small files with the exact key layouts of the real ones (flux transformer, clip_l, t5xxl, ae, SD VAE,
SD1.5/SDXL/SD3 checkpoints) — only names and the shapes Forge sniffs are real; the rest is tiny.
"""

from __future__ import annotations

import os
import sys
import traceback
import types
from abc import abstractmethod
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tests import webui_standin as webui

FORGE_COMMIT = "dfdcbab685e57677014f05a3309b48cc87383167"
LOW_BIT_LORA_MESSAGE = ('Low bit LoRA for this data type is not implemented yet. Please select "Automatic (fp16 LoRA)" '
                        'in "Diffusion in Low Bits" (on the top line of this page) to use this LoRA.')
T = gguf.GGMLQuantizationType
MODULE_NAMES = (*webui.A1111_MODULES, "modules.processing", "modules_forge", "modules_forge.main_entry",
                "modules_forge.main_thread", "backend", "backend.args", "backend.utils", "backend.loader",
                "backend.operations_gguf", "backend.operations", "backend.patcher", "backend.patcher.lora",
                "backend.diffusion_engine",
                "backend.diffusion_engine.flux")


def _mod(name: str) -> Any:
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------------------------
# backend/operations_gguf.py + the quant-class protocol


class _Quant:
    """Mirrors packages_3rdparty/gguf/quants.py __Quant: bake once, dequantize_pytorch per forward,
    quantize_pytorch after a LoRA merge (abstract quantize_blocks_pytorch -> Forge's NotImplementedError).

    Types without a ``bake_inner`` keep GGML layout and dequantize with gguf-py's numpy reference; the four Forge
    rewrites at bake (``_Baked*`` below) get Forge's layout and Forge's half-precision arithmetic."""

    qtype: Any
    block_size: int
    type_size: int

    @classmethod
    def bake(cls, parameter: Any) -> None:
        if parameter.baked:
            return
        data = parameter.data
        rows = data.reshape((-1, data.shape[-1])).view(torch.uint8)
        parameter.data = rows.reshape((rows.numel() // cls.type_size, cls.type_size)).contiguous()
        cls.bake_inner(parameter)
        parameter.baked = True

    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        pass

    @classmethod
    def dequantize_pytorch(cls, x: Any) -> torch.Tensor:
        if not x.baked:
            raise ValueError('GGUF Tensor is not baked!')
        return cls.dequantize_blocks_pytorch(x.data, x).reshape(tuple(x.shape))

    @classmethod
    def dequantize_blocks_pytorch(cls, blocks: torch.Tensor, parameter: Any) -> torch.Tensor:
        values = gguf.quants.dequantize(blocks.cpu().numpy().reshape(-1), cls.qtype)
        return torch.from_numpy(values).to(parameter.computation_dtype)

    @classmethod
    def quantize_pytorch(cls, data: torch.Tensor, parent: Any) -> Any:
        if not parent.baked:
            raise ValueError('GGUF Tensor is not baked!')
        blocks = data.reshape(-1, cls.block_size)
        parent.data = cls.quantize_blocks_pytorch(blocks, cls.block_size, cls.type_size, parent).contiguous()
        return parent

    @classmethod
    @abstractmethod
    def quantize_blocks_pytorch(cls, blocks: torch.Tensor, block_size: int, type_size: int, parent: Any) -> Any:
        raise NotImplementedError(LOW_BIT_LORA_MESSAGE)


# What Forge's bake_inner does to the bytes (quants.py Q4_0 / Q4_1 / Q8_0 / Q4_K at dfdcbab6, re-written here):
# fp16 scales re-encoded in the computation dtype (bf16 / fp16), 4-bit values re-packed so that byte k holds
# elements 2k (low nibble) and 2k+1 (high nibble) instead of GGML's "low nibbles first, high nibbles second",
# and Q4_K's 6-bit sub-block scales multiplied out into 8 + 8 computation-dtype values (160 bytes per block,
# not 144). Forge's dequantizers then read that layout and compute in the computation dtype.

def _as_dtype_bytes(fp16_bytes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return fp16_bytes.contiguous().view(torch.float16).to(dtype).view(torch.uint8)


def _element_order_pairs(ggml_nibbles: torch.Tensor) -> torch.Tensor:
    """``(n, ..., k)`` GGML nibble bytes (lows = first k elements, highs = next k) -> ``(n, ..., k)`` bytes whose
    byte j packs elements 2j and 2j+1."""
    values = torch.cat((ggml_nibbles & 15, ggml_nibbles >> 4), dim=-1)
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """Inverse of the packing above: ``(n, k)`` bytes -> ``(n, 2k)`` 4-bit values in element order."""
    return torch.stack((pairs & 15, pairs >> 4), dim=-1).reshape(pairs.shape[0], -1)


def _k4_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low, mid, high = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((low & 63, (high & 15) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (high >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, mn


class _BakedQ8_0(_Quant):
    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        blocks, dtype = parameter.data, parameter.computation_dtype
        parameter.data = torch.cat((_as_dtype_bytes(blocks[:, :2], dtype), blocks[:, 2:]), dim=-1).contiguous()

    @classmethod
    def dequantize_blocks_pytorch(cls, blocks: torch.Tensor, parameter: Any) -> torch.Tensor:
        dtype = parameter.computation_dtype
        d = blocks[:, :2].contiguous().view(dtype)
        return blocks[:, 2:].view(torch.int8) * d


class _BakedQ4_0(_Quant):
    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        blocks, dtype = parameter.data, parameter.computation_dtype
        parameter.data = torch.cat((_as_dtype_bytes(blocks[:, :2], dtype), _element_order_pairs(blocks[:, 2:])),
                                   dim=-1).contiguous()

    @classmethod
    def dequantize_blocks_pytorch(cls, blocks: torch.Tensor, parameter: Any) -> torch.Tensor:
        d = blocks[:, :2].contiguous().view(parameter.computation_dtype)
        return d * (_unpack_pairs(blocks[:, 2:]).view(torch.int8) - 8)


class _BakedQ4_1(_Quant):
    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        blocks, dtype = parameter.data, parameter.computation_dtype
        parameter.data = torch.cat((_as_dtype_bytes(blocks[:, :2], dtype), _as_dtype_bytes(blocks[:, 2:4], dtype),
                                    _element_order_pairs(blocks[:, 4:])), dim=-1).contiguous()

    @classmethod
    def dequantize_blocks_pytorch(cls, blocks: torch.Tensor, parameter: Any) -> torch.Tensor:
        dtype = parameter.computation_dtype
        d, m = blocks[:, :2].contiguous().view(dtype), blocks[:, 2:4].contiguous().view(dtype)
        return d * _unpack_pairs(blocks[:, 4:]) + m


class _BakedQ4_K(_Quant):
    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        blocks, dtype = parameter.data, parameter.computation_dtype
        n = blocks.shape[0]
        d = blocks[:, 0:2].contiguous().view(torch.float16).to(dtype)
        dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(dtype)
        sc, mn = _k4_scales(blocks[:, 4:16])
        pairs = _element_order_pairs(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 128)
        parameter.data = torch.cat(((d * sc).to(dtype).view(torch.uint8), (dmin * mn).to(dtype).view(torch.uint8),
                                    pairs), dim=-1).contiguous()

    @classmethod
    def dequantize_blocks_pytorch(cls, blocks: torch.Tensor, parameter: Any) -> torch.Tensor:
        dtype, n = parameter.computation_dtype, blocks.shape[0]
        d = blocks[:, 0:16].contiguous().view(dtype).reshape(n, 8, 1)
        dm = blocks[:, 16:32].contiguous().view(dtype).reshape(n, 8, 1)
        return (d * _unpack_pairs(blocks[:, 32:]).reshape(n, 8, 32) - dm).reshape(n, 256)


FORGE_BAKED = {T.Q8_0: _BakedQ8_0, T.Q4_0: _BakedQ4_0, T.Q4_1: _BakedQ4_1, T.Q4_K: _BakedQ4_K}


def _quant_class(qtype: Any, can_quantize: bool) -> type:
    namespace: dict[str, Any] = {"qtype": qtype, "block_size": gguf.GGML_QUANT_SIZES[qtype][0],
                                 "type_size": gguf.GGML_QUANT_SIZES[qtype][1]}
    base = FORGE_BAKED.get(qtype, _Quant)
    if can_quantize:   # Forge implements these three only; Q4_0 / Q8_0 write the baked layout directly
        def quantize_blocks_pytorch(cls, blocks, block_size, type_size, parent):
            packed = torch.from_numpy(gguf.quants.quantize(blocks.float().cpu().numpy(), cls.qtype))
            holder = types.SimpleNamespace(data=packed.reshape(-1, type_size),
                                           computation_dtype=parent.computation_dtype)
            cls.bake_inner(holder)
            return holder.data
        namespace["quantize_blocks_pytorch"] = classmethod(quantize_blocks_pytorch)
    return type(qtype.name, (base,), namespace)


FORGE_GGUF_TYPES = (T.Q2_K, T.Q3_K, T.Q4_0, T.Q4_K, T.Q4_1, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0, T.BF16)
FORGE_REQUANT_TYPES = (T.Q4_0, T.Q5_0, T.Q8_0)


class ParameterGGUF(torch.nn.Parameter):
    """Mirrors backend/operations_gguf.py ParameterGGUF, including the copy in ``__new__`` (torch.tensor)."""

    def __init__(self, tensor=None, requires_grad=False, no_init=False):
        super().__init__()
        if no_init:
            return
        self.gguf_cls = _mod("backend.operations_gguf").quants_mapping.get(tensor.tensor_type, None)
        self.real_shape = torch.Size(reversed(list(tensor.shape)))
        self.computation_dtype = torch.float16
        self.baked = False

    @property
    def shape(self):
        return self.real_shape

    def __new__(cls, tensor=None, requires_grad=False, no_init=False):
        return super().__new__(cls, torch.tensor(tensor.data), requires_grad=requires_grad)

    def copy_with_data(self, data):
        new = ParameterGGUF(data, no_init=True)
        new.gguf_cls = self.gguf_cls
        new.real_shape = self.real_shape
        new.computation_dtype = self.computation_dtype
        new.baked = self.baked
        return new

    def to(self, *args, **kwargs):
        return self.copy_with_data(self.data.to(*args, **kwargs))


def dequantize_tensor(tensor: Any) -> Any:
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)


class ForgeOperationsGGUF:
    """backend/operations.py ForgeOperationsGGUF.Linear: the GGUF layer's forward dequantizes its weight through
    ``dequantize_tensor`` (weights_manual_cast -> get_weight_and_bias), casts it to the input's dtype and device
    (a no-op when they already match) and calls F.linear."""

    class Linear(torch.nn.Module):
        def __init__(self, weight: Any, bias: torch.Tensor | None = None) -> None:
            super().__init__()
            self.weight = weight
            self.bias = bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = _mod("backend.operations_gguf").dequantize_tensor(self.weight)
            weight = weight.to(device=x.device, dtype=x.dtype)
            bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return torch.nn.functional.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------------------------
# backend/utils.py


def load_torch_file(ckpt, safe_load=False, device=None):
    if device is None:
        device = torch.device("cpu")
    if ckpt.lower().endswith(".safetensors"):
        return load_file(ckpt, device=device.type)
    if ckpt.lower().endswith(".gguf"):
        reader = gguf.GGUFReader(ckpt)
        return {str(t.name): _mod("backend.operations_gguf").ParameterGGUF(t) for t in reader.tensors}
    return torch.load(ckpt, map_location=device, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# backend/loader.py


class Guess:
    """What huggingface_guess.guess(sd) tells the loader (prefixes, family)."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.vae_key_prefix = ["vae."] if family in ("flux", "sd3") else ["first_stage_model."]
        self.text_encoder_key_prefix = ["text_encoders."]


class Engine:
    family = "-"

    def __init__(self, components: dict[str, dict[str, Any]]) -> None:
        self.components = components
        self.forge_objects = types.SimpleNamespace(unet=components.get("transformer"), vae=components.get("vae"),
                                                   clip=components.get("text_encoders"))


class StableDiffusion(Engine):
    family = "sd1"


class StableDiffusionXL(Engine):
    family = "sdxl"


class StableDiffusion3(Engine):
    family = "sd3"


ENGINES = {"sd1": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3}
FLUX_TEST_KEY = "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"
SD3_TEST_KEY = "model.diffusion_model.final_layer.adaLN_modulation.1.bias"
LEGACY_TEST_KEY = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
CITY96_T5 = {"enc.": "encoder.", ".blk.": ".block.", "token_embd": "shared", "output_norm": "final_layer_norm",
             "attn_k": "layer.0.SelfAttention.k", "attn_q": "layer.0.SelfAttention.q"}


def _model_type(sd: dict[str, Any]) -> str:
    if LEGACY_TEST_KEY in sd:
        return {768: "sd1", 1024: "sd2", 1280: "xlrf", 2048: "sdxl"}.get(sd[LEGACY_TEST_KEY].shape[1], "-")
    if FLUX_TEST_KEY in sd:
        return "flux"
    if SD3_TEST_KEY in sd:
        return "sd3"
    return "-"


def replace_state_dict(sd, asd, guess):
    vae_prefix, te_prefix = guess.vae_key_prefix[0], guess.text_encoder_key_prefix[0]
    if "enc.blk.0.attn_k.weight" in asd:
        renamed = {}
        for k, v in asd.items():
            for s, d in CITY96_T5.items():
                k = k.replace(s, d)
            renamed[k] = v
        asd = renamed
    if "decoder.conv_in.weight" in asd:   # any VAE replaces the model's own, whatever the model is (#2255)
        for k in [k for k in sd if k.startswith(vae_prefix)]:
            del sd[k]
        for k, v in asd.items():
            sd[vae_prefix + k] = v
    model_type = _model_type(sd)
    clip_l_prefix = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer.",
                     "flux": "text_encoders.clip_l.transformer.", "sd3": "text_encoders.clip_l.transformer."}
    key = "text_model.encoder.layers.0.layer_norm1.bias"
    if key in asd and asd[key].shape[0] == 768 and clip_l_prefix.get(model_type):
        for k, v in asd.items():
            sd[clip_l_prefix[model_type] + k] = v
    if "encoder.block.0.layer.0.SelfAttention.k.weight" in asd:
        for k in [k for k in sd if k.startswith(f"{te_prefix}t5xxl.")]:
            del sd[k]
        for k, v in asd.items():
            sd[f"{te_prefix}t5xxl.transformer.{k}"] = v
    return sd


def split_state_dict(sd, additional_state_dicts=None):
    loader = _mod("backend.loader")
    sd = loader.load_torch_file(sd)
    if not any(k.startswith("model.diffusion_model") for k in sd):
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    guess = Guess(_model_type(sd))
    if guess.family == "-":
        raise ValueError("unknown")
    loader.split_log.append([])
    if isinstance(additional_state_dicts, list):
        for asd in additional_state_dicts:
            loader.split_log[-1].append(asd)
            sd = loader.replace_state_dict(sd, loader.load_torch_file(asd), guess)
    return sd, guess


def _part(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def forge_loader(sd, additional_state_dicts=None):
    loader = _mod("backend.loader")
    try:
        state_dict, guess = loader.split_state_dict(sd, additional_state_dicts=additional_state_dicts)
    except Exception:
        raise ValueError('Failed to recognize model type!') from None
    family = guess.family
    components = {"transformer": _part(state_dict, "model.diffusion_model.")}
    if family == "flux":
        clip = _part(state_dict, "text_encoders.clip_l.")
        t5 = _part(state_dict, "text_encoders.t5xxl.")
        assert len(clip) > 16, 'You do not have CLIP state dict!'
        assert len(t5) > 16, 'You do not have T5 state dict!'
        components["text_encoders"] = {"clip_l": clip, "t5xxl": t5}
    vae = _part(state_dict, guess.vae_key_prefix[0])
    assert len(vae) > 16, 'You do not have VAE state dict!'
    latent_channels = 16 if family in ("flux", "sd3") else 4
    conv_in = vae["decoder.conv_in.weight"]
    if conv_in.shape[1] != latent_channels:   # what load_state_dict says when #2255 strikes
        raise RuntimeError(f"Error(s) in loading state_dict for IntegratedAutoencoderKL: size mismatch for "
                           f"decoder.conv_in.weight: copying a param with shape {tuple(conv_in.shape)}, the shape in "
                           f"current model is ({conv_in.shape[0]}, {latent_channels}, 3, 3).")
    components["vae"] = vae
    engine_cls = _mod("backend.diffusion_engine.flux").Flux if family == "flux" else ENGINES[family]
    return engine_cls(components)


# ---------------------------------------------------------------------------------------------------------------
# modules/sd_models.py (forge_model_reload), modules/processing.py (its own binding, create_infotext)


class SdModelData:
    def __init__(self) -> None:
        self.sd_model = None
        self.forge_loading_parameters: dict[str, Any] = {}
        self.forge_hash = ""

    def set_sd_model(self, model: Any) -> None:
        self.sd_model = model


def forge_model_reload():
    sd_models = _mod("modules.sd_models")
    data = sd_models.model_data
    current_hash = str(data.forge_loading_parameters)
    if data.forge_hash == current_hash:
        return data.sd_model, False
    print("Loading Model: " + str(data.forge_loading_parameters))
    if data.sd_model:
        data.sd_model = None
    checkpoint_info = data.forge_loading_parameters["checkpoint_info"]
    if checkpoint_info is None:
        raise ValueError('You do not have any model! Please download at least one model in [models/Stable-diffusion].')
    additional = data.forge_loading_parameters.get("additional_modules", [])
    sd_model = sd_models.forge_loader(checkpoint_info.filename, additional_state_dicts=additional)
    sd_model.sd_checkpoint_info = checkpoint_info
    data.set_sd_model(sd_model)
    _mod("modules.shared").sd_model = sd_model
    _mod("modules.script_callbacks").model_loaded_callback(sd_model)
    data.forge_hash = current_hash
    return sd_model, True


class Processing:
    """The few StableDiffusionProcessing fields create_infotext reads."""

    def __init__(self, prompt: str = "a cat", steps: int = 1, seed: int = 1, width: int = 64, height: int = 64):
        self.prompt, self.steps, self.seed, self.width, self.height = prompt, steps, seed, width, height
        self.extra_generation_params: dict[str, Any] = {}
        self.sd_model = None


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """processing.create_infotext: the parameters line, ending with one "Module N" per selected module (the user's
    selection, shared.opts.forge_additional_modules, not what was loaded)."""
    opts = _mod("modules.shared").opts
    params: dict[str, Any] = {"Steps": p.steps, "Seed": all_seeds[0], "Size": f"{p.width}x{p.height}",
                              "Model": p.sd_model.sd_checkpoint_info.name_for_extra, **p.extra_generation_params}
    if isinstance(opts.forge_additional_modules, list) and len(opts.forge_additional_modules) > 0:
        params.update(webui.module_generation_params(opts.forge_additional_modules))
    return webui.infotext_text(all_prompts[0], params)


def process_images(p: Any = None) -> Any:
    """processing.process_images -> manage_model_and_prompt_cache (its own forge_model_reload binding) ->
    process_images_inner, whose infotext comes from the module's create_infotext. Returns a Processed-like object."""
    processing = _mod("modules.processing")
    p = p or Processing()
    p.sd_model, _ = processing.forge_model_reload()
    info = processing.create_infotext(p, [p.prompt], [p.seed], [p.seed])
    return types.SimpleNamespace(sd_model=p.sd_model, info=info, infotexts=[info], images=[])


# ---------------------------------------------------------------------------------------------------------------
# backend/patcher/lora.py (the GGUF branch of LoraLoader.refresh)


def lora_refresh(model: torch.nn.Module, patches: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Merge ``key -> delta`` into the model's weights the way LoraLoader.refresh does (patch mode). Returns the
    backup of the original parameters."""
    backup = {}
    for key, delta in patches.items():
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = getattr(parent, child)
        backup[key] = weight.to(device="cpu")
        gguf_cls = getattr(weight, "gguf_cls", None)
        gguf_parameter = None
        if gguf_cls is not None:
            gguf_parameter = weight
            weight = _mod("backend.operations_gguf").dequantize_tensor(weight)
        weight = weight.float() + delta.float()   # merge_lora_to_weight, computation_dtype=float32
        if gguf_cls is not None:
            gguf_cls.quantize_pytorch(weight, gguf_parameter)
            continue
        setattr(parent, child, torch.nn.Parameter(weight, requires_grad=False))
    return backup


class LoraLoader:
    """backend/patcher/lora.py LoraLoader (patch mode merges into the weights; refresh's GGUF branch above)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def refresh(self, patches: dict[str, torch.Tensor]) -> dict[str, Any]:
        return lora_refresh(self.model, patches)


# ---------------------------------------------------------------------------------------------------------------
# modules_forge/main_entry.py


TOTAL_VRAM_MB = 8192


def refresh_models() -> tuple[list[str], Any]:
    main_entry, shared, paths = _mod("modules_forge.main_entry"), _mod("modules.shared"), _mod("modules.paths")
    _mod("modules.sd_models").list_models()
    main_entry.module_list.clear()
    for folder in (os.path.join(paths.models_path, "VAE"), os.path.join(paths.models_path, "text_encoder"),
                   shared.cmd_opts.vae_dir, shared.cmd_opts.text_encoder_dir):
        if not isinstance(folder, str):
            continue
        for root, _, files in os.walk(folder):
            for file in files:
                if any(file.endswith(ext) for ext in ("ckpt", "pt", "bin", "safetensors", "gguf")):
                    main_entry.module_list[file] = os.path.join(root, file)
    return list(_mod("modules.sd_models").checkpoints_list), main_entry.module_list.keys()


def refresh_model_loading_parameters():
    sd_models, shared = _mod("modules.sd_models"), _mod("modules.shared")
    sd_models.model_data.forge_loading_parameters = dict(
        checkpoint_info=sd_models.select_checkpoint(), additional_modules=shared.opts.forge_additional_modules,
        unet_storage_dtype=None)
    _mod("modules.processing").need_global_unload = True


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    sd_models, shared = _mod("modules.sd_models"), _mod("modules.shared")
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    if new == sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", "")):
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        _mod("modules_forge.main_entry").refresh_model_loading_parameters()
    return True


def modules_change(module_values: list, save=True, refresh=True) -> bool:
    main_entry, shared = _mod("modules_forge.main_entry"), _mod("modules.shared")
    modules = [main_entry.module_list[os.path.basename(v)] for v in module_values
               if os.path.basename(v) in main_entry.module_list]
    if sorted(modules) == sorted(shared.opts.data.get("forge_additional_modules", [])):
        return False
    shared.opts.set("forge_additional_modules", modules)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        main_entry.refresh_model_loading_parameters()
    return True


def refresh_memory_management_settings(async_loading=None, inference_memory=None, pin_shared_memory=None,
                                       model_memory=None):
    main_entry, opts = _mod("modules_forge.main_entry"), _mod("modules.shared").opts
    inference_memory = inference_memory if inference_memory is not None else opts.forge_inference_memory
    if model_memory is None:
        model_memory = main_entry.total_vram - inference_memory
    else:
        inference_memory = main_entry.total_vram - model_memory
    opts.set("forge_inference_memory", inference_memory)
    _mod("modules.processing").need_global_unload = True


def select(checkpoint: str | None, modules: list[str]) -> None:
    """What a user's pick in the top bar does: checkpoint_change + modules_change (basenames), each refreshing the
    loading parameters. ``checkpoint``: a path under models/Stable-diffusion (or None: no model)."""
    main_entry, shared = _mod("modules_forge.main_entry"), _mod("modules.shared")
    main_entry.refresh_models()
    if checkpoint is None:
        shared.opts.data["sd_model_checkpoint"] = None
        _mod("modules.sd_models").checkpoints_list.clear()
        _mod("modules.sd_models").checkpoint_aliases.clear()
    else:
        main_entry.checkpoint_change(os.path.basename(checkpoint), save=False)
    main_entry.modules_change([os.path.basename(m) for m in modules], save=False)
    main_entry.refresh_model_loading_parameters()


# ---------------------------------------------------------------------------------------------------------------
# modules_forge/main_thread.py: the generation thread (run here synchronously)


class Task:
    def __init__(self, task_id, func, args, kwargs):
        self.task_id, self.func, self.args, self.kwargs = task_id, func, args, kwargs
        self.result = None
        self.exception = None

    def work(self):
        main_thread = _mod("modules_forge.main_thread")   # its module globals: last_exception, traceback
        try:
            self.result = self.func(*self.args, **self.kwargs)
            self.exception = None
            main_thread.last_exception = None
        except Exception as e:
            main_thread.traceback.print_exc()
            print(e)
            self.exception = e
            main_thread.last_exception = e


def run_and_wait_result(func, *args, **kwargs):
    task = _mod("modules_forge.main_thread").Task(1, func, args, kwargs)
    task.work()
    return task.result


# ---------------------------------------------------------------------------------------------------------------
# Installing / removing the stand-in

FORGE_LABELS = {"forge_additional_modules": webui.OptionInfo([]), "forge_inference_memory": webui.OptionInfo(1024),
                "forge_preset": webui.OptionInfo("sd"), "forge_unet_storage_dtype": webui.OptionInfo("Automatic")}


def install(models_path: Path) -> dict[str, types.ModuleType]:
    """Register the fake Forge modules in sys.modules (replacing none that exist: call ``remove`` after)."""
    m = webui.new_modules(MODULE_NAMES)
    webui.install_a1111_core(m, models_path, FORGE_LABELS,
                             {"vae_dir": None, "text_encoder_dir": None, "ckpt_dir": None, "lora_dir": None})
    og = m["backend.operations_gguf"]
    og.gguf = gguf   # Forge's `import gguf` (its vendored copy first on sys.path)
    og.quants_mapping = {q: _quant_class(q, q in FORGE_REQUANT_TYPES) for q in FORGE_GGUF_TYPES}
    og.ParameterGGUF = ParameterGGUF
    og.dequantize_tensor = dequantize_tensor
    m["backend.operations"].ForgeOperationsGGUF = ForgeOperationsGGUF
    m["backend.utils"].load_torch_file = load_torch_file
    loader = m["backend.loader"]
    loader.load_torch_file = load_torch_file
    loader.replace_state_dict = replace_state_dict
    loader.split_state_dict = split_state_dict
    loader.forge_loader = forge_loader
    loader.split_log = []        # additional modules each load really merged (for assertions)
    m["backend.diffusion_engine.flux"].Flux = type("Flux", (Engine,), {"family": "flux"})
    m["backend.patcher.lora"].refresh = lora_refresh
    m["backend.patcher.lora"].LoraLoader = LoraLoader
    m["backend.args"].dynamic_args = {"online_lora": False, "forge_unet_storage_dtype": None}
    sm = m["modules.sd_models"]
    sm.model_data = SdModelData()
    sm.forge_model_reload = forge_model_reload
    sm.forge_loader = forge_loader
    sm.load_torch_file = load_torch_file
    pr = m["modules.processing"]
    pr.forge_model_reload = forge_model_reload
    pr.process_images = process_images
    pr.create_infotext = create_infotext
    pr.Processing = Processing
    pr.need_global_unload = False
    me = m["modules_forge.main_entry"]
    me.module_list = {}
    me.total_vram = TOTAL_VRAM_MB
    for fn in (refresh_models, refresh_model_loading_parameters, checkpoint_change, modules_change,
               refresh_memory_management_settings, select):
        setattr(me, fn.__name__, fn)
    mt = m["modules_forge.main_thread"]
    mt.Task, mt.run_and_wait_result, mt.last_exception, mt.traceback = Task, run_and_wait_result, None, traceback
    m["modules.call_queue"].error_text = lambda e: f"{type(e).__name__}: {e}"
    webui.publish(m)
    return m


def remove() -> None:
    webui.remove(MODULE_NAMES)


# ---------------------------------------------------------------------------------------------------------------
# Files with the real key layouts (tiny tensors except where Forge sniffs a shape)


def _filler(prefix: str, n: int = 17) -> dict[str, torch.Tensor]:
    # Forge asserts "> 16" tensors per component.
    return {f"{prefix}filler.{i}.weight": torch.zeros(2) for i in range(n)}


def clip_l_state_dict(prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}text_model.encoder.layers.0.layer_norm1.bias": torch.zeros(768),
          f"{prefix}text_model.final_layer_norm.weight": torch.ones(768)}
    sd.update(_filler(prefix + "text_model."))
    return sd


def t5xxl_state_dict(dtype: torch.dtype = torch.float16, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(8, 8),
          f"{prefix}shared.weight": torch.zeros(4, 8)}
    sd.update(_filler(prefix + "encoder."))
    return {k: v.to(dtype) for k, v in sd.items()}


def vae_state_dict(channels: int, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {f"{prefix}decoder.conv_in.weight": torch.zeros(8, channels, 3, 3),
          f"{prefix}encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}
    sd.update(_filler(prefix + "decoder."))
    return sd


def sd_checkpoint_state_dict(family: str) -> dict[str, torch.Tensor]:
    """SD1.5 / SDXL / SD3 checkpoint keys: the UNet/MMDiT marker, its own text encoders and its own VAE."""
    if family == "sd3":
        sd = {"model.diffusion_model.final_layer.adaLN_modulation.1.bias": torch.zeros(4)}
        sd.update(vae_state_dict(16, "first_stage_model."))
        return sd
    width = {"sd1": 768, "sdxl": 2048}[family]
    sd = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, width)}
    sd.update(_filler("model.diffusion_model."))
    sd.update(vae_state_dict(4, "first_stage_model."))
    te = "cond_stage_model.transformer." if family == "sd1" else "conditioner.embedders.0.transformer."
    sd.update(clip_l_state_dict(te))
    return sd


def write_city96_t5_gguf(path: Path) -> Path:
    """A T5 encoder in city96's GGUF naming (enc.blk.*), Q8_0 weights written by gguf-py."""
    writer = gguf.GGUFWriter(str(path), arch="t5encoder")
    names = ["enc.blk.0.attn_k.weight", "enc.blk.0.attn_q.weight", "token_embd.weight"] + \
            [f"enc.blk.{i}.ffn_up.weight" for i in range(1, 17)]
    rng = np.random.default_rng(0)
    for name in names:
        values = rng.standard_normal((4, 32)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(values, T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write(path: Path, sd: dict[str, torch.Tensor]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)
