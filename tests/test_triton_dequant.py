"""The Triton dequantization kernels (the fused CUDA path) against ggml's ``to_float``, bit for bit, on CPU through
Triton's interpreter (TRITON_INTERPRET=1). On a GPU, bench/gpu.py repeats the check on the compiled kernels."""

from __future__ import annotations

import importlib
import os
import sys
import zlib

import numpy as np
import pytest
import torch
import triton  # noqa: F401  pinned in requirements-test.txt (optional at runtime only): missing is an error
from gguf import GGMLQuantizationType as T

os.environ["TRITON_INTERPRET"] = "1"   # read when the kernels are decorated: set before (re)importing them
if "lib_fluxq.quant.triton_dequant" in sys.modules:
    importlib.reload(sys.modules["lib_fluxq.quant.triton_dequant"])
from lib_fluxq.quant import (  # noqa: E402
    dequantize,
    get_format,
    triton_dequant,  # noqa: E402
)
from tests import ggml_ref  # noqa: E402
from tests.test_dequant import _assert_same_bits, _inputs  # noqa: E402

TYPES = [T[name] for name in triton_dequant.SUPPORTED]


def _blocks(packed: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(packed.copy()).reshape(-1, get_format(qtype).type_size)


@pytest.mark.parametrize("kind", ["normal", "scaled", "zero", "huge", "tiny", "mixed_blocks"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_triton_kernel_matches_ggml_to_float(qtype: T, kind: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"triton/{qtype.name}/{kind}".encode()))
    rows, row = 5, 768
    packed = ggml_ref.quantize(_inputs(kind, rows, row, rng), qtype)
    fmt = get_format(qtype)
    out = torch.empty(rows * row // fmt.block_size, fmt.block_size)
    triton_dequant.dequantize_blocks(qtype.name, _blocks(packed, qtype), out)
    _assert_same_bits(out, ggml_ref.dequantize(packed.reshape(-1), qtype, rows * row), f"triton {qtype.name}/{kind}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_triton_kernel_on_random_bytes(qtype: T) -> None:
    """Arbitrary bytes (NaN / inf scales included) decode as ggml decodes them (NaN payloads aside)."""
    fmt = get_format(qtype)
    packed = np.random.default_rng(int(qtype) + 100).integers(0, 256, size=37 * fmt.type_size, dtype=np.uint8)
    out = torch.empty(37, fmt.block_size)
    triton_dequant.dequantize_blocks(qtype.name, _blocks(packed, qtype), out)
    reference = ggml_ref.dequantize(packed, qtype, 37 * fmt.block_size)
    _assert_same_bits(out, reference, f"triton {qtype.name}/random", nan_payloads=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_K, T.Q6_K, T.IQ4_XS], ids=lambda t: t.name)
def test_triton_half_outputs_equal_the_torch_path(qtype: T, dtype: torch.dtype) -> None:
    """Half outputs are ggml's float32 value rounded once, exactly what the torch kernels give (NaN where they give
    NaN, whatever its payload: CPUs and GPUs convert NaN payloads differently)."""
    rng = np.random.default_rng(9)
    packed = ggml_ref.quantize(_inputs("scaled", 4, 512, rng), qtype)
    fmt = get_format(qtype)
    out = torch.empty(4 * 512 // fmt.block_size, fmt.block_size, dtype=dtype)
    triton_dequant.dequantize_blocks(qtype.name, _blocks(packed, qtype), out)
    expected = dequantize(torch.from_numpy(packed.copy()), qtype, (4, 512), dtype)
    got = out.view(4, 512)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_choice_stays_with_torch_off_cuda_and_honours_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = torch.zeros(2, 34, dtype=torch.uint8)
    out = torch.empty(2, 32)
    assert not triton_dequant.choose("Q8_0", blocks, out, lambda b, o: None)       # CPU tensors: never
    monkeypatch.setenv("FLUXQ_DEQUANT", "triton")
    assert triton_dequant.choose("Q8_0", blocks, out, lambda b, o: None)
    assert not triton_dequant.choose("F16", blocks, out, lambda b, o: None)         # no kernel for it
    monkeypatch.setenv("FLUXQ_DEQUANT", "torch")
    assert not triton_dequant.choose("Q8_0", blocks, out, lambda b, o: None)
