"""NF4: our quantizer/dequantizer and files against bitsandbytes itself (CPU), in both Forge layouts.

v2 (no double quant) files come from ``convert_file(..., "nf4")`` and are read back the way Forge does
(``Params4bit.from_prequantized`` -> ``QuantState.from_dict`` -> ``dequantize_4bit``). v1 (double-quantized)
files are made by bitsandbytes' own ``quantize_4bit(compress_statistics=True)`` and written by safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lib_fluxq.convert import convert_file
from lib_fluxq.errors import FormatError
from lib_fluxq.flux import FORGE_PREFIX, is_quantized_by_recipe
from lib_fluxq.formats import nf4
from lib_fluxq.formats.safetensors_read import SafetensorsReader
from tests.fixtures import SMALL_FLUX, random_flux_state_dict, write_safetensors


def test_code_table_is_bitsandbytes_nf4():
    assert torch.equal(nf4.NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))


# 2-D shapes have rows of whole 64-blocks (every Flux weight does): bitsandbytes' CPU C dequantizer restarts the
# blocks at each row otherwise, unlike its own quantizer and generic kernel (flat blocks), which we follow.
# 1-D shapes cover partial last blocks and odd counts (few lengths: bitsandbytes torch.compiles per odd shape).
SHAPES = st.one_of(st.tuples(st.integers(1, 9), st.integers(1, 5).map(lambda k: 64 * k)),
                   st.tuples(st.sampled_from([1, 63, 100, 130, 333])))


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, scale=st.sampled_from([1e-6, 1.0, 300.0]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), zero_block=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_quantize_and_dequantize_match_bitsandbytes(shape, scale, dtype, zero_block, seed):
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(shape, generator=gen) * scale).to(dtype)
    if zero_block:
        values.view(-1)[:64] = 0  # an all-zero block: absmax 0
    packed, state = bnbf.quantize_4bit(values, blocksize=64, quant_type="nf4")
    ours = nf4.quantize_nf4(values, chunk_blocks=3)  # small chunks exercise the chunk seams
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    reference = bnbf.dequantize_4bit(packed, state).reshape(shape)
    ours_values = nf4.dequantize_nf4(ours.packed, ours.absmax, shape, dtype=dtype)
    assert ours_values.dtype == reference.dtype
    assert torch.equal(ours_values, reference)


def test_v2_blob_is_what_quant_state_as_dict_packs():
    values = torch.randn(128, 192)
    ours = nf4.quantize_nf4(values, dtype_name="bfloat16")
    state = bnbf.QuantState(absmax=ours.absmax, shape=values.shape, code=bnbf.get_4bit_type("nf4", device="cpu"),
                            blocksize=64, quant_type="nf4", dtype=torch.bfloat16)
    reference = state.as_dict(packed=True)
    ours_dict = ours.state_dict("w")
    assert sorted(ours_dict) == sorted(["w"] + [f"w.{k}" for k in reference])
    for key, value in reference.items():
        assert torch.equal(ours_dict[f"w.{key}"], value), key
    # the layout declared before quantizing matches what is written
    assert [(k, d, s) for k, d, s in nf4.v2_layout("w", (128, 192))] == \
        [(k, v.dtype, tuple(v.shape)) for k, v in ours_dict.items()]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("nf4")
    sd = random_flux_state_dict(SMALL_FLUX, seed=5, dtype=torch.bfloat16)
    src = write_safetensors(folder / "flux.safetensors", sd)
    out = folder / "flux-nf4.safetensors"
    convert_file(src, out, "nf4")
    return out, sd


def _forge_style_load(path: Path) -> dict[str, object]:
    """What Forge's ForgeLoader4Bit._load_from_state_dict does per Linear: the keys after ``<prefix>weight.`` go to
    ``Params4bit.from_prequantized`` when one of them names bitsandbytes."""
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    weights = {}
    for key in sd:
        if not key.endswith(".weight"):
            weights[key] = sd[key]
            continue
        stats = {k[len(key) + 1:]: v for k, v in sd.items() if k.startswith(key + ".")}
        if any("bitsandbytes" in k for k in stats):
            weights[key] = bnb.nn.Params4bit.from_prequantized(data=sd[key], quantized_stats=stats,
                                                                requires_grad=False, device="cpu")
        else:
            weights[key] = sd[key]
    return {"sd": sd, "weights": weights}


def test_v2_file_reads_back_in_bitsandbytes_exactly(converted):
    path, source = converted
    loaded = _forge_style_load(path)
    sd, weights = loaded["sd"], loaded["weights"]
    reader = SafetensorsReader(path)
    lazy = {name: reader.read(name) for name in reader.entries}
    reader.close()
    assert nf4.quantized_weight_keys(list(sd)) and all(k.startswith(FORGE_PREFIX) for k in sd)
    n_quantized = 0
    for name, value in source.items():
        key = FORGE_PREFIX + name
        should_quantize = is_quantized_by_recipe(name, tuple(value.shape))
        assert isinstance(weights[key], bnb.nn.Params4bit) == should_quantize, name
        if should_quantize:
            n_quantized += 1
            assert set(k for k in sd if k.startswith(key + ".")) == {
                f"{key}.absmax", f"{key}.quant_map", f"{key}.quant_state.bitsandbytes__nf4"}
            weight = weights[key]
            assert weight.quant_state.blocksize == 64 and not weight.quant_state.nested
            assert tuple(weight.quant_state.shape) == tuple(value.shape)
            # Forge's functional_dequantize_4bit
            reference = bnbf.dequantize_4bit(weight, quant_state=weight.quant_state, blocksize=64, quant_type="nf4")
            assert torch.equal(nf4.dequantize_state(lazy, key), reference), name
            # and it is bitsandbytes' own quantization of the source
            packed, state = bnbf.quantize_4bit(value, blocksize=64, quant_type="nf4")
            assert torch.equal(sd[key], packed) and torch.equal(sd[key + ".absmax"], state.absmax), name
        else:
            expected = value.float() if value.dim() <= 1 else value.to(torch.bfloat16)
            assert sd[key].dtype == expected.dtype and torch.equal(sd[key], expected), name
    assert n_quantized > 0
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["fluxq.recipe"] == "default" and metadata["fluxq.source"] == "flux.safetensors"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_v1_double_quantized_layout_from_bitsandbytes(tmp_path, dtype):
    """Layout of the published flux1-dev-bnb-nf4 (v1): absmax stored as 8-bit codes + nested_absmax/quant_map."""
    gen = torch.Generator().manual_seed(7)
    weights = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.randn(768, 256, generator=gen),
               "model.diffusion_model.single_blocks.0.linear2.weight": torch.randn(256, 1280, generator=gen) * 3}
    sd, references = {}, {}
    for key, value in weights.items():
        packed, state = bnbf.quantize_4bit(value.to(dtype), blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
        assert state.nested
        sd[key] = packed
        sd.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
        references[key] = bnbf.dequantize_4bit(packed, state)
    path = tmp_path / "v1.safetensors"
    save_file(sd, str(path))
    with SafetensorsReader(path) as reader:
        stored = {name: reader.read(name) for name in reader.entries}
    assert stored[f"{key}.absmax"].dtype == torch.uint8 and f"{key}.nested_quant_map" in stored
    assert sorted(nf4.quantized_weight_keys(list(stored))) == sorted(weights)
    for key, reference in references.items():
        ours = nf4.dequantize_state(stored, key)
        assert ours.dtype == reference.dtype == dtype
        assert torch.equal(ours, reference), key


def test_damaged_quant_state_is_a_format_error():
    ours = nf4.quantize_nf4(torch.randn(64, 64)).state_dict("w")
    missing = {k: v for k, v in ours.items() if k != "w.absmax"}
    with pytest.raises(FormatError, match="missing.*w.absmax"):
        nf4.dequantize_state(missing, "w", path="x.safetensors")
    wrong_shape = dict(ours)
    wrong_shape["w.quant_state.bitsandbytes__nf4"] = nf4.pack_quant_state(
        {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 128]})
    with pytest.raises(FormatError, match="do not match shape"):
        nf4.dequantize_state(wrong_shape, "w", path="x.safetensors")
    garbage = dict(ours)
    garbage["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(FormatError, match="unreadable"):
        nf4.dequantize_state(garbage, "w", path="x.safetensors")
    with pytest.raises(FormatError, match="no bitsandbytes quant state"):
        nf4.dequantize_state({"w": ours["w"]}, "w", path="x.safetensors")
    assert json.loads(bytes(ours["w.quant_state.bitsandbytes__nf4"].tolist()))["blocksize"] == 64
