"""What only Forge Neo needs, against the Neo stand-in (tests/neo_standin.py mirrors Neo 2.26, exo101/
sd-webui-forge-neo-v3 @f95f632 webui/): nothing patched that Neo does itself, IQ4 keyed by Neo's own gguf enum, and
the optional merge-once LoRA for GGUF (Neo applies LoRA to GGUF weights on the fly at every step)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq.host import forge as hook
from lib_fluxq.host import lora_merge, patching
from lib_fluxq.lora import can_requantize
from tests import ggml_ref, hook_hosts, neo_standin
from tests.hook_hosts import Host

T = gguf.GGMLQuantizationType
ROWS, COLS = 64, 512


@pytest.fixture
def neo(tmp_path: Path) -> Iterator[Host]:
    installed = hook_hosts.install("neo", tmp_path / "models")
    try:
        yield installed
    finally:
        hook.uninstall()
        neo_standin.remove()


def test_nothing_patched_that_neo_does_itself(neo: Host) -> None:
    operations = neo.m["backend.operations_gguf"]
    before = {"new": operations.ParameterGGUF.__dict__["__new__"],
              "quantize": {q: c.__dict__.get("quantize_pytorch") for q, c in operations.QUANTS_MAPPING.items()},
              "load": {m: neo.m[m].load_torch_file for m in ("backend.utils", "backend.loader")}}
    hook.register_callbacks()
    assert operations.ParameterGGUF.__dict__["__new__"] is before["new"]      # Neo shares the GGUF map itself
    assert {m: neo.m[m].load_torch_file for m in ("backend.utils", "backend.loader")} == before["load"]
    assert {q: operations.QUANTS_MAPPING[q].__dict__.get("quantize_pytorch") for q in before["quantize"]} == \
        before["quantize"]                                                     # Neo never re-quantizes for LoRA
    assert {"mmap", "lora_requant"}.isdisjoint(hook.active_patches())
    assert {"load", "iq4", "lora_merge", "quiet_errors", "infotext"} <= hook.active_patches()
    targets = {type(target).__name__ if not isinstance(target, type) else target.__name__
               for target, _ in patching.installed().values()}
    assert "ParameterGGUF" not in targets


def test_iq4_keys_are_neos_own_enum_not_a_plain_import(neo: Host) -> None:
    hook.register_callbacks()
    enum = neo.host_enum()
    assert enum is not gguf.GGMLQuantizationType     # Neo's vendored gguf: a second module object
    added = [k for k in neo.gguf_mapping() if k.name in ("IQ4_NL", "IQ4_XS")]
    assert sorted(k.name for k in added) == ["IQ4_NL", "IQ4_XS"] and all(type(k) is enum for k in added)


def test_edit_variant_is_chosen_by_file_name(neo: Host) -> None:
    """Neo switches Flux Kontext on by the checkpoint's path ("kontext" anywhere in it, folders included), whatever
    the file holds; the hook's pairing does not change which file loads, so a Kontext file named so stays Kontext.
    (This test's name avoids the word: its temporary folder is part of every path.)"""
    parts = neo.put("clip_l", "t5xxl", "ae")
    hook.register_callbacks()
    kontext = neo.flux_gguf(name="flux1-kontext-dev-Q4_0.gguf")
    neo.generate(kontext, [])
    assert neo.m["backend.args"].dynamic_args.kontext is True
    assert sorted(neo.split_log()[-1]) == sorted(parts.values())
    neo.generate(neo.flux_gguf(), [])
    assert neo.m["backend.args"].dynamic_args.kontext is False


# ---------------------------------------------------------------------------------------------------------------
# merge-once LoRA


def _gguf_layer(neo: Host, tmp_path: Path, qtype: T,
                computation: torch.dtype = torch.float32) -> tuple[torch.nn.Module, np.ndarray]:
    """A model with one GGUF Linear loaded by Neo's load_torch_file from a real file (its computation dtype set as
    Neo's Linear does at load: float32 on a CPU, float16 / bfloat16 on a GPU); its ggml-dequantized weight."""
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((ROWS, COLS)) / COLS**0.5).astype(np.float32)
    packed = ggml_ref.quantize(weight, qtype)
    path = tmp_path / f"layer-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor("layer.weight", packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    param = neo.m["backend.utils"].load_torch_file(str(path))["layer.weight"]
    param.computation_dtype = computation
    model = torch.nn.Module()
    model.layer = neo_standin.GGUFLinear(param)
    return model, ggml_ref.dequantize(packed.reshape(-1), qtype, ROWS * COLS).reshape(ROWS, COLS)


def _select_gguf(neo: Host, setting_on: bool, dtype: str = "Automatic", forward: bool = True) -> None:
    hook.register_callbacks()
    for callback in neo.m["modules.script_callbacks"].callbacks.ui_settings:
        callback()
    opts = neo.opts()
    opts.data["forge_unet_storage_dtype"] = dtype
    opts.data[lora_merge.SETTING] = setting_on
    opts.data["fluxq_gguf_forward"] = forward   # off: Neo's own classes (and their byte layouts) serve the weights
    neo.select(neo.flux_gguf(), [])


def _patcher(neo: Host, model: torch.nn.Module, delta: torch.Tensor) -> Any:
    patcher = neo_standin.ModelPatcher(model)
    online = neo.m["backend.args"].dynamic_args.online_lora
    patcher.add_patches({"layer.weight": (delta,)}, strength_patch=0.5, online_mode=online)
    return patcher


def _forward_weight(model: torch.nn.Module) -> np.ndarray:
    """The weight the layer really multiplies with: its output for the identity matrix."""
    return model.layer(torch.eye(COLS)).T.numpy()


