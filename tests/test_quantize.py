"""Our torch quantizers against ggml's own ``ggml_quantize_chunk`` (tests/ggml_ref.py), byte for byte.

Every input family that reaches a different code path in ggml-quants.c is covered: ordinary and heavy-tailed
weights (the searches), all-zero and constant blocks (the early exits and -0.0 scales), and tiny / huge / mixed
magnitudes (fp16 scales that underflow to 0 or overflow to inf, NaN sums that make every search step lose).
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lib_fluxq.quant import get_format, quantize
from tests import ggml_ref

T = GGMLQuantizationType
QTYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q6_K, T.Q5_K, T.Q4_K, T.Q3_K, T.Q2_K, T.IQ4_NL, T.IQ4_XS]

ROW = 1024  # a multiple of every block size (K-quants: 256)


def _rows(kind: str, seed: int, rows: int = 6, row: int = ROW) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        data = rng.standard_normal((rows, row))
    elif kind == "heavy":
        data = rng.standard_t(df=2, size=(rows, row))
        flat = data.reshape(-1)
        picks = rng.choice(flat.size, size=8, replace=False)
        flat[picks] = 50.0 * rng.choice([-1.0, 1.0], size=8)  # 50-sigma outliers, both signs
    elif kind == "zeros":
        data = np.zeros((rows, row))
    elif kind == "constant":
        data = np.repeat(rng.standard_normal((rows, 1)), row, axis=1)  # +, - and row-wide constants
        data[0] = 0.75
        data[1] = -3.0
    elif kind == "tiny":
        data = 1e-30 * rng.standard_normal((rows, row))
    elif kind == "huge":
        data = 1e30 * rng.standard_normal((rows, row))
    elif kind == "mixed":
        # tiny and huge values side by side in the same blocks, plus some exact zeros
        data = rng.standard_normal((rows, row)) * rng.choice([1e-30, 1e30, 1.0, 0.0], size=(rows, row))
    elif kind == "sparse":
        # mostly-zero blocks with a single non-zero: sub-blocks that are all zero inside a non-zero super-block
        data = np.zeros((rows, row))
        cols = rng.integers(0, row, size=rows * 3)
        data[np.repeat(np.arange(rows), 3), cols] = rng.standard_normal(rows * 3)
    else:
        raise ValueError(kind)
    return data.astype(np.float32)


KINDS = ["normal", "heavy", "zeros", "constant", "tiny", "huge", "mixed", "sparse"]


def _ours(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    return quantize(torch.from_numpy(rows), qtype).numpy()


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_identical_to_ggml(qtype: GGMLQuantizationType, kind: str) -> None:
    rows = _rows(kind, seed=zlib.crc32(f"{kind}/{qtype.name}".encode()))
    expected = ggml_ref.quantize(rows, qtype)
    ours = _ours(rows, qtype)
    assert ours.shape == expected.shape == (rows.shape[0], ggml_ref.row_size(qtype, rows.shape[1]))
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    differing = np.flatnonzero((ours.reshape(-1, block_bytes) != expected.reshape(-1, block_bytes)).any(axis=1))
    assert differing.size == 0, f"{qtype.name}/{kind}: {differing.size} blocks differ, first {differing[:5]}"


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_many_seeds_normal(qtype: GGMLQuantizationType) -> None:
    """More blocks of ordinary weights, where searches hit near-ties most often."""
    for seed in range(3):
        rows = _rows("normal", seed=1000 + seed, rows=16, row=2048) * np.float32(0.02)
        np.testing.assert_array_equal(_ours(rows, qtype), ggml_ref.quantize(rows, qtype))


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_block_kernel_and_public_entry_agree_on_shape(qtype: GGMLQuantizationType) -> None:
    """The table's block kernel and the public ``quantize`` on a 3-D tensor give the same rows as ggml."""
    fmt = get_format(qtype)
    rows = _rows("normal", seed=7, rows=4, row=512)
    blocks = torch.from_numpy(rows).reshape(-1, fmt.block_size)
    packed = fmt.quantize_blocks(blocks)
    assert packed.shape == (blocks.shape[0], fmt.type_size) and packed.dtype == torch.uint8
    expected = ggml_ref.quantize(rows, qtype)
    np.testing.assert_array_equal(packed.reshape(rows.shape[0], -1).numpy(), expected)
    three_d = quantize(torch.from_numpy(rows).reshape(2, 2, 512), qtype)
    np.testing.assert_array_equal(three_d.numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_cuda_identical_to_ggml(qtype: GGMLQuantizationType) -> None:
    for kind in ("normal", "heavy", "mixed"):
        rows = _rows(kind, seed=3)
        ours = quantize(torch.from_numpy(rows).cuda(), qtype).cpu().numpy()
        np.testing.assert_array_equal(ours, ggml_ref.quantize(rows, qtype), err_msg=f"{qtype.name}/{kind}")


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_1, T.Q4_K, T.Q3_K, T.IQ4_XS], ids=lambda t: t.name)
def test_chunked_input_identical_to_ggml(qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs larger than one kernel chunk are split into chunks (rows of blocks) and joined back in order."""
    kernels = sys.modules["lib_fluxq.quant.quantize"]
    monkeypatch.setattr(kernels, "_CHUNK_ELEMENTS", 1024)
    rows = _rows("heavy", seed=11, rows=5, row=1536)  # 7680 elements: 8 chunks, the last one partial
    np.testing.assert_array_equal(_ours(rows, qtype), ggml_ref.quantize(rows, qtype))
