"""A stand-in for exactly the Forge Neo functions the fluxq hook touches, mirroring Forge Neo 2.26 as bundled in
github exo101/sd-webui-forge-neo-v3 at commit f95f632a107b64337b053f3e7719ac86165aa290, folder ``webui/`` (the same
load path as Haoming02/sd-webui-forge-classic, branch neo; NEO_NOTES.md):

- backend/utils.py ``load_torch_file(ckpt, *, safe_load=True, device=None, return_metadata=False)``: safetensors
  with their metadata, GGUF through ``modules_forge.packages.gguf`` into ``ParameterGGUF(torch_tensor,
  tensor_type=, tensor_shape=)`` that shares the reader's memory map (F32/F16 viewed to their shape).
- backend/operations_gguf.py: ``QUANTS_MAPPING`` keyed by the enum of Neo's vendored gguf, a SECOND module object
  next to a plain ``import gguf`` (Neo puts modules_forge/packages on sys.path too); ParameterGGUF without a copy in
  ``__new__``; dequantize_tensor. Quant classes are Forge's (tests/forge_standin.py: Q4_0 / Q4_1 / Q8_0 / Q4_K
  re-lay their bytes at bake and compute in the computation dtype; the others keep GGML layout), typed by Neo's enum.
- backend/loader.py: ``_load_unet`` / ``split_state_dict`` call the module's own ``load_torch_file(...,
  return_metadata=True)``; ``replace_state_dict(sd, asd, guess, path)`` (city96 T5 names remapped for .gguf, any
  VAE replaces the model's own, CLIP-L by model type, T5); ``forge_loader`` (Kontext chosen by file name: "kontext"
  in the path), "You do not have CLIP/T5/VAE state dict!" asserts, a VAE size mismatch from load_state_dict.
- modules/sd_models.py ``forge_model_reload`` (prints "Loading Model:", a FakeInitialModel after a failed load);
  modules/processing.py (its own binding; ``create_infotext`` writes "Module N" from ``_overridden_modules or
  shared.opts.forge_additional_modules``).
- modules_forge/main_entry.py: ``refresh_models`` over ``--vae-dirs`` / ``--text-encoder-dirs`` lists,
  ``refresh_model_loading_parameters(*, refresh=True)`` forcing on-the-fly fp16 LoRA for GGUF
  (``dynamic_args.online_lora``), ``checkpoint_change(ckpt_name, preset, save, refresh)`` and
  ``modules_change(module_values, preset, save, refresh)`` remembering the choice per preset; no ``total_vram``.
- backend/memory_management.py ``total_vram`` and ``set_reserved_memory``; GPU Weights is the 0..1 option
  ``setting_allocated_vram`` whose onchange re-reserves (modules/initialize_util.py).
- modules_forge/main_thread.py: ``Task.work`` prints ``traceback.print_exc()`` and keeps "Type: message" text in
  ``last_exception`` (no exception attribute); backend/patcher has no LoraLoader.
- LoRA (backend/patcher/base.py, lora.py): ``ModelPatcher`` patches each key on the fly (``LowVramPatch`` merges at
  every forward) when its patch is online, else ``patch_weight_to_device`` (cast to float, merge, ``utils.set_attr``
  wraps the result in a plain Parameter) with a backup put back by ``unpatch_model``; ``merge_lora_to_weight``'s
  "diff" patches.

Written from reading that source, not copied. Callers look names up through their own fake module, as in the
Forge stand-in (tests/forge_standin.py), whose model-file builders the tests share.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import gguf
import safetensors
import torch

from tests import webui_standin as webui
from tests.forge_standin import CITY96_T5, FLUX_TEST_KEY, FORGE_BAKED, LEGACY_TEST_KEY, SD3_TEST_KEY, Engine, Guess

NEO_REPOSITORY = "exo101/sd-webui-forge-neo-v3"
NEO_COMMIT = "f95f632a107b64337b053f3e7719ac86165aa290"   # webui/: Forge Neo 2.26
MODULE_NAMES = (*webui.A1111_MODULES, "modules.processing", "modules_forge", "modules_forge.main_entry",
                "modules_forge.main_thread", "modules_forge.packages", "backend", "backend.args", "backend.utils",
                "backend.loader", "backend.operations_gguf", "backend.memory_management", "backend.patcher",
                "backend.patcher.base", "backend.patcher.lora", "backend.diffusion_engine",
                "backend.diffusion_engine.flux")
PRESETS = ("sd", "xl", "flux", "klein", "qwen")
TOTAL_VRAM_MB = 8192.0
NEO_GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "BF16")


def _mod(name: str) -> Any:
    return sys.modules[name]


def load_vendored_gguf() -> types.ModuleType:
    """gguf-py loaded a second time as ``modules_forge.packages.gguf``: its own module objects and enum class."""
    location = os.path.dirname(gguf.__file__)
    spec = importlib.util.spec_from_file_location("modules_forge.packages.gguf", os.path.join(location, "__init__.py"),
                                                  submodule_search_locations=[location])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# backend/operations_gguf.py


class _NeoQuant:
    """Neo's gguf/quants.py __Quant protocol: bake (rows -> blocks, bake_inner), dequantize_pytorch per forward;
    quantize_pytorch's abstract quantize_blocks_pytorch raises (Neo never merges LoRA into GGUF: online only)."""

    qtype: Any
    block_size: int
    type_size: int

    @classmethod
    def bake(cls, parameter: Any) -> None:
        if parameter.baked:
            return
        rows = parameter.data.reshape((-1, parameter.data.shape[-1])).view(torch.uint8)
        parameter.data = rows.reshape((rows.numel() // cls.type_size, cls.type_size)).contiguous()
        cls.bake_inner(parameter)
        parameter.baked = True

    @classmethod
    def bake_inner(cls, parameter: Any) -> None:
        pass

    @classmethod
    def dequantize_pytorch(cls, x: Any) -> torch.Tensor:
        if not x.baked:
            raise ValueError("GGUF Tensor is not baked!")
        values = _mod("modules_forge.packages.gguf").quants.dequantize(x.data.cpu().numpy().reshape(-1), cls.qtype)
        return torch.from_numpy(values.reshape(tuple(x.shape))).to(x.computation_dtype)

    @classmethod
    def quantize_pytorch(cls, data: torch.Tensor, parent: Any) -> Any:
        raise NotImplementedError("Low bit LoRA for this data type is not implemented yet.")


class ParameterGGUF(torch.nn.Parameter):
    def __init__(self, torch_tensor, *, tensor_type=None, tensor_shape=None, no_init=False):
        super().__init__()
        if no_init:
            return
        self.gguf_cls = _mod("backend.operations_gguf").QUANTS_MAPPING.get(tensor_type, None)
        self.real_shape = tensor_shape
        self.computation_dtype = torch.float16
        self.baked = False

    @property
    def shape(self):
        return self.real_shape

    def __new__(cls, torch_tensor, *, tensor_type=None, tensor_shape=None, no_init=False):
        return super().__new__(cls, torch_tensor, requires_grad=False)

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
    if tensor is None or not hasattr(tensor, "gguf_cls"):
        return tensor
    if tensor.gguf_cls is not None:
        return tensor.gguf_cls.dequantize_pytorch(tensor)
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# backend/utils.py


def load_torch_file(ckpt: str, *, safe_load=True, device=None, return_metadata=False):
    device = device or torch.device("cpu")
    metadata = None
    if ckpt.lower().endswith((".safetensors", ".sft")):
        with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            if return_metadata:
                metadata = f.metadata()
    elif ckpt.lower().endswith(".gguf"):
        neo_gguf = _mod("modules_forge.packages.gguf")
        reader = neo_gguf.GGUFReader(ckpt)
        sd = {}
        for tensor in reader.tensors:
            torch_tensor = torch.from_numpy(tensor.data)
            shape = torch.Size(tuple(int(v) for v in reversed(tensor.shape)))
            if tensor.tensor_type in {neo_gguf.GGMLQuantizationType.F32, neo_gguf.GGMLQuantizationType.F16}:
                torch_tensor = torch_tensor.view(*shape)
            sd[str(tensor.name)] = _mod("backend.operations_gguf").ParameterGGUF(
                torch_tensor, tensor_type=tensor.tensor_type, tensor_shape=shape)
    else:
        assert safe_load
        sd = torch.load(ckpt, map_location=device, weights_only=True)
    return (sd, metadata) if return_metadata else sd


# ---------------------------------------------------------------------------------------------------------------
# backend/utils.py attribute helpers, backend/patcher/lora.py merge_lora_to_weight ("diff" patches),
# backend/patcher/base.py ModelPatcher (patch mode, on-the-fly LowVramPatch, backups), backend/operations.py's GGUF
# Linear forward (weights_manual_cast: dequantize, then every weight_function)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, attr, value):
    *parents, name = attr.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    prev = getattr(obj, name)
    setattr(obj, name, value)
    return prev


def set_attr(obj, attr, value):
    try:
        set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))
    except RuntimeError:
        set_attr_raw(obj, attr, torch.nn.Parameter(value.clone(), requires_grad=False))


