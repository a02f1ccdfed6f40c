"""Dequantization of every type against ggml's C ``to_float`` and gguf-py, bit for bit."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from lib_fluxq.errors import UnsupportedTypeError
from lib_fluxq.quant import FORMATS, dequantize, get_format
from tests import ggml_ref

ALL_TYPES = list(FORMATS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ggml_pack(values: np.ndarray, qtype: T) -> np.ndarray:
    """Quantize with ggml (the oracle), never with our own quantizer."""
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
    return ggml_ref.quantize(values, qtype)


def _assert_same_bits(ours: torch.Tensor, reference: np.ndarray, what: str, nan_payloads: bool = True) -> None:
    ours_bits = ours.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint32)
    ref_bits = np.ascontiguousarray(reference, dtype=np.float32).reshape(-1).view(np.uint32)
    differs = ours_bits != ref_bits
    if not nan_payloads:  # NaN where ggml has NaN, whatever its payload
        differs &= ~(np.isnan(ours_bits.view(np.float32)) & np.isnan(ref_bits.view(np.float32)))
    mismatch = np.flatnonzero(differs)
    assert mismatch.size == 0, (f"{what}: {mismatch.size} of {ref_bits.size} values differ, first at {mismatch[0]}: "
                                f"ours {ours_bits[mismatch[0]]:#x} ref {ref_bits[mismatch[0]]:#x}")


def _inputs(kind: str, rows: int, row: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal((rows, row)).astype(np.float32)
    if kind == "scaled":  # per-row scales spanning 12 orders of magnitude
        return (rng.standard_normal((rows, row)) * 10.0 ** rng.uniform(-6, 6, (rows, 1))).astype(np.float32)
    if kind == "zero":  # zero scale in every block
        return np.zeros((rows, row), np.float32)
    if kind == "huge":  # fp16 scales overflow to inf: inf/nan handling must match too
        return (rng.standard_normal((rows, row)) * 1e30).astype(np.float32)
    if kind == "tiny":  # scales underflow to fp16 subnormals / zero
        return (rng.standard_normal((rows, row)) * 1e-30).astype(np.float32)
    if kind == "mixed_blocks":  # some blocks zero, some huge, some normal
        x = rng.standard_normal((rows, row)).astype(np.float32)
        x[:, : row // 4] = 0.0
        x[:, row // 4: row // 2] *= 1e4
        return x
    raise AssertionError(kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["normal", "scaled", "zero", "huge", "tiny", "mixed_blocks"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_ggml_to_float(qtype: T, kind: str, device: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{qtype.name}/{kind}".encode()))
    rows, row = 13, 768  # 13 rows: not a multiple of anything convenient; 768 = 3 super-blocks
    packed = _ggml_pack(_inputs(kind, rows, row, rng), qtype)
    reference = ggml_ref.dequantize(packed, qtype, rows * row)
    ours = dequantize(torch.from_numpy(packed.copy()).to(device), qtype, (rows, row))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (rows, row) and ours.device.type == device
    _assert_same_bits(ours, reference, f"{qtype.name}/{kind}")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_bytes_match_ggml(qtype: T) -> None:
    """Arbitrary bytes (any scale bit pattern, NaN/inf included) decode exactly as ggml decodes them.

    Only NaN payloads are exempt: when a NaN scale meets another NaN, x86 keeps the first operand's payload and
    torch's add/sub run as fmadd(b, alpha, a), so the surviving payload can differ. Quantizers never write NaN
    scales (finite inputs give finite scales), so this only concerns corrupt bytes, which must still give NaN.
    """
    fmt = get_format(qtype)
    rng = np.random.default_rng(int(qtype))
    n_blocks = 257
    packed = rng.integers(0, 256, size=n_blocks * fmt.type_size, dtype=np.uint8)
    n = n_blocks * fmt.block_size
    reference = ggml_ref.dequantize(packed, qtype, n)
    ours = dequantize(torch.from_numpy(packed.copy()), qtype, (n,))
    _assert_same_bits(ours, reference, f"{qtype.name}/random-bytes", nan_payloads=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py warns on inf*0 in "huge" blocks
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_gguf_py(qtype: T) -> None:
    rng = np.random.default_rng(7)
    x = _inputs("scaled", 5, 512, rng)
    packed = _ggml_pack(x, qtype)
    reference = gguf_quants.dequantize(packed, qtype).astype(np.float32)
    ours = dequantize(torch.from_numpy(packed.copy()), qtype, x.shape)
    _assert_same_bits(ours, reference, f"{qtype.name} vs gguf-py")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_half_outputs_are_the_fp32_result_cast(qtype: T, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    x = _inputs("scaled", 3, 1024, rng)
    packed = torch.from_numpy(_ggml_pack(x, qtype).copy())
    fp32 = torch.from_numpy(ggml_ref.dequantize(packed.numpy(), qtype, x.size)).view(x.shape)
    half = dequantize(packed, qtype, x.shape, dtype)
    assert half.dtype == dtype
    assert torch.equal(half.view(torch.int16), fp32.to(dtype).view(torch.int16))
    buffer = torch.empty(x.shape, dtype=dtype)
    assert dequantize(packed, qtype, x.shape, dtype, out=buffer).data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer.view(torch.int16), fp32.to(dtype).view(torch.int16))


def test_three_dimensional_shape_and_out_buffer() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2 * 3, 256)).astype(np.float32)
    packed = torch.from_numpy(ggml_ref.quantize(x, T.Q4_K).copy())
    out = torch.empty(2, 3, 256)
    result = dequantize(packed, "q4_k", (2, 3, 256), out=out)
    assert result.data_ptr() == out.data_ptr()
    _assert_same_bits(out, ggml_ref.dequantize(packed.numpy(), T.Q4_K, x.size), "Q4_K 3-D")


def test_type_names_and_ids_are_accepted() -> None:
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    packed = torch.from_numpy(ggml_ref.quantize(x, T.Q8_0).copy())
    by_enum = dequantize(packed, T.Q8_0, (1, 32))
    assert torch.equal(by_enum, dequantize(packed, "Q8_0", (1, 32)))
    assert torch.equal(by_enum, dequantize(packed, int(T.Q8_0), (1, 32)))


def test_bad_arguments_are_clear_errors() -> None:
    packed = torch.zeros(34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 68 packed bytes"):
        dequantize(packed, T.Q8_0, (1, 64))
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        dequantize(packed, T.Q8_0, (2, 17))
    with pytest.raises(UnsupportedTypeError, match="unknown quantization type 'Q9_X'"):
        dequantize(packed, "Q9_X", (1, 32))
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS is not supported"):
        dequantize(packed, T.IQ2_XXS, (1, 256))


def test_scratch_is_reused_across_types_shapes_and_dtypes_without_corrupting_results() -> None:
    """The kernels' per-thread scratch (byte planes, indices, float32 accumulator) is shared by every call: mixing
    types, shapes and output dtypes in any order must still give ggml's values, and once warm nothing grows."""
    from lib_fluxq.quant import dequant as kernels

    rng = np.random.default_rng(11)
    cases = []
    for qtype, rows, row in ((T.Q4_K, 40, 1024), (T.Q8_0, 7, 512), (T.IQ4_XS, 3, 256), (T.Q5_1, 64, 768),
                             (T.Q6_K, 5, 2048), (T.Q3_K, 9, 256)):
        packed = ggml_ref.quantize(_inputs("scaled", rows, row, rng), qtype)
        cases.append((qtype, (rows, row), torch.from_numpy(packed.copy()),
                      torch.from_numpy(ggml_ref.dequantize(packed.reshape(-1), qtype, rows * row))))
    order = [(case, dtype) for dtype in (torch.bfloat16, torch.float32, torch.float16) for case in cases]
    for round_ in range(2):
        sizes = {key: buffer.numel() for key, buffer in kernels._scratch.buffers.items()}
        for (qtype, shape, packed, reference), dtype in order[::1 if round_ == 0 else -1]:
            got = dequantize(packed, qtype, shape, dtype)
            expected = reference.view(shape).to(dtype)
            assert torch.equal(got.isnan(), expected.isnan())
            finite = ~expected.isnan()
            assert torch.equal(got[finite], expected[finite]), (qtype.name, dtype)
        if round_ == 1:   # the second round (reverse order) needed no new or larger buffer
            assert {key: buffer.numel() for key, buffer in kernels._scratch.buffers.items()} == sizes


def test_threads_have_their_own_scratch() -> None:
    import threading

    rng = np.random.default_rng(12)
    packed = {q: ggml_ref.quantize(_inputs("normal", 32, 1024, rng), q) for q in (T.Q4_K, T.Q6_K)}
    reference = {q: ggml_ref.dequantize(p.reshape(-1), q, 32 * 1024) for q, p in packed.items()}
    failures: list[str] = []

    def work(qtype: T) -> None:
        data = torch.from_numpy(packed[qtype].copy())
        for _ in range(20):
            got = dequantize(data, qtype, (32, 1024)).numpy().reshape(-1)
            if not np.array_equal(got.view(np.uint32), reference[qtype].view(np.uint32)):
                failures.append(qtype.name)
                return

    threads = [threading.Thread(target=work, args=(q,)) for q in (T.Q4_K, T.Q6_K, T.Q4_K, T.Q6_K)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
