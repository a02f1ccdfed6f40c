"""fluxq's GGUF forward path inside Forge (stand-in): no bake copy, exact weights, a shared buffer inside forwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib_fluxq.host import forge as hook
from lib_fluxq.host import forge_gguf
from tests import forge_standin as standin
from tests import ggml_ref

T = gguf.GGMLQuantizationType
ROWS, COLS = 64, 512
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS]


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[dict[str, Any]]:
    m = standin.install(tmp_path / "models")
    try:
        yield m
    finally:
        hook.uninstall()
        standin.remove()


def _file(path: Path, qtype: T, seed: int = 0) -> np.ndarray:
    values = (np.random.default_rng(seed).standard_normal((ROWS, COLS)) / COLS**0.5).astype(np.float32)
    packed = ggml_ref.quantize(values, qtype)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor("layer.weight", packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ggml_ref.dequantize(packed.reshape(-1), qtype, ROWS * COLS).reshape(ROWS, COLS)


def _load(forge: dict[str, Any], path: Path, dtype: torch.dtype) -> Any:
    param = forge["backend.utils"].load_torch_file(str(path))["layer.weight"].to(device="cpu")
    param.computation_dtype = dtype
    return param


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_bake_keeps_the_mapped_bytes_and_forward_is_exact(forge: dict[str, Any], tmp_path: Path, qtype: T) -> None:
    reference = _file(tmp_path / "w.gguf", qtype)
    hook.register_callbacks()
    param = _load(forge, tmp_path / "w.gguf", torch.bfloat16)
    before = param.data.data_ptr()
    param.gguf_cls.bake(param)           # what Forge does at the first move to the compute device
    assert issubclass(param.gguf_cls, forge_gguf.FluxqQuant)
    assert param.data.data_ptr() == before, "the bake copied the weight"
    layer = forge["backend.operations"].ForgeOperationsGGUF.Linear(param)
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        got = layer(x)
    expected = F.linear(x, torch.from_numpy(reference).bfloat16())
    assert torch.equal(got, expected)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K], ids=lambda q: q.name)
def test_setting_off_gives_forge_its_own_bake(forge: dict[str, Any], tmp_path: Path, qtype: T) -> None:
    """With "dequantize every GGUF type with fluxq" off, the parameter goes to Forge's class at bake, which rewrites
    the bytes (a copy) into its own layout, and Forge's half-precision dequantizer serves it."""
    reference = _file(tmp_path / "w.gguf", qtype)
    forge["modules.shared"].opts.data[forge_gguf.FORWARD_SETTING] = False
    hook.register_callbacks()
    param = _load(forge, tmp_path / "w.gguf", torch.float16)
    before = param.data.data_ptr()
    forge["backend.operations_gguf"].dequantize_tensor(param)   # unbaked: baked on first use, then Forge's
    assert param.gguf_cls is forge["backend.operations_gguf"].quants_mapping[qtype].host_cls
    assert param.data.data_ptr() != before
    got = forge["backend.operations_gguf"].dequantize_tensor(param).float().numpy()
    assert np.abs(got - reference).max() <= np.abs(reference).max() * 2.0 ** -9


def test_forward_scope_shares_one_buffer_and_nothing_else_does(forge: dict[str, Any], tmp_path: Path) -> None:
    _file(tmp_path / "a.gguf", T.Q4_K, seed=1)
    _file(tmp_path / "b.gguf", T.Q4_K, seed=2)
    hook.register_callbacks()
    a, b = (_load(forge, tmp_path / f"{name}.gguf", torch.bfloat16) for name in "ab")
    dequantize = forge["backend.operations_gguf"].dequantize_tensor

    @forge_gguf.forward_scope
    def both(_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        first = dequantize(a)
        pointer, values = first.data_ptr(), first.clone()
        second = dequantize(b)
        return pointer, values, second

    with torch.no_grad():
        pointer, first, second = both(None)
    assert second.data_ptr() == pointer                     # one buffer, reused by the next layer
    assert not torch.equal(first, second)
    assert torch.equal(first, dequantize(a)) and torch.equal(second, dequantize(b))
    with torch.no_grad():
        kept = dequantize(a), dequantize(a)
        assert kept[0].data_ptr() != kept[1].data_ptr()            # outside a forward: fresh tensors
    with torch.enable_grad():                                      # autograd may keep the weight: no sharing
        kept = forge_gguf.forward_scope(lambda _: (dequantize(a), dequantize(b)))(None)
        assert kept[0].data_ptr() != kept[1].data_ptr()


def test_forge_layers_are_scoped_and_uninstall_restores(forge: dict[str, Any]) -> None:
    linear = forge["backend.operations"].ForgeOperationsGGUF.Linear
    original = linear.__dict__["forward"]
    mapping = dict(forge["backend.operations_gguf"].quants_mapping)
    hook.register_callbacks()
    assert getattr(linear.__dict__["forward"], hook.MARK) is original
    served = forge["backend.operations_gguf"].quants_mapping
    assert all(issubclass(c, forge_gguf.FluxqQuant) for k, c in served.items() if k != T.BF16)
    assert served[T.BF16] is mapping[T.BF16]              # Forge's BF16 is a bit shift already: left alone
    assert {T.IQ4_NL, T.IQ4_XS} <= set(served)
    hook.uninstall()
    assert linear.__dict__["forward"] is original
    assert forge["backend.operations_gguf"].quants_mapping == mapping


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.IQ4_NL], ids=lambda q: q.name)
def test_neo_parameters_take_the_same_path(tmp_path: Path, qtype: T) -> None:
    """Neo's ParameterGGUF (keyword constructor, no copy, QUANTS_MAPPING keyed by its own vendored gguf enum) gets
    fluxq's class from the table, keeps its mapped bytes at bake and is served exactly."""
    from tests import neo_standin

    reference = _file(tmp_path / "w.gguf", qtype)
    m = neo_standin.install(tmp_path / "models")
    try:
        hook.register_callbacks()
        state_dict = m["backend.utils"].load_torch_file(str(tmp_path / "w.gguf"))
        param = state_dict["layer.weight"]
        assert issubclass(param.gguf_cls, forge_gguf.FluxqQuant)
        param.computation_dtype = torch.float16
        before = param.data.data_ptr()
        param.gguf_cls.bake(param)
        assert param.data.data_ptr() == before
        got = m["backend.operations_gguf"].dequantize_tensor(param)
        assert torch.equal(got, torch.from_numpy(reference).half())
    finally:
        hook.uninstall()
        neo_standin.remove()