def copy_to_param(obj, attr, value):
    get_attr(obj, attr).data.copy_(value)


def merge_lora_to_weight(patches, weight, key, computation_dtype=torch.float32):
    for p in patches:
        strength, v = p[0], p[1]
        if len(v) == 1:   # ("diff" patch): v = (delta,)
            weight += strength * v[0].to(weight.device, weight.dtype)
    return weight


class LowVramPatch:
    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches, self.convert_func, self.set_func = key, patches, convert_func, set_func

    def __call__(self, weight):
        _mod("backend.patcher.base").merges.append(self.key)
        return _mod("backend.patcher.lora").merge_lora_to_weight(self.patches[self.key], weight, self.key,
                                                                 computation_dtype=weight.dtype)


def get_key_weight(model, key):
    module_name, _, param = key.rpartition(".")
    op = get_attr(model, module_name)
    return getattr(op, param), getattr(op, f"set_{param}", None), getattr(op, f"convert_{param}", None)


class ModelPatcher:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.patches: dict[str, list[tuple]] = {}
        self.backup: dict[str, Any] = {}
        self.weight_inplace_update = False
        self.offload_device = torch.device("cpu")

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0, *, filename=None, online_mode=None):
        for key, value in patches.items():
            self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None, online_mode))
        return list(patches)

    def use_online_lora(self, key):
        return any(patch[-1] for patch in self.patches.get(key, []))

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                               force_cast=False):
        base, utils = _mod("backend.patcher.base"), _mod("backend.utils")
        weight, set_func, convert_func = base.get_key_weight(self.model, key)
        if key not in self.patches and not force_cast:
            return weight
        inplace_update = self.weight_inplace_update or inplace_update
        if key not in self.backup and not return_weight:
            self.backup[key] = base.Dimension(weight.to(device=self.offload_device, copy=inplace_update),
                                              inplace_update)
        temp_weight = weight.to(torch.float32, copy=True)
        out_weight = _mod("backend.patcher.lora").merge_lora_to_weight(self.patches[key], temp_weight, key)
        out_weight = out_weight.to(weight.dtype)
        if return_weight:
            return out_weight
        if inplace_update:
            utils.copy_to_param(self.model, key, out_weight)
        else:
            utils.set_attr(self.model, key, out_weight)

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        base = _mod("backend.patcher.base")
        for key in self.patches:   # every patched layer is loaded completely here (CPU, enough memory)
            module_name, _, param = key.rpartition(".")
            module = get_attr(self.model, module_name)
            if self.use_online_lora(key):
                _, set_func, convert_func = base.get_key_weight(self.model, key)
                setattr(module, f"{param}_function", [base.LowVramPatch(key, self.patches, convert_func, set_func)])
            else:
                self.patch_weight_to_device(key, device_to=device_to)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        utils = _mod("backend.utils")
        if unpatch_weights:
            for k in list(self.backup):
                bk = self.backup[k]
                if bk.inplace_update:
                    utils.copy_to_param(self.model, k, bk.weight)
                else:
                    utils.set_attr(self.model, k, bk.weight)
            self.backup.clear()
            for m in self.model.modules():
                m.weight_function = []


