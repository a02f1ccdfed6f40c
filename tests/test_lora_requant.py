"""LoRA merge + re-quantization for every GGUF type: host-free, and through Forge's LoRA path (stand-in)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq.host import forge as hook
from lib_fluxq.lora import can_requantize, merge_and_requantize, merge_lora
from lib_fluxq.quant import FORMATS, dequantize
from tests import forge_standin as standin
from tests import ggml_ref

T = gguf.GGMLQuantizationType
QUANTIZED = [q for q in FORMATS if q not in (T.F32, T.F16, T.BF16)]
ROWS, COLS, RANK = 32, 512, 4


def _need_quantizer(qtype: T) -> None:
    # every type has a quantizer: losing one is a regression to see, never a reason to skip
    assert can_requantize(qtype), f"lib_fluxq cannot re-quantize {qtype.name} (lib_fluxq/quant/quantize.py)"


def _case(qtype: T, seed: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((ROWS, COLS)) / COLS**0.5).astype(np.float32)
    packed = ggml_ref.quantize(weight, qtype)
    up = torch.from_numpy(rng.standard_normal((ROWS, RANK)).astype(np.float32)) * 0.2
    down = torch.from_numpy(rng.standard_normal((RANK, COLS)).astype(np.float32)) * 0.2
    return weight, packed, up, down


def _fresh_error(merged: np.ndarray, qtype: T) -> float:
    """Error of quantizing the merged weight once with ggml (the reference)."""
    fresh = ggml_ref.quantize(merged, qtype)
    return float(np.abs(ggml_ref.dequantize(fresh.reshape(-1), qtype, merged.size).reshape(merged.shape)
                        - merged).max())


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_merge_and_requantize_is_as_good_as_a_fresh_quantization(qtype: T) -> None:
    _need_quantizer(qtype)
    for seed in range(3):
        _, packed, up, down = _case(qtype, seed)
        base = ggml_ref.dequantize(packed.reshape(-1), qtype, ROWS * COLS).reshape(ROWS, COLS)
        merged = (torch.from_numpy(base) + 0.8 * (2.0 / RANK) * (up @ down)).numpy()
        ours = merge_and_requantize(torch.from_numpy(packed.reshape(-1)), qtype, (ROWS, COLS), up, down,
                                    alpha=2.0, strength=0.8)
        assert ours.dtype == torch.uint8 and ours.numel() == packed.size      # same type, same byte size
        read_back = dequantize(ours.reshape(-1), qtype, (ROWS, COLS)).numpy()
        error = float(np.abs(read_back - merged).max())
        assert error <= _fresh_error(merged, qtype) * (1 + 1e-6) + 1e-7, (qtype.name, seed)
        assert error < float(np.abs(merged - base).max())   # the LoRA is really in there


def test_merge_lora_matches_the_kohya_formula() -> None:
    rng = np.random.default_rng(1)
    w, up, down = (rng.standard_normal(s).astype(np.float32) for s in ((6, 8), (6, 2), (2, 8)))
    got = merge_lora(torch.from_numpy(w), torch.from_numpy(up), torch.from_numpy(down), alpha=1.0, strength=0.5)
    np.testing.assert_allclose(got.numpy(), w + 0.5 * (1.0 / 2) * (up.astype(np.float64) @ down), rtol=1e-5,
                               atol=1e-6)


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[dict[str, Any]]:
    m = standin.install(tmp_path / "models")
    try:
        yield m
    finally:
        hook.uninstall()
        standin.remove()


def _gguf_model(path: Path, qtype: T, forge: dict[str, Any],
                dtype: torch.dtype = torch.float16) -> tuple[torch.nn.Module, np.ndarray]:
    """One Linear whose weight is a Forge ParameterGGUF loaded from a real GGUF file of ``qtype``, given its
    computation dtype (Forge sets it at load, before the bake) and baked as Forge does at the first placement."""
    weight, packed, _, _ = _case(qtype, 7)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_tensor("layer.weight", packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    param = forge["backend.utils"].load_torch_file(str(path))["layer.weight"].to(device="cpu")
    param.computation_dtype = dtype
    param.gguf_cls.bake(param)
    model = torch.nn.Module()
    model.layer = torch.nn.Module()
    model.layer.weight = param
    return model, ggml_ref.dequantize(packed.reshape(-1), qtype, ROWS * COLS).reshape(ROWS, COLS)


def _forge_layout_slack(merged: np.ndarray) -> float:
    """What Forge's own dequantizer adds on top of the quantization error: it computes in fp16 (scales rounded to
    fp16 first, products and offsets rounded to fp16), a few fp16 half-ulps of the largest value."""
    return float(np.abs(merged).max()) * 2.0 ** -9


@pytest.mark.parametrize("forward", [True, False], ids=["fluxq_forward", "forge_forward"])
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_forge_lora_path_requantizes_every_type(forge: dict[str, Any], tmp_path: Path, qtype: T, forward: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """LoRA merge + re-quantization through Forge's refresh, for every type, with the weight in fluxq's layout
    (forward path on: bake keeps GGML bytes) and in Forge's (forward path off: Forge's bake rewrites Q4_0 / Q4_1 /
    Q8_0 / Q4_K, so re-quantizing Q4_1 / Q4_K must end with Forge's bake_inner or Forge reads garbage)."""
    _need_quantizer(qtype)
    forge_can = qtype in standin.FORGE_REQUANT_TYPES
    forge_knows = qtype in standin.FORGE_GGUF_TYPES
    _, _, up, down = _case(qtype, 7)
    delta = 0.5 * (up @ down)
    if forge_knows and not forge_can:
        model, _ = _gguf_model(tmp_path / "before.gguf", qtype, forge)
        with pytest.raises(NotImplementedError, match="Low bit LoRA"):       # Forge alone
            forge["backend.patcher.lora"].LoraLoader(model).refresh({"layer.weight": delta})
    forge["modules.shared"].opts.data["fluxq_gguf_forward"] = forward
    hook.register_callbacks()
    model, base = _gguf_model(tmp_path / "after.gguf", qtype, forge)
    weight = model.layer.weight
    forge_layout = forge_knows and not forward
    assert isinstance(weight.gguf_cls, type) and (weight.gguf_cls.__module__ == standin.__name__) == forge_layout
    original_bytes = weight.data.clone()
    capsys.readouterr()
    backup = forge["backend.patcher.lora"].LoraLoader(model).refresh({"layer.weight": delta})
    weight = model.layer.weight
    assert weight.data.dtype == torch.uint8 and weight.data.numel() == original_bytes.numel()
    assert torch.equal(backup["layer.weight"].data, original_bytes)       # the unpatched weight is kept for undo
    merged = base + delta.numpy()
    got = forge["backend.operations_gguf"].dequantize_tensor(weight).float().numpy()
    bound = _fresh_error(merged, qtype)
    if forge_can and forge_layout:   # Forge's own quantizer (its rounding), untouched by fluxq: a looser bound
        bound *= 1.5
    if forge_layout:
        bound += _forge_layout_slack(merged)
        error = float(np.abs(got - merged).max())
    else:                            # fluxq's layout: GGML bytes, served as ggml's values rounded once to fp16
        exact = ggml_ref.dequantize(weight.data.reshape(-1).numpy(), qtype, ROWS * COLS).reshape(ROWS, COLS)
        assert np.array_equal(got, exact.astype(np.float16).astype(np.float32))
        error = float(np.abs(exact - merged).max())
    assert error <= bound * (1 + 1e-6) + 1e-7, (error, bound)
    console = capsys.readouterr().out
    if forge_can and forge_layout:
        assert "re-quantized" not in console                               # Forge did it, not fluxq
    else:
        assert f"[fluxq] LoRA merged and re-quantized: 1 {qtype.name} layer in " in console, console
