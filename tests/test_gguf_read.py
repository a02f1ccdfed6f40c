"""Memory-mapped GGUF reading: agrees with gguf-py and ggml, reads no tensor data at open, rejects bad files clearly."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lib_fluxq.errors import FormatError
from lib_fluxq.formats.gguf import open_gguf
from tests import ggml_ref
from tests.fixtures import random_flux_state_dict, recipe_qtype, write_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q5_1, T.IQ4_XS], ids=lambda t: t.name)
def test_flux_file_matches_gguf_py_and_ggml(tmp_path: Path, qtype: T) -> None:
    sd = random_flux_state_dict(prefix="model.diffusion_model.")
    path = tmp_path / "flux.gguf"
    packed = write_gguf(path, sd, recipe_qtype(qtype))
    reference = gguf.GGUFReader(str(path))
    with open_gguf(path) as f:
        assert f.architecture == "flux"
        assert f.metadata["general.architecture"] == "flux"
        assert len(f) == len(reference.tensors) == len(sd)
        for ref_tensor in reference.tensors:
            ours = f[ref_tensor.name]
            assert ours.qtype == ref_tensor.tensor_type
            assert ours.shape == tuple(int(s) for s in reversed(ref_tensor.shape)) == tuple(sd[ours.name].shape)
            assert ours.data.dtype == torch.uint8
            assert np.array_equal(ours.data.numpy(), np.asarray(packed[ours.name]).reshape(-1).view(np.uint8))
            expected = ggml_ref.dequantize(packed[ours.name].reshape(-1).view(np.uint8), ours.qtype, ours.n_elements)
            assert np.array_equal(ours.dequantize().numpy().reshape(-1).view(np.uint32), expected.view(np.uint32))
        quantized = [t for t in f if t.is_quantized]
        assert len(quantized) == 10 * 2 + 3 * 2  # the recipe's block weights of SMALL_FLUX


def test_tensor_data_is_a_view_of_the_file(tmp_path: Path) -> None:
    sd = random_flux_state_dict()
    path = tmp_path / "flux.gguf"
    write_gguf(path, sd, recipe_qtype(T.Q4_0))
    with open_gguf(path) as f:
        tensor = f["single_blocks.0.linear1.weight"]
        # a view: no storage of its own beyond the mapped bytes, and writing to it never reaches the file
        assert tensor.data.untyped_storage().nbytes() == tensor.n_bytes
        before = path.read_bytes()
        tensor.data[:16] = 0
        assert path.read_bytes() == before


_RSS_PROBE = textwrap.dedent("""
    import json, sys, time, psutil
    sys.path.insert(0, sys.argv[2])
    from lib_fluxq.formats.gguf import open_gguf
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    f = open_gguf(sys.argv[1])
    open_s = time.perf_counter() - t0
    rss_open = proc.memory_info().rss
    used = f["blk.3.weight"].dequantize()
    rss_used = proc.memory_info().rss
    print(json.dumps({"open_s": open_s, "opened": rss_open - rss0, "used": rss_used - rss_open,
                      "tensor_bytes": f["blk.3.weight"].n_bytes, "n": len(f)}))