class GGUFLinear(torch.nn.Module):
    """ForgeOperationsGGUF.Linear: the weight dequantized per forward, then every weight_function applied."""

    def __init__(self, weight: Any) -> None:
        super().__init__()
        self.weight = weight
        self.weight_function: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _mod("backend.operations_gguf").dequantize_tensor(self.weight)
        for f in self.weight_function:
            weight = f(weight)
        return torch.nn.functional.linear(x, weight.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------------
# backend/loader.py


def _model_type(sd: dict[str, Any]) -> str:
    if LEGACY_TEST_KEY in sd:
        return {768: "sd1", 1280: "xlrf", 2048: "sdxl"}.get(sd[LEGACY_TEST_KEY].shape[1], "-")
    if FLUX_TEST_KEY in sd:
        return "flux"
    if SD3_TEST_KEY in sd:
        return "sd3"
    return "-"


def replace_state_dict(sd, asd, guess, path):
    vae_prefix, te_prefix = guess.vae_key_prefix[0], guess.text_encoder_key_prefix[0]
    if path.endswith("gguf"):   # loader_gguf.gguf_remapping: city96 T5 names
        renamed = {}
        for k, v in asd.items():
            for s, d in CITY96_T5.items():
                k = k.replace(s, d)
            renamed[k] = v
        asd = renamed
    if "decoder.conv_in.weight" in asd:   # sd / sdxl / flux: any VAE replaces the model's own
        for k in [k for k in sd if k.startswith(vae_prefix)]:
            del sd[k]
        for k, v in asd.items():
            sd[vae_prefix + k] = v
    model_type = _model_type(sd)
    prefix_l = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer.",
                "flux": "text_encoders.clip_l.transformer."}.get(model_type)
    key = "text_model.encoder.layers.0.layer_norm1.bias"
    if key in asd and asd[key].shape[0] == 768 and prefix_l is not None:
        for k, v in asd.items():
            sd[prefix_l + k] = v
    if "encoder.block.0.layer.0.SelfAttention.k.weight" in asd:
        name = "umt5xxl" if asd["shared.weight"].size(0) == 256384 else "t5xxl"
        for k in [k for k in sd if k.startswith(f"{te_prefix}{name}.")]:
            del sd[k]
        for k, v in asd.items():
            sd[f"{te_prefix}{name}.transformer.{k}"] = v
    return sd


