"""The Forge load hook driven against the Forge stand-in (tests/forge_standin.py, mirrors Forge dfdcbab6)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq.host import forge as hook
from lib_fluxq.pairing import MissingComponentsError
from tests import fixtures, ggml_ref
from tests import forge_standin as standin

T = gguf.GGMLQuantizationType


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[dict[str, Any]]:
    models = tmp_path / "models"
    m = standin.install(models)
    try:
        yield m
    finally:
        hook.uninstall()
        standin.remove()


def _put(forge: dict[str, Any], *names: str) -> dict[str, str]:
    """Write the named component files into the stand-in's model folders."""
    models = Path(forge["modules.paths"].models_path)
    makers = {
        "clip_l": ("text_encoder/clip_l.safetensors", lambda: standin.clip_l_state_dict()),
        "t5xxl": ("text_encoder/t5xxl_fp8_e4m3fn.safetensors", lambda: standin.t5xxl_state_dict(torch.float8_e4m3fn)),
        "ae": ("VAE/ae.safetensors", lambda: standin.vae_state_dict(16)),
        "sd_vae": ("VAE/sdxl_vae.safetensors", lambda: standin.vae_state_dict(4)),
    }
    out = {n: standin.write(models / makers[n][0], makers[n][1]()) for n in names}
    forge["modules_forge.main_entry"].refresh_models()
    return out


def _flux_gguf(forge: dict[str, Any], qtype: T = T.Q4_0) -> str:
    path = Path(forge["modules.paths"].models_path) / "Stable-diffusion" / f"flux-{qtype.name}.gguf"
    fixtures.write_gguf(path, fixtures.random_flux_state_dict(), fixtures.recipe_qtype(qtype))
    return str(path)


def _sdxl(forge: dict[str, Any]) -> str:
    path = Path(forge["modules.paths"].models_path) / "Stable-diffusion" / "sdxl.safetensors"
    return standin.write(path, standin.sd_checkpoint_state_dict("sdxl"))


def _generate(forge: dict[str, Any], checkpoint: str, modules: list[str]) -> Any:
    forge["modules_forge.main_entry"].select(checkpoint, modules)
    return forge["modules.processing"].process_images()


def test_nothing_installed_on_a1111() -> None:
    assert "modules_forge" not in sys.modules
    assert hook.install() is False
    assert hook.register_callbacks() is False
    assert hook._installed == {}


def test_every_binding_wrapped_once_and_double_install_is_a_noop(forge: dict[str, Any]) -> None:
    originals = {(mod, name): getattr(forge[mod], name) for name, mods in hook.BINDINGS.items() for mod in mods}
    assert hook.register_callbacks() is True
    for (mod, name), original in originals.items():
        wrapper = getattr(forge[mod], name)
        assert wrapper is not original and getattr(wrapper, hook.MARK) is original, (mod, name)
    # One wrapper object per original, shared by every module that bound it.
    for name, mods in hook.BINDINGS.items():
        assert len({id(getattr(forge[m], name)) for m in mods}) == 1, name
    snapshot = ({k: getattr(forge[k[0]], k[1]) for k in originals}, dict(hook._installed),
                dict(forge["backend.operations_gguf"].quants_mapping),
                forge["backend.operations_gguf"].ParameterGGUF.__dict__["__new__"])
    callbacks = forge["modules.script_callbacks"].callbacks
    counts = (len(callbacks.ui_settings), len(callbacks.model_loaded))
    assert hook.register_callbacks() is True
    assert hook.install() is True
    assert snapshot == ({k: getattr(forge[k[0]], k[1]) for k in originals}, dict(hook._installed),
                        dict(forge["backend.operations_gguf"].quants_mapping),
                        forge["backend.operations_gguf"].ParameterGGUF.__dict__["__new__"])
    assert (len(callbacks.ui_settings), len(callbacks.model_loaded)) == counts == (1, 1)
    hook.uninstall()
    assert {k: getattr(forge[k[0]], k[1]) for k in originals} == originals