""")


def test_large_file_opens_fast_without_reading_tensor_data(tmp_path: Path) -> None:
    """A ~320 MB GGUF: opening adds < 5% of the file to RSS; touching one tensor adds about that tensor."""
    path = tmp_path / "big.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    rng = np.random.default_rng(0)
    block = ggml_ref.quantize(rng.standard_normal((64, 4096)).astype(np.float32), T.Q8_0)
    for i in range(18):  # 18 tensors x 17.8 MB of Q8_0, distinct bytes so nothing is shared or sparse
        data = np.tile(block, (64, 1))
        data[:, 0] = i
        writer.add_tensor(f"blk.{i}.weight", data, raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = path.stat().st_size
    assert size > 300e6
    result = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(path), str(REPO)], capture_output=True, text=True,
                            check=True)
    stats = json.loads(result.stdout)
    print(f"open {stats['open_s'] * 1e3:.1f} ms, RSS +{stats['opened'] / 1e6:.1f} MB for a {size / 1e6:.0f} MB file")
    assert stats["n"] == 18
    assert stats["opened"] < 0.05 * size
    # the measurement can see a read: dequantizing one tensor pages in its bytes (and allocates its fp32 output)
    assert stats["used"] > stats["tensor_bytes"]
    assert stats["open_s"] < 1.0  # the bound ("well under a second"); typical here is tens of ms


# --- bad files ----------------------------------------------------------------------------------------------------

def _single_tensor_file(path: Path, qtype: T = T.Q8_0, rows: int = 4, row: int = 256) -> Path:
    writer = gguf.GGUFWriter(str(path), arch="flux")
    data = ggml_ref.quantize(np.ones((rows, row), np.float32), qtype) if qtype != T.F32 else np.ones((rows, row),
                                                                                                       np.float32)
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", data, raw_dtype=qtype)
    writer.add_tensor("double_blocks.0.img_attn.qkv.bias", np.zeros(rows, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensor_info_offset(raw: bytes, name: str) -> int:
    """Byte offset just after the tensor name in the tensor-info table."""
    encoded = name.encode()
    at = raw.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def test_missing_and_empty_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="file not found"):
        open_gguf(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="is empty") as info:
        open_gguf(tmp_path / "empty.gguf")
    assert info.value.path.endswith("empty.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FormatError, match="is a folder"):
        open_gguf(tmp_path / "dir.gguf")


def test_wrong_magic(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "x.gguf")
    raw = bytearray(path.read_bytes())
    raw[:4] = b"GGML"
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="not a GGUF file") as info:
        open_gguf(path)
    assert str(path) in str(info.value)


def test_truncated_in_tensor_data_names_the_tensor(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "cut.gguf")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 600])  # cuts into the weight's data (the bias is 16 bytes, after it)
    with pytest.raises(FormatError) as info:
        open_gguf(path)
    assert info.value.path == str(path)
    assert info.value.tensor in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.qkv.bias")
    assert "truncated" in str(info.value) or "past the end" in str(info.value)


def test_truncated_in_header(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(FormatError) as info:
        open_gguf(path)
    assert info.value.path == str(path)


def test_unknown_type_id_names_the_tensor(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "type.gguf")
    raw = bytearray(path.read_bytes())
    at = _tensor_info_offset(bytes(raw), "double_blocks.0.img_attn.qkv.weight")
    n_dims = struct.unpack_from("<I", raw, at)[0]
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, 99)  # no GGML type has id 99
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as info:
        open_gguf(path)
    assert info.value.path == str(path)
    assert "99" in str(info.value)


def test_unsupported_type_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "iq2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    size = gguf.GGML_QUANT_SIZES[T.IQ2_XXS][1]
    writer.add_tensor("single_blocks.0.linear1.weight", np.zeros((2, size), np.uint8), raw_dtype=T.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match="IQ2_XXS is not supported") as info:
        open_gguf(path)
    assert info.value.tensor == "single_blocks.0.linear1.weight"
    assert "convert" in str(info.value)


def test_byte_count_not_matching_shape_names_the_tensor(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "shape.gguf")
    raw = bytearray(path.read_bytes())
    at = _tensor_info_offset(bytes(raw), "double_blocks.0.img_attn.qkv.weight")
    # ne[1] (rows) 4 -> 4000: the shape now claims far more bytes than the file holds for this tensor
    struct.pack_into("<Q", raw, at + 4 + 8, 4000)
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as info:
        open_gguf(path)
    assert info.value.path == str(path)
    assert info.value.tensor == "double_blocks.0.img_attn.qkv.weight"


def test_row_not_multiple_of_block(tmp_path: Path) -> None:
    path = _single_tensor_file(tmp_path / "row.gguf")
    raw = bytearray(path.read_bytes())
    at = _tensor_info_offset(bytes(raw), "double_blocks.0.img_attn.qkv.weight")
    struct.pack_into("<Q", raw, at + 4, 250)   # ne[0] 256 -> 250: not a multiple of Q8_0's 32
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as info:
        open_gguf(path)
    assert info.value.tensor == "double_blocks.0.img_attn.qkv.weight"