def _load_unet(path):
    sd, metadata = _mod("backend.loader").load_torch_file(path, return_metadata=True)
    if not any(k.startswith(("model.diffusion_model.", "net.")) for k in sd):
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    family = _model_type(sd)
    if family == "-":
        raise ModuleNotFoundError("Failed to recognize model...")
    return sd, metadata, Guess(family)


def split_state_dict(path, additional_state_dicts=None):
    loader = _mod("backend.loader")
    sd, metadata, guess = loader._load_unet(path)
    loader.split_log.append([])
    if isinstance(additional_state_dicts, list):
        for asd in additional_state_dicts:
            loader.split_log[-1].append(asd)
            _asd, _meta = loader.load_torch_file(asd, return_metadata=True)
            sd = loader.replace_state_dict(sd, _asd, guess, asd)
    return sd, guess


def _part(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def forge_loader(sd, additional_state_dicts=None):
    loader, dynamic_args = _mod("backend.loader"), _mod("backend.args").dynamic_args
    state_dict, guess = loader.split_state_dict(sd, additional_state_dicts=additional_state_dicts)
    dynamic_args.kontext = "kontext" in str(sd).lower()
    family = guess.family
    components = {"transformer": _part(state_dict, "model.diffusion_model.")}
    if family == "flux":   # load_huggingface_component's asserts
        clip = _part(state_dict, "text_encoders.clip_l.")
        t5 = _part(state_dict, "text_encoders.t5xxl.")
        assert len(clip) > 16, "You do not have CLIP state dict!"
        assert len(t5) > 16, "You do not have T5 state dict!"
        components["text_encoders"] = {"clip_l": clip, "t5xxl": t5}
    vae = _part(state_dict, guess.vae_key_prefix[0])
    assert len(vae) > 16, "You do not have VAE state dict!"
    latent_channels = 16 if family in ("flux", "sd3") else 4
    conv_in = vae["decoder.conv_in.weight"]
    if conv_in.shape[1] != latent_channels:
        raise RuntimeError(f"Error(s) in loading state_dict for AutoencoderKL: size mismatch for "
                           f"decoder.conv_in.weight: copying a param with shape {tuple(conv_in.shape)}, the shape in "
                           f"current model is ({conv_in.shape[0]}, {latent_channels}, 3, 3).")
    components["vae"] = vae
    engines = {"flux": _mod("backend.diffusion_engine.flux").Flux, "sd1": type("StableDiffusion", (Engine,), {}),
               "sdxl": type("StableDiffusionXL", (Engine,), {}), "sd3": type("StableDiffusion3", (Engine,), {})}
    return engines[family](components)


# ---------------------------------------------------------------------------------------------------------------
# modules/sd_models.py, modules/processing.py


class FakeInitialModel:
    pass


class SdModelData:
    def __init__(self) -> None:
        self.sd_model = None
        self.forge_loading_parameters: dict[str, Any] = {}
        self.forge_hash = ""

    def set_sd_model(self, model: Any) -> None:
        self.sd_model = model


def forge_model_reload():
    sd_models, shared = _mod("modules.sd_models"), _mod("modules.shared")
    data = sd_models.model_data
    current_hash = str(data.forge_loading_parameters)
    if data.forge_hash == current_hash:
        return data.sd_model, False
    print("Loading Model: " + str(data.forge_loading_parameters))
    if data.sd_model is not None:
        data.sd_model = None
        data.forge_hash = ""
    try:
        checkpoint_info = data.forge_loading_parameters["checkpoint_info"]
        assert checkpoint_info is not None
    except Exception:
        raise ValueError("Failed to find available model...") from None
    additional = data.forge_loading_parameters.get("additional_modules", [])
    try:
        sd_model = sd_models.forge_loader(checkpoint_info.filename, additional_state_dicts=additional)
    except Exception:
        data.sd_model = FakeInitialModel()
        shared.sd_model = data.sd_model
        data.forge_hash = ""
        raise
    sd_model.sd_checkpoint_info = checkpoint_info
    data.set_sd_model(sd_model)
    shared.sd_model = sd_model
    _mod("modules.script_callbacks").model_loaded_callback(sd_model)
    data.forge_hash = current_hash
    return sd_model, True


class Processing:
    def __init__(self, prompt: str = "a cat", steps: int = 1, seed: int = 1, width: int = 64, height: int = 64):
        self.prompt, self.steps, self.seed, self.width, self.height = prompt, steps, seed, width, height
        self.extra_generation_params: dict[str, Any] = {}
        self.sd_model = None


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    processing, opts = _mod("modules.processing"), _mod("modules.shared").opts
    params: dict[str, Any] = {"Steps": p.steps, "Seed": all_seeds[0], "Size": f"{p.width}x{p.height}",
                              "Model": p.sd_model.sd_checkpoint_info.name_for_extra}
    params.update(webui.module_generation_params(processing._overridden_modules or opts.forge_additional_modules))
    params.update(p.extra_generation_params)
    return webui.infotext_text(all_prompts[0], params)


def process_images(p: Any = None) -> Any:
    processing = _mod("modules.processing")
    p = p or Processing()
    p.sd_model, _ = processing.forge_model_reload()
    info = processing.create_infotext(p, [p.prompt], [p.seed], [p.seed])
    return types.SimpleNamespace(sd_model=p.sd_model, info=info, infotexts=[info], images=[])


# ---------------------------------------------------------------------------------------------------------------
# modules_forge/main_entry.py, backend/memory_management.py, backend/args.py


class DynamicArgs:
    """backend/args.py dynamic_args (class attributes, set per load)."""

    online_lora = False
    kontext = False
    forge_unet_storage_dtype = None


def refresh_models() -> tuple[list[str], list[str]]:
    main_entry, shared, paths = _mod("modules_forge.main_entry"), _mod("modules.shared"), _mod("modules.paths")
    _mod("modules.sd_models").list_models()
    main_entry.module_list.clear()
    module_paths = {os.path.abspath(os.path.join(paths.models_path, "VAE")),
                    os.path.abspath(os.path.join(paths.models_path, "text_encoder")),
                    *shared.cmd_opts.vae_dirs, *shared.cmd_opts.text_encoder_dirs}
    for folder in module_paths:
        for root, _, files in os.walk(folder):
            for file in files:
                if file.endswith(("ckpt", "pt", "pth", "bin", "safetensors", "sft", "gguf")):
                    main_entry.module_list[file] = os.path.join(root, file)
    return sorted(_mod("modules.sd_models").checkpoints_list), sorted(main_entry.module_list)


def refresh_model_loading_parameters(*, refresh: bool = True):
    if not refresh:
        return
    sd_models, shared = _mod("modules.sd_models"), _mod("modules.shared")
    checkpoint_info = sd_models.select_checkpoint()
    if checkpoint_info is None:
        return
    sd_models.model_data.forge_loading_parameters = dict(
        checkpoint_info=checkpoint_info, additional_modules=shared.opts.forge_additional_modules,
        unet_storage_dtype=None)
    lora_fp16 = shared.opts.forge_unet_storage_dtype.endswith("(fp16 LoRA)")
    if checkpoint_info.filename.endswith(("gguf", "GGUF")) and not lora_fp16:
        print("GGUF requires fp16 LoRA ; overriding option")
        lora_fp16 = True
    _mod("backend.args").dynamic_args.online_lora = lora_fp16
    _mod("modules.processing").need_global_unload = True


def checkpoint_change(ckpt_name: str, preset: str, save=True, refresh=True) -> bool:
    sd_models, shared = _mod("modules.sd_models"), _mod("modules.shared")
    new = sd_models.get_closet_checkpoint_match(ckpt_name)
    if new == sd_models.get_closet_checkpoint_match(getattr(shared.opts, "sd_model_checkpoint", "")):
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if preset is not None:
        shared.opts.set(f"forge_checkpoint_{preset}", ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    _mod("modules_forge.main_entry").refresh_model_loading_parameters(refresh=refresh)
    return True


def modules_change(module_values: list, preset: str, save=True, refresh=True) -> bool:
    main_entry, shared = _mod("modules_forge.main_entry"), _mod("modules.shared")
    modules = sorted(main_entry.module_list[os.path.basename(v)] for v in module_values
                     if os.path.basename(v) in main_entry.module_list)
    if modules == getattr(shared.opts, "forge_additional_modules", []):
        return False
    shared.opts.set("forge_additional_modules", modules)
    if preset is not None:
        shared.opts.set(f"forge_additional_modules_{preset}", modules)
    if save:
        shared.opts.save(shared.config_filename)
    main_entry.refresh_model_loading_parameters(refresh=refresh)
    return True


def select(checkpoint: str | None, modules: list[str]) -> None:
    """What a user's pick in the top bar does (Neo passes the UI preset)."""
    main_entry, shared = _mod("modules_forge.main_entry"), _mod("modules.shared")
    main_entry.refresh_models()
    preset = shared.opts.forge_preset
    if checkpoint is None:
        shared.opts.data["sd_model_checkpoint"] = None
        _mod("modules.sd_models").checkpoints_list.clear()
        _mod("modules.sd_models").checkpoint_aliases.clear()
        _mod("modules.sd_models").model_data.forge_loading_parameters = dict(
            checkpoint_info=None, additional_modules=[], unet_storage_dtype=None)
    else:
        main_entry.checkpoint_change(os.path.basename(checkpoint), preset, save=False)
    main_entry.modules_change([os.path.basename(m) for m in modules], preset, save=False)
    if checkpoint is not None:
        main_entry.refresh_model_loading_parameters()


def set_reserved_memory(val: float) -> None:
    memory = _mod("backend.memory_management")
    memory.SETTING_RESERVED_VRAM = (1.0 - val) * memory.total_vram * 1024 * 1024


def reserve_memory() -> None:   # modules/initialize_util.py, onchange of setting_allocated_vram
    _mod("backend.memory_management").set_reserved_memory(_mod("modules.shared").opts.setting_allocated_vram)


# ---------------------------------------------------------------------------------------------------------------
# modules_forge/main_thread.py


class Task:
    def __init__(self, task_id, func, args, kwargs):
        self.task_id, self.func, self.args, self.kwargs = task_id, func, args, kwargs
        self.result = None

    def work(self):
        main_thread = _mod("modules_forge.main_thread")
        try:
            self.result = self.func(*self.args, **self.kwargs)
            main_thread.last_exception = None
        except Exception as e:
            if isinstance(e, ModuleNotFoundError) and "recognize" in str(e):
                print("Failed to recognize diffusion model... (check README for supported models)")
            else:
                main_thread.traceback.print_exc()
            main_thread.last_exception = f"{type(e).__name__}: {e}"


def run_and_wait_result(func, *args, **kwargs):
    task = _mod("modules_forge.main_thread").Task(1, func, args, kwargs)
    task.work()
    return task.result


# ---------------------------------------------------------------------------------------------------------------
# Installing / removing the stand-in


def _labels() -> dict[str, webui.OptionInfo]:
    labels = {"forge_additional_modules": webui.OptionInfo([]), "forge_preset": webui.OptionInfo("sd"),
              "forge_unet_storage_dtype": webui.OptionInfo("Automatic"),
              "setting_allocated_vram": webui.OptionInfo(1.0, "GPU Weights", onchange=reserve_memory)}
    for preset in PRESETS:   # modules_forge/presets.py register()
        labels[f"forge_checkpoint_{preset}"] = webui.OptionInfo(None)
        labels[f"forge_additional_modules_{preset}"] = webui.OptionInfo([])
        labels[f"forge_unet_storage_dtype_{preset}"] = webui.OptionInfo("Automatic")
    return labels


def install(models_path: Path) -> dict[str, types.ModuleType]:
    """Register the fake Neo modules in sys.modules (replacing none that exist: call ``remove`` after)."""
    m = webui.new_modules(MODULE_NAMES)
    webui.install_a1111_core(m, models_path, _labels(),
                             {"ckpt_dirs": [], "vae_dirs": [], "text_encoder_dirs": [], "lora_dirs": [],
                              "lora_dir": str(models_path / "Lora")})
    webui.publish(m)
    neo_gguf = load_vendored_gguf()
    m["modules_forge.packages"].gguf = neo_gguf
    og = m["backend.operations_gguf"]
    og.gguf = neo_gguf
    og.QUANTS_MAPPING = {}
    for name in NEO_GGUF_TYPES:
        # Neo's quants.py keeps Forge's classes (Q4_0 / Q4_1 / Q8_0 / Q4_K re-lay their bytes at bake); keyed and
        # typed by Neo's own enum
        qtype = neo_gguf.GGMLQuantizationType[name]
        base = FORGE_BAKED.get(gguf.GGMLQuantizationType[name], _NeoQuant)
        block, size = neo_gguf.GGML_QUANT_SIZES[qtype]
        og.QUANTS_MAPPING[qtype] = type(name, (base,), {"qtype": qtype, "block_size": block, "type_size": size})
    og.ParameterGGUF = ParameterGGUF
    og.dequantize_tensor = dequantize_tensor
    utils = m["backend.utils"]
    utils.load_torch_file = load_torch_file
    utils.get_attr, utils.set_attr, utils.set_attr_raw, utils.copy_to_param = get_attr, set_attr, set_attr_raw, \
        copy_to_param
    base = m["backend.patcher.base"]
    base.ModelPatcher, base.LowVramPatch, base.get_key_weight = ModelPatcher, LowVramPatch, get_key_weight
    base.Dimension = collections.namedtuple("Dimension", ["weight", "inplace_update"])
    base.merges = []   # keys merged on the fly, one entry per forward (for assertions)
    m["backend.patcher.lora"].merge_lora_to_weight = merge_lora_to_weight
    loader = m["backend.loader"]
    loader.load_torch_file = load_torch_file
    loader.replace_state_dict = replace_state_dict
    loader.split_state_dict = split_state_dict
    loader._load_unet = _load_unet
    loader.forge_loader = forge_loader
    loader.split_log = []
    m["backend.diffusion_engine.flux"].Flux = type("Flux", (Engine,), {"family": "flux"})
    m["backend.args"].dynamic_args = DynamicArgs
    memory = m["backend.memory_management"]
    memory.total_vram, memory.SETTING_RESERVED_VRAM = TOTAL_VRAM_MB, 0.0
    memory.set_reserved_memory = set_reserved_memory
    sm = m["modules.sd_models"]
    sm.model_data = SdModelData()
    sm.forge_model_reload = forge_model_reload
    sm.forge_loader = forge_loader
    pr = m["modules.processing"]
    pr.forge_model_reload = forge_model_reload
    pr.process_images = process_images
    pr.create_infotext = create_infotext
    pr.Processing = Processing
    pr._overridden_modules = None
    pr.need_global_unload = False
    me = m["modules_forge.main_entry"]
    me.module_list = {}
    for fn in (refresh_models, refresh_model_loading_parameters, checkpoint_change, modules_change, select):
        setattr(me, fn.__name__, fn)
    mt = m["modules_forge.main_thread"]
    mt.Task, mt.run_and_wait_result, mt.last_exception, mt.traceback = Task, run_and_wait_result, None, traceback
    m["modules.call_queue"].error_text = lambda e: e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return m


def remove() -> None:
    webui.remove(MODULE_NAMES)