def test_settings_section_has_one_switch_per_behaviour(forge: dict[str, Any]) -> None:
    hook.register_callbacks()
    for callback in forge["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    labels = forge["modules.shared"].opts.data_labels
    assert set(labels) == {s.key for s in hook.SETTINGS}
    assert all(info.section == ("fluxq", "fluxq") for info in labels.values())
    assert labels["fluxq_apply_gpu_weights"].default is False
    assert all(labels[s.key].default is True for s in hook.SETTINGS if s.key != "fluxq_apply_gpu_weights")


def test_transformer_only_flux_gets_clip_t5_ae_paired(forge: dict[str, Any]) -> None:
    parts = _put(forge, "clip_l", "t5xxl", "ae", "sd_vae")
    checkpoint = _flux_gguf(forge)
    with pytest.raises(AssertionError, match="You do not have CLIP state dict!"):
        _generate(forge, checkpoint, [])        # Forge alone
    hook.register_callbacks()
    model = _generate(forge, checkpoint, [])
    assert type(model).__name__ == "Flux"
    merged = forge["backend.loader"].split_log[-1]
    assert sorted(merged) == sorted([parts["clip_l"], parts["t5xxl"], parts["ae"]])
    assert forge["modules.sd_models"].model_data.forge_loading_parameters["additional_modules"] == []
    loads = len(forge["backend.loader"].split_log)
    again, reloaded = forge["modules.sd_models"].forge_model_reload()
    assert again is model and reloaded is False and len(forge["backend.loader"].split_log) == loads


def test_missing_parts_stop_before_the_checkpoint_is_read(forge: dict[str, Any]) -> None:
    _put(forge, "clip_l")
    checkpoint = _flux_gguf(forge)
    hook.register_callbacks()
    read: list[str] = []
    original = forge["backend.loader"].load_torch_file
    forge["backend.loader"].load_torch_file = lambda path, *a, **k: (read.append(path), original(path, *a, **k))[1]
    with pytest.raises(MissingComponentsError) as info:
        _generate(forge, checkpoint, [])
    assert read == []
    assert info.value.missing == ["t5xxl", "ae"]
    message = str(info.value)
    models = forge["modules.paths"].models_path
    for needle in ("t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors",
                   os.path.join(models, "text_encoder"), os.path.join(models, "VAE")):
        assert needle in message
    assert "clip_l.safetensors" not in message


def test_sdxl_after_flux_gets_no_flux_modules(forge: dict[str, Any]) -> None:
    parts = _put(forge, "clip_l", "t5xxl", "ae", "sd_vae")
    flux, sdxl = _flux_gguf(forge), _sdxl(forge)
    selection = [parts["clip_l"], parts["t5xxl"], parts["ae"]]
    _generate(forge, flux, selection)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _generate(forge, sdxl, selection)        # Forge alone: #2255
    hook.register_callbacks()
    _generate(forge, flux, selection)
    model = _generate(forge, sdxl, selection + [parts["sd_vae"]])
    assert type(model).__name__ == "StableDiffusionXL"
    assert forge["backend.loader"].split_log[-1] == [parts["sd_vae"]]
    assert model.components["vae"]["decoder.conv_in.weight"].shape[1] == 4


def test_fallback_to_forge_when_our_code_raises(forge: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    parts = _put(forge, "clip_l", "t5xxl", "ae")
    checkpoint = _flux_gguf(forge)
    hook.register_callbacks()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk on fire")

    monkeypatch.setattr(hook, "describe_file", broken)
    monkeypatch.setattr(hook, "load_gguf_mapped", broken)
    selection = [parts["clip_l"], parts["t5xxl"], parts["ae"]]
    model = _generate(forge, checkpoint, selection)
    assert type(model).__name__ == "Flux"
    assert forge["backend.loader"].split_log[-1] == selection
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[fluxq]") and "failed" in line]
    assert len(lines) == 2 and all("disk on fire" in line and "Forge's own behaviour" in line for line in lines)
    with pytest.raises(AssertionError, match="CLIP state dict"):   # Forge's own error, not ours
        _generate(forge, checkpoint, [])


def test_switching_settings_off_restores_forge_behaviour(forge: dict[str, Any]) -> None:
    parts = _put(forge, "clip_l", "t5xxl", "ae")
    flux, sdxl = _flux_gguf(forge), _sdxl(forge)
    hook.register_callbacks()
    for callback in forge["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    opts = forge["modules.shared"].opts
    opts.set("fluxq_pair_components", False)
    with pytest.raises(MissingComponentsError):
        _generate(forge, flux, [])
    opts.set("fluxq_missing_check", False)
    with pytest.raises(AssertionError, match="CLIP state dict"):
        _generate(forge, flux, [])
    opts.set("fluxq_drop_mismatched", False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _generate(forge, sdxl, [parts["ae"]])


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    real = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(real):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see the file map")
def test_gguf_stays_memory_mapped_through_the_model_load(forge: dict[str, Any]) -> None:
    checkpoint = _flux_gguf(forge)
    hook.register_callbacks()
    state_dict = forge["modules.sd_models"].load_torch_file(checkpoint)
    ranges = _mapped_ranges(checkpoint)
    assert ranges, "the GGUF file is not mapped"
    reader = gguf.GGUFReader(checkpoint)
    for tensor in reader.tensors:
        param = state_dict[tensor.name]
        for t in (param, param.to(device="cpu")):     # Forge's _load_from_state_dict does .to(device)
            pointer = t.data_ptr()
            assert any(a <= pointer < b for a, b in ranges), tensor.name
            assert t.shape == torch.Size(reversed(list(tensor.shape)))
            assert np.array_equal(t.data.numpy().reshape(-1).view(np.uint8),
                                  np.asarray(tensor.data).reshape(-1).view(np.uint8))
        assert (param.gguf_cls is None) == (tensor.tensor_type in (T.F32, T.F16))
        if param.gguf_cls is not None:
            baked = param.to(device="cpu")
            baked.gguf_cls.bake(baked)
            baked.computation_dtype = torch.float32
            values = forge["backend.operations_gguf"].dequantize_tensor(baked)
            expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert np.array_equal(values.numpy(), expected)


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS])
def test_iq4_types_load_and_dequantize_like_ggml(forge: dict[str, Any], qtype: T) -> None:
    checkpoint = _flux_gguf(forge, qtype)
    with pytest.raises(AttributeError):   # Forge alone: no class for the type
        param = forge["backend.utils"].load_torch_file(checkpoint)["double_blocks.0.img_attn.qkv.weight"]
        param.gguf_cls.bake(param)
    hook.register_callbacks()
    state_dict = forge["backend.utils"].load_torch_file(checkpoint)
    reader = {t.name: t for t in gguf.GGUFReader(checkpoint).tensors}
    checked = 0
    for name, param in state_dict.items():
        if reader[name].tensor_type != qtype:
            continue
        weight = param.to(device="cpu")
        weight.gguf_cls.bake(weight)
        weight.computation_dtype = torch.float32
        values = forge["backend.operations_gguf"].dequantize_tensor(weight)
        packed = np.asarray(reader[name].data).reshape(-1)
        expected = ggml_ref.dequantize(packed, qtype, values.numel()).reshape(tuple(values.shape))
        assert np.array_equal(values.numpy(), expected), name
        checked += 1
    assert checked > 0