def test_neo_alone_applies_lora_to_gguf_at_every_step(neo: Host, tmp_path: Path) -> None:
    _select_gguf(neo, setting_on=False)
    assert neo.m["backend.args"].dynamic_args.online_lora is True   # "GGUF requires fp16 LoRA ; overriding option"
    model, base = _gguf_layer(neo, tmp_path, T.Q5_1)
    delta = torch.from_numpy(np.random.default_rng(4).standard_normal((ROWS, COLS)).astype(np.float32)) * 0.01
    patcher = _patcher(neo, model, delta)
    patcher.load()
    merges = neo.m["backend.patcher.base"].merges
    for step in range(3):
        model.layer.weight.gguf_cls.bake(model.layer.weight)
        got = _forward_weight(model)
        np.testing.assert_allclose(got, base + 0.5 * delta.numpy(), rtol=0, atol=1e-6)
        assert len(merges) == step + 1                              # merged again at this step


# Neo's GGUF layers always compute in float16 / bfloat16 (operations.py: anything else becomes float16); fluxq's own
# classes read GGML bytes at any dtype, so float32 there checks the merge exactly. Every type Neo's own classes bake
# (Q4_0 / Q4_1 / Q8_0 / Q4_K) in bfloat16 too: there even Q8_0's bake_inner changes the bytes (fp16 -> bf16 scales).
MERGE_CASES = [(q, True, torch.float32) for q in (T.Q4_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.IQ4_XS)] + \
    [(q, False, torch.float16) for q in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_1)] + \
    [(q, False, torch.bfloat16) for q in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K)]


@pytest.mark.parametrize(("qtype", "forward", "computation"), MERGE_CASES,
                         ids=lambda v: getattr(v, "name", None) or str(v).replace("torch.", ""))
def test_merge_once_requantizes_and_unpatch_puts_the_original_back(neo: Host, tmp_path: Path, qtype: T,
                                                                 forward: bool, computation: torch.dtype,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Merged once, re-quantized to the same type in the layout the serving class reads (fluxq's GGML classes, or
    Neo's own with ``forward`` off, whose Q4_0 / Q8_0 / Q4_K bytes are re-laid at bake in the computation dtype);
    no per-step LoRA afterwards; removing the LoRA puts the original parameter object back."""
    assert can_requantize(qtype)
    _select_gguf(neo, setting_on=True, forward=forward)
    assert neo.m["backend.args"].dynamic_args.online_lora is False
    model, base = _gguf_layer(neo, tmp_path, qtype, computation)
    original = model.layer.weight
    delta = torch.from_numpy(np.random.default_rng(5).standard_normal((ROWS, COLS)).astype(np.float32)) * 0.02
    patcher = _patcher(neo, model, delta)
    patcher.load()
    assert "LoRA merged into 1 GGUF layers and re-quantized" in capsys.readouterr().out
    original_bytes = original.data.clone()   # baked by the merge (as Neo bakes before the first forward)
    merged_param = model.layer.weight
    assert type(merged_param) is type(original) and merged_param.gguf_cls is original.gguf_cls
    assert merged_param.data.dtype == original_bytes.dtype and merged_param.data.shape == original_bytes.shape
    merges = neo.m["backend.patcher.base"].merges
    got = _forward_weight(model)
    _forward_weight(model)
    assert merges == []                                             # no per-step LoRA any more
    merged = base + 0.5 * delta.numpy()
    fresh = ggml_ref.quantize(merged, qtype)                        # what a fresh conversion of the merge gives
    fresh_error = float(np.abs(ggml_ref.dequantize(fresh.reshape(-1), qtype, merged.size).reshape(merged.shape)
                               - merged).max())
    error = float(np.abs(got - merged).max())
    if computation == torch.float32:
        assert error <= fresh_error * (1 + 1e-6) + 1e-7, (error, fresh_error)
    else:   # Neo itself computes with (and merges into) the weight rounded to its computation dtype
        rounding = float(np.abs(merged).max()) * 2.0 ** (-7 if computation == torch.bfloat16 else -10)
        assert error <= fresh_error * 1.5 + 2 * rounding, (error, fresh_error, rounding)
    assert error < float(np.abs(merged - base).max())              # the LoRA is really in there
    patcher.unpatch_model()
    assert model.layer.weight is original and torch.equal(original.data, original_bytes)


def test_merge_once_keeps_the_users_fp16_lora_choice_and_switches_back(neo: Host) -> None:
    _select_gguf(neo, setting_on=True, dtype="Automatic (fp16 LoRA)")
    assert neo.m["backend.args"].dynamic_args.online_lora is True   # the user asked for on the fly
    neo.opts().data["forge_unet_storage_dtype"] = "Automatic"
    neo.opts().set(lora_merge.SETTING, False)       # its onchange re-applies the mode at once
    assert neo.m["backend.args"].dynamic_args.online_lora is True
    neo.opts().set(lora_merge.SETTING, True)
    assert neo.m["backend.args"].dynamic_args.online_lora is False


def test_a_layer_that_cannot_be_merged_gets_neos_on_the_fly_lora(neo: Host, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _select_gguf(neo, setting_on=True)
    model, base = _gguf_layer(neo, tmp_path, T.Q5_1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no quantizer")

    monkeypatch.setattr("lib_fluxq.lora.requantize", broken)
    delta = torch.ones(ROWS, COLS) * 0.01
    patcher = _patcher(neo, model, delta)
    patcher.load()
    assert "merging a LoRA into layer.weight failed (ValueError: no quantizer)" in capsys.readouterr().out
    model.layer.weight.gguf_cls.bake(model.layer.weight)
    np.testing.assert_allclose(_forward_weight(model), base + 0.5 * delta.numpy(), rtol=0, atol=1e-6)
    assert neo.m["backend.patcher.base"].merges == ["layer.weight"]
