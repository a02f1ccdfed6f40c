"""Property tests: whatever bytes a header holds, the parsers either succeed or raise FormatError — nothing else.

Seeds are valid files written by gguf-py's GGUFWriter and safetensors; hypothesis mutates them (byte flips,
truncations, inserted garbage, patched length/count fields) and also feeds random bytes. ~10k cases in total.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lib_fluxq.errors import FormatError
from lib_fluxq.formats.gguf_header import read_gguf_header
from lib_fluxq.formats.safetensors_header import read_safetensors_header

Q = gguf.GGMLQuantizationType
_DIR = Path(tempfile.mkdtemp(prefix="fluxq-fuzz-"))


def _gguf_seed() -> bytes:
    path = _DIR / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_string("general.name", "seed")
    writer.add_uint32("general.alignment", 32)
    writer.add_array("tokens", ["a", "bc", "def"])
    writer.add_array("ints", [1, 2, 3])
    writer.add_float32("f", 1.5)
    writer.add_bool("b", True)
    writer.add_tensor("double_blocks.0.img_attn.norm.key_norm.scale", np.ones(128, np.float32))
    writer.add_tensor("w.weight", np.zeros((4, 34), np.uint8), raw_dtype=Q.Q8_0)
    writer.add_tensor("h.weight", np.zeros((2, 32), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _safetensors_seed() -> bytes:
    return save({"a": torch.ones(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16),
                 "c": torch.zeros(5, dtype=torch.float8_e4m3fn)}, metadata={"format": "pt"})


GGUF_SEED = _gguf_seed()
ST_SEED = _safetensors_seed()
def cases(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _parse(reader, data: bytes) -> None:
    path = _DIR / "case.bin"
    path.write_bytes(data)
    try:
        header = reader(path)
    except FormatError as exc:
        assert exc.path == str(path) and exc.reason
        return
    # a header that parses must describe data inside the file
    tensors = header.tensors if isinstance(header.tensors, list) else list(header.tensors.values())
    for tensor in tensors:
        assert tensor.offset >= 0 and tensor.offset + tensor.n_bytes <= len(data)
    assert header.bytes_read <= len(data)


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "u64", "u32"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:  # overwrite a length/count-sized field with an extreme or random value
            fmt, size = ("<Q", 8) if op == "u64" else ("<I", 4)
            value = draw(st.one_of(st.sampled_from([0, 1, 2 ** (8 * size) - 1, 2 ** (8 * size - 1), len(data)]),
                                   st.integers(0, 2 ** (8 * size) - 1)))
            data[at:at + size] = struct.pack(fmt, value)
    return bytes(data)


@cases(3500)
@given(mutated(GGUF_SEED))
def test_gguf_mutations(data: bytes) -> None:
    _parse(read_gguf_header, data)


@cases(3500)
@given(mutated(ST_SEED))
def test_safetensors_mutations(data: bytes) -> None:
    _parse(read_safetensors_header, data)


@cases(1000)
@given(st.binary(max_size=256), st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1))
def test_gguf_random(tail: bytes, n_tensors: int, n_kv: int) -> None:
    _parse(read_gguf_header, b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + tail)


@cases(1000)
@given(st.integers(0, 2 ** 64 - 1), st.binary(max_size=256))
def test_safetensors_random(length: int, tail: bytes) -> None:
    _parse(read_safetensors_header, struct.pack("<Q", length) + tail)


@cases(1000)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                      max_size=4), max_leaves=12))
def test_safetensors_random_json(document) -> None:
    import json
    body = json.dumps({"t": document} if not isinstance(document, dict) else document).encode()
    _parse(read_safetensors_header, struct.pack("<Q", len(body)) + body + b"\0" * 64)


@pytest.mark.parametrize("body", [
    b"[" * 100_000,                              # unclosed: json's recursion gives out before the syntax error
    b"[" * 100_000 + b"]" * 100_000,             # valid JSON, but nested past Python's recursion limit
    b"{" + b'"a":{' * 50_000 + b"}" * 50_001,    # the same through objects
], ids=["unclosed", "closed-lists", "closed-objects"])
def test_deeply_nested_json_is_a_format_error(body: bytes) -> None:
    """Must be a FormatError naming the file and saying the JSON itself is the problem. Parsing successfully fails
    the test even where a later check happens to reject the result (a list is not a header, tensor "a" has no dtype):
    the reason must be the nesting, not the shape. So does raising RecursionError."""
    path = _DIR / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(FormatError) as caught:
        read_safetensors_header(path)
    assert caught.value.path == str(path)
    assert "not valid JSON" in caught.value.reason and "nested" in caught.value.reason, caught.value.reason
