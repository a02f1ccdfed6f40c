"""`convert`: safetensors/GGUF Flux -> GGUF of every type, checked with gguf-py's reader and ggml's own quantizer.

References: gguf-py GGUFReader (container, types, shapes, metadata), ggml_quantize_chunk / to_float via
tests/ggml_ref (packed bytes and dequantized values), diffusers' BFL->diffusers converter and FluxTransformer2DModel
(diffusers name mapping). Sources are built by tests/fixtures.py with safetensors' own writer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lib_fluxq import __version__
from lib_fluxq.__main__ import main as cli_main
from lib_fluxq.convert import (
    ConversionCancelled,
    ConvertError,
    convert_file,
    diffusers_to_bfl_names,
    parse_target,
)
from lib_fluxq.errors import FluxqError, FormatError, UnsupportedTypeError
from lib_fluxq.flux import FluxConfig, flux_param_shapes, is_quantized_by_recipe
from lib_fluxq.formats.gguf_write import StreamingGGUFWriter
from lib_fluxq.quant import FORMATS, dequantize
from tests import ggml_ref
from tests.fixtures import (
    SMALL_FLUX,
    diffusers_state_dict,
    random_flux_state_dict,
    recipe_qtype,
    write_gguf,
    write_safetensors,
)

T = gguf.GGMLQuantizationType
ALL_TYPES = list(FORMATS)
# Smallest Flux whose block rows fit every K-quant (multiples of 256): the slow reference quantizers stay quick.
COMPACT_FLUX = FluxConfig(hidden=256, heads=2, depth=1, depth_single=1, mlp_ratio=1, context_in=256, vec_in=256)
FLOATS = (T.F32, T.F16, T.BF16)
# llama.cpp's file-type vocabulary for uniform files (city96 names his uniform K-quant Flux files *_K_S)
EXPECTED_FILE_TYPE = {
    T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    T.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL, T.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS,
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_sd() -> dict[str, torch.Tensor]:
    return random_flux_state_dict(SMALL_FLUX, seed=1)


@pytest.fixture(scope="module")
def compact_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = random_flux_state_dict(COMPACT_FLUX, seed=3)
    path = write_safetensors(tmp_path_factory.mktemp("compact") / "flux-compact.safetensors", sd)
    digest = _sha256(path)
    yield path, sd
    assert _sha256(path) == digest, "the source file was modified"


@pytest.fixture(scope="module")
def source_file(tmp_path_factory, source_sd) -> Path:
    path = write_safetensors(tmp_path_factory.mktemp("src") / "flux-small.safetensors", source_sd)
    digest = _sha256(path)
    yield path
    assert _sha256(path) == digest, "the source file was modified"




def _reader_value(reader: gguf.GGUFReader, key: str):
    field = reader.fields[key]
    return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]][0]


def _expected_type(name: str, shape: tuple[int, ...], qtype: T) -> T:
    if qtype in FLOATS:
        return T.F32 if len(shape) == 1 else qtype
    chosen = recipe_qtype(qtype)(name, shape)  # the fixtures' statement of city96's recipe
    if chosen == qtype and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return T.F16
    return chosen


def _check_against_ggml(path: Path, sd: dict[str, torch.Tensor], qtype: T, source: Path,
                        config: FluxConfig = SMALL_FLUX) -> None:
    reader = gguf.GGUFReader(str(path))
    assert _reader_value(reader, "general.architecture") == "flux"
    assert _reader_value(reader, "general.quantization_version") == 2
    assert _reader_value(reader, "general.file_type") == int(EXPECTED_FILE_TYPE[qtype])
    assert _reader_value(reader, "fluxq.recipe") == "default"
    assert _reader_value(reader, "fluxq.version") == __version__
    assert _reader_value(reader, "fluxq.source") == source.name
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors) == list(flux_param_shapes(config))
    n_quantized = 0
    for name, source in sd.items():
        shape = tuple(source.shape)
        tensor = tensors[name]
        expected_type = _expected_type(name, shape, qtype)
        assert tensor.tensor_type == expected_type, name
        assert tuple(int(s) for s in reversed(tensor.shape)) == shape, name
        values = source.float().numpy().reshape(-1, shape[-1])
        reference = ggml_ref.quantize(values, expected_type)
        ours = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        assert np.array_equal(ours, reference.reshape(-1)), f"{name}: bytes differ from ggml_quantize_chunk"
        ours_values = dequantize(torch.from_numpy(ours.copy()), expected_type, shape).numpy().reshape(-1)
        ggml_values = ggml_ref.dequantize(reference, expected_type, source.numel())
        assert np.array_equal(ours_values, ggml_values), name
        n_quantized += expected_type == qtype
    if qtype not in FLOATS:  # the block weights really were quantized
        assert n_quantized == sum(is_quantized_by_recipe(n, tuple(t.shape)) for n, t in sd.items()) > 0


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_every_type_matches_ggml(tmp_path, compact_file, qtype):
    source_file, source_sd = compact_file
    out = tmp_path / "out.gguf"
    result = convert_file(source_file, out, qtype.name)
    assert result.path == str(out) and result.n_bytes == out.stat().st_size
    _check_against_ggml(out, source_sd, qtype, source_file, COMPACT_FLUX)
    assert sorted(os.listdir(tmp_path)) == ["out.gguf"]  # no temp file left


@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, "BF16"), (torch.float16, "F16"),
                                        (torch.float8_e4m3fn, "F8_E4M3")])
def test_16_bit_and_fp8_sources_all_in_one_prefix(tmp_path, dtype, code):
    """BF16/FP16/FP8 sources (upcast exactly), prefixed all-in-one layout; VAE/TE keys are left out."""
    sd = random_flux_state_dict(SMALL_FLUX, seed=2, dtype=dtype, prefix="model.diffusion_model.")
    extras = {"vae.decoder.conv_in.weight": torch.randn(4, 4), "text_encoders.clip_l.x.weight": torch.randn(2)}
    src = write_safetensors(tmp_path / "aio.safetensors", {**sd, **extras})
    result = convert_file(src, tmp_path / "o.gguf", "Q8_0")
    assert set(result.skipped) == set(extras)
    assert result.layout == "bfl (all-in-one)"
    bare = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    _check_against_ggml(tmp_path / "o.gguf", bare, T.Q8_0, src)


def test_gguf_f16_source(tmp_path, source_sd):
    f16 = {k: v.to(torch.float16) for k, v in source_sd.items()}
    src = tmp_path / "f16.gguf"
    write_gguf(src, f16, lambda name, shape: T.F32 if len(shape) == 1 else T.F16)
    convert_file(src, tmp_path / "q.gguf", "Q4_0")
    # the source holds 1-D tensors as F32 of the f16 values: the same numbers
    _check_against_ggml(tmp_path / "q.gguf", f16, T.Q4_0, src)


def test_k_type_alias_and_default_output_name(tmp_path, source_file):
    assert parse_target("q4_k_s") == T.Q4_K and parse_target("Q5_K_S") == T.Q5_K and parse_target("NF4") == "nf4"
    src = tmp_path / "flux1-dev-bf16.safetensors"
    src.write_bytes(source_file.read_bytes())
    result = convert_file(src, None, "q8_0")
    assert result.path == str(tmp_path / "flux1-dev-Q8_0.gguf")
    assert result.target == "Q8_0"


# --------------------------------------------------------------------------------------------------------------------
# diffusers layout

def test_diffusers_names_match_the_real_diffusers_model():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=SMALL_FLUX.in_channels, num_layers=SMALL_FLUX.depth,
                                   num_single_layers=SMALL_FLUX.depth_single,
                                   attention_head_dim=SMALL_FLUX.head_dim, num_attention_heads=SMALL_FLUX.heads,
                                   joint_attention_dim=SMALL_FLUX.context_in,
                                   pooled_projection_dim=SMALL_FLUX.vec_in, guidance_embeds=True)
    diffusers_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = diffusers_to_bfl_names(SMALL_FLUX.depth, SMALL_FLUX.depth_single)
    assert sorted(p for parts in mapping.values() for p in parts) == sorted(diffusers_shapes)
    for bfl, shape in flux_param_shapes(SMALL_FLUX).items():
        parts = [diffusers_shapes[p] for p in mapping[bfl]]
        assert (sum(p[0] for p in parts), *parts[0][1:]) == shape, bfl


def test_diffusers_source_converts_back_to_bfl(tmp_path, source_sd):
    diffusers_sd = diffusers_state_dict(source_sd)
    src = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", diffusers_sd)
    result = convert_file(src, tmp_path / "o.gguf", "F32")
    assert result.layout == "diffusers" and not result.skipped
    reader = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(s) for s in t.shape]))) for t in reader.tensors}
    assert list(got) == list(source_sd)
    for name, value in source_sd.items():
        assert np.array_equal(got[name], value.numpy()), name


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one clear FluxqError, nothing left behind, the source untouched

def _assert_clean(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


@pytest.mark.parametrize("keys,expect", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4), "conditioner.embedders.0.x.weight": (2, 2),
      "model.diffusion_model.out.2.weight": (4, 4)}, "SDXL"),
    ({"encoder.block.0.layer.0.SelfAttention.k.weight": (8, 8), "shared.weight": (16, 8)}, "T5"),
    ({"foo.bar": (3,), "baz.weight": (2, 2)}, "not a Flux transformer"),
])
def test_not_flux_sources(tmp_path, keys, expect):
    src = write_safetensors(tmp_path / "x.safetensors", {k: torch.randn(s) for k, s in keys.items()})
    digest = _sha256(src)
    with pytest.raises(FormatError, match=expect) as info:
        convert_file(src, tmp_path / "o.gguf", "F16")
    assert str(src) in str(info.value)
    _assert_clean(tmp_path, {"x.safetensors"})
    assert _sha256(src) == digest


def test_missing_file_and_truncated_file(tmp_path, source_file):
    with pytest.raises(FormatError, match="file not found"):
        convert_file(tmp_path / "nope.safetensors", tmp_path / "o.gguf", "F16")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source_file.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        convert_file(cut, tmp_path / "o.gguf", "F16")
    _assert_clean(tmp_path, {"cut.safetensors"})


def test_incomplete_flux_is_refused(tmp_path, source_sd):
    partial = {k: v for k, v in source_sd.items() if not k.startswith("single_blocks.1.")}
    src = write_safetensors(tmp_path / "p.safetensors", partial)
    # single_blocks.1 gone entirely means "depth_single = 1": still a consistent model; drop one tensor instead
    partial.pop("double_blocks.1.img_attn.proj.weight")
    src = write_safetensors(tmp_path / "p.safetensors", partial)
    with pytest.raises(FormatError, match="incomplete Flux transformer.*double_blocks.1.img_attn.proj.weight"):
        convert_file(src, tmp_path / "o.gguf", "F16")


def test_unknown_and_unavailable_types(tmp_path, source_file):
    with pytest.raises(UnsupportedTypeError, match="unknown target type 'Q7_X'.*Q4_0.*nf4"):
        convert_file(source_file, tmp_path / "o.gguf", "Q7_X")
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        convert_file(source_file, tmp_path / "o.gguf", "IQ2_XXS")
    _assert_clean(tmp_path, set())


def test_already_quantized_sources(tmp_path, source_sd):
    q8 = tmp_path / "q8.gguf"
    write_gguf(q8, source_sd, recipe_qtype(T.Q8_0))
    with pytest.raises(ConvertError, match="already quantized"):
        convert_file(q8, tmp_path / "o.gguf", "Q4_0")
    nf4_src = tmp_path / "n.safetensors"
    convert_file(write_safetensors(tmp_path / "s.safetensors", source_sd), nf4_src, "nf4")
    with pytest.raises(ConvertError, match="already quantized.*NF4"):
        convert_file(nf4_src, tmp_path / "o.gguf", "Q4_0")
    _assert_clean(tmp_path, {"q8.gguf", "n.safetensors", "s.safetensors"})


def test_refuses_to_overwrite_without_force(tmp_path, source_file):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConvertError, match="already exists.*--force"):
        convert_file(source_file, out, "F16")
    assert out.read_bytes() == b"precious"
    convert_file(source_file, out, "F16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(ConvertError, match="overwrite the source"):
        convert_file(source_file, source_file, "F16", force=True)


def test_read_only_target_folder(tmp_path, source_file, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permissions: make the OS answer as it would for a user
        real_open = os.open

        def denied(path, *args, **kwargs):
            if str(path).startswith(str(folder)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(os, "open", denied)
    try:
        with pytest.raises(ConvertError, match="cannot write into .*ro.*writable folder"):
            convert_file(source_file, folder / "o.gguf", "F16")
    finally:
        folder.chmod(0o755)
    _assert_clean(folder, set())


@pytest.mark.parametrize("target", ["F16", "nf4"])
def test_full_disk_mid_write_leaves_nothing(tmp_path, source_file, monkeypatch, target):
    calls = {"n": 0}

    def wrap(original):
        def write(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(self, *args, **kwargs)
        return write

    from lib_fluxq.formats.safetensors_write import StreamingSafetensorsWriter
    monkeypatch.setattr(StreamingGGUFWriter, "write", wrap(StreamingGGUFWriter.write))
    monkeypatch.setattr(StreamingSafetensorsWriter, "write", wrap(StreamingSafetensorsWriter.write))
    out = tmp_path / "out" / "o.bin"
    out.parent.mkdir()
    with pytest.raises(ConvertError, match="ran out of space"):
        convert_file(source_file, out, target)
    assert calls["n"] == 5
    _assert_clean(out.parent, set())


def test_not_enough_free_space_is_checked_first(tmp_path, source_file, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConvertError, match="not enough space.*needs about"):
        convert_file(source_file, tmp_path / "o.gguf", "Q8_0")
    _assert_clean(tmp_path, set())


def test_cancel_and_ctrl_c_leave_nothing(tmp_path, source_file):
    cancel = threading.Event()
    seen = []

    def progress(done, total, name):
        seen.append((done, total, name))
        if done == 3:
            cancel.set()
    with pytest.raises(ConversionCancelled):
        convert_file(source_file, tmp_path / "o.gguf", "F16", progress=progress, cancel=cancel)
    assert [s[0] for s in seen] == [1, 2, 3] and seen[0][1] == len(flux_param_shapes(SMALL_FLUX))
    _assert_clean(tmp_path, set())

    def interrupt(done, total, name):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert_file(source_file, tmp_path / "o.safetensors", "nf4", progress=interrupt)
    _assert_clean(tmp_path, set())


def test_cli(tmp_path, source_file, capsys):
    out = tmp_path / "cli.gguf"
    assert cli_main(["convert", str(source_file), "--to", "F16", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "MB" in printed.out and " s" in printed.out
    assert "tensor" in printed.err  # tqdm progress bar
    assert cli_main(["convert", str(source_file), "--to", "F16", "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["convert", str(source_file), "--to", "Q9", "-o", str(tmp_path / "x.gguf")]) == 1
    assert "unknown target type 'Q9'" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing.safetensors"), "--to", "F16"]) == 1
    assert "file not found" in capsys.readouterr().err
    assert issubclass(ConvertError, FluxqError)


_RSS_SCRIPT = r"""
import sys, threading, psutil
from lib_fluxq.convert import convert_file
folder, target = sys.argv[1], sys.argv[2]
convert_file(f"{folder}/small.safetensors", f"{folder}/warm.out", target)  # imports and first-call allocations
process, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        done.wait(0.002)
before = process.memory_info().rss
sampler = threading.Thread(target=sample)
sampler.start()
convert_file(f"{folder}/big.safetensors", f"{folder}/big.out", target)
done.set()
sampler.join()
print(before, peak[0])
"""


@pytest.mark.parametrize("target", ["F16", "nf4"])
def test_peak_memory_is_bounded_by_a_tensor_not_the_model(tmp_path, target):
    """The streaming converter's peak RSS grows by far less than the model (it holds one tensor at a time).

    Measured in a fresh process after a warm-up conversion of a tiny model, by sampling RSS every 2 ms.
    """
    # many small blocks: the model is large next to its largest tensor (1.8 MB as float32)
    big = FluxConfig(hidden=256, heads=2, depth=6, depth_single=12, context_in=256, vec_in=256)
    src = write_safetensors(tmp_path / "big.safetensors", random_flux_state_dict(big, dtype=torch.bfloat16))
    tiny = FluxConfig(hidden=256, heads=2, depth=1, depth_single=1, context_in=256, vec_in=256)
    write_safetensors(tmp_path / "small.safetensors", random_flux_state_dict(tiny))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), target], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, peak = (int(v) for v in proc.stdout.split()[-2:])
    size = src.stat().st_size
    print(f"{target}: source {size / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, growth {(peak - before) / 1e6:.1f} MB")
    assert peak - before < size * 0.5, f"peak RSS grew {(peak - before) / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_in_the_cli_leaves_nothing(tmp_path, signame):
    """A real SIGINT/SIGTERM to `python -m lib_fluxq convert` mid-write: exit 130, no output, no temp file."""
    import signal
    import time

    config = FluxConfig(hidden=256, heads=2, depth=6, depth_single=12, context_in=256, vec_in=256)
    src = write_safetensors(tmp_path / "src.safetensors", random_flux_state_dict(config, dtype=torch.bfloat16))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "lib_fluxq", "convert", str(src), "--to", "nf4", "-o",
                             str(tmp_path / "out.safetensors")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    _assert_clean(tmp_path, {"src.safetensors"})


# --------------------------------------------------------------------------------------------------------------------
# Every family: FLUX.2 dev / Klein, Chroma, Fill, Kontext (issue 15). Small widths, real names and layouts.

from lib_fluxq.flux import CHROMA, FLUX2  # noqa: E402  (kept beside the family tests that need them)

# Small-width stand-ins with each family's real layout. Rows stay multiples of 256 so every K-quant applies.
FLUX2_KLEIN_SMALL = FluxConfig(arch=FLUX2, hidden=256, heads=2, depth=2, depth_single=2, mlp_ratio=3, in_channels=128,
                               out_channels=128, context_in=768, vec_in=0, guidance=False)
FLUX2_DEV_SMALL = FluxConfig(arch=FLUX2, hidden=256, heads=2, depth=1, depth_single=3, mlp_ratio=3, in_channels=128,
                             out_channels=128, context_in=1024, vec_in=0, guidance=True)
CHROMA_SMALL = FluxConfig(arch=CHROMA, hidden=256, heads=2, depth=2, depth_single=2, context_in=512, guidance=False,
                          approximator_hidden=512, approximator_layers=2, approximator_in=64)
FILL_SMALL = FluxConfig(hidden=256, heads=2, depth=1, depth_single=1, context_in=256, vec_in=256, in_channels=384)
FAMILY_SHAPES = {"klein": FLUX2_KLEIN_SMALL, "flux2-dev": FLUX2_DEV_SMALL, "chroma": CHROMA_SMALL, "fill": FILL_SMALL}


def _flux2_bfl_reference(h: int, m: int, depth: int, single: int, ctx: int, guidance: bool) -> dict[str, tuple]:
    """FLUX.2's BFL keys and shapes as shared/FAMILY_NOTES.md §3 lists them from BFL flux2 ``model.py`` (written out
    here, independently of lib_fluxq.flux): no biases, SwiGLU MLP ([2M, H] in, [H, M] out), model-wide modulation."""
    ref = {"img_in.weight": (h, 128), "txt_in.weight": (h, ctx), "time_in.in_layer.weight": (h, 256),
           "time_in.out_layer.weight": (h, h), "double_stream_modulation_img.lin.weight": (6 * h, h),
           "double_stream_modulation_txt.lin.weight": (6 * h, h), "single_stream_modulation.lin.weight": (3 * h, h),
           "final_layer.linear.weight": (128, h), "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    if guidance:
        ref.update({"guidance_in.in_layer.weight": (h, 256), "guidance_in.out_layer.weight": (h, h)})
    for i in range(depth):
        for s in ("img", "txt"):
            ref.update({f"double_blocks.{i}.{s}_attn.qkv.weight": (3 * h, h),
                        f"double_blocks.{i}.{s}_attn.norm.query_norm.scale": (128,),
                        f"double_blocks.{i}.{s}_attn.norm.key_norm.scale": (128,),
                        f"double_blocks.{i}.{s}_attn.proj.weight": (h, h),
                        f"double_blocks.{i}.{s}_mlp.0.weight": (2 * m, h),
                        f"double_blocks.{i}.{s}_mlp.2.weight": (h, m)})
    for i in range(single):
        ref.update({f"single_blocks.{i}.linear1.weight": (3 * h + 2 * m, h),
                    f"single_blocks.{i}.linear2.weight": (h, h + m),
                    f"single_blocks.{i}.norm.query_norm.scale": (128,),
                    f"single_blocks.{i}.norm.key_norm.scale": (128,)})
    return ref


@pytest.mark.parametrize("family,qtype", [("klein", T.Q4_K), ("klein", T.Q8_0), ("flux2-dev", T.Q5_1),
                                          ("chroma", T.Q4_0), ("chroma", T.Q6_K), ("fill", T.Q5_K)])
def test_family_round_trip_matches_ggml(tmp_path, family, qtype):
    """A BF16 source of each family's layout converts to GGUF: gguf-py reads back the names, shapes (ggml order
    reversed) and types city96's recipe gives; the packed bytes are ggml_quantize_chunk's and our dequantization
    equals ggml's to_float; general.architecture is "flux" for every family, as city96's loader expects."""
    config = FAMILY_SHAPES[family]
    sd = random_flux_state_dict(config, seed=7, dtype=torch.bfloat16)
    src = write_safetensors(tmp_path / f"{family}-bf16.safetensors", sd)
    result = convert_file(src, tmp_path / "o.gguf", qtype.name)
    assert result.layout == "bfl" and result.n_quantized > 0
    _check_against_ggml(tmp_path / "o.gguf", sd, qtype, src, config)


def test_flux2_names_and_shapes_are_bfls(tmp_path):
    """The converted Klein / FLUX.2 dev files carry exactly BFL's FLUX.2 keys and shapes (the notes' table), and
    only the block weights are quantized: the model-wide modulations stay F16 as in city96/FLUX.2-dev-gguf."""
    for config in (FLUX2_KLEIN_SMALL, FLUX2_DEV_SMALL):
        sd = random_flux_state_dict(config, seed=1, dtype=torch.bfloat16)
        src = write_safetensors(tmp_path / "f2.safetensors", sd)
        convert_file(src, tmp_path / "f2.gguf", "Q8_0", force=True)
        reader = gguf.GGUFReader(str(tmp_path / "f2.gguf"))
        got = {t.name: (tuple(int(s) for s in reversed(t.shape)), t.tensor_type) for t in reader.tensors}
        expected = _flux2_bfl_reference(config.hidden, config.mlp_hidden, config.depth, config.depth_single,
                                        config.context_in, config.guidance)
        assert {n: s for n, (s, _) in got.items()} == expected
        for name, (shape, qtype) in got.items():
            in_block = name.startswith(("double_blocks.", "single_blocks.")) and len(shape) == 2
            assert qtype == (T.Q8_0 if in_block else T.F16 if len(shape) == 2 else T.F32), name


def _flux2_diffusers_state_dict(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL FLUX.2 -> diffusers Flux2Transformer2DModel names, written from the notes' table (diffusers'
    FLUX2_TRANSFORMER_KEYS_RENAME_DICT / _DOUBLE_BLOCK_KEY_MAP / _SINGLE_BLOCK_KEY_MAP), independently of convert.py."""
    out: dict[str, torch.Tensor] = {}
    top = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
           "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
           "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
           "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
           "single_stream_modulation.lin": "single_stream_modulation.linear", "final_layer.linear": "proj_out"}
    double = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
              "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
              "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
              "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
              "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
              "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
    single = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out",
              "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
    for name, value in bfl.items():
        stem = name.removesuffix(".weight")
        if name == "final_layer.adaLN_modulation.1.weight":
            shift, scale = value.chunk(2)
            out["norm_out.linear.weight"] = torch.cat([scale, shift])
        elif stem in top:
            out[top[stem] + ".weight"] = value
        elif name.startswith("double_blocks."):
            _, i, rest = name.split(".", 2)
            if rest.endswith("attn.qkv.weight"):
                names = ("to_q", "to_k", "to_v") if rest.startswith("img") else ("add_q_proj", "add_k_proj",
                                                                                  "add_v_proj")
                for part, chunk in zip(names, value.chunk(3), strict=True):
                    out[f"transformer_blocks.{i}.attn.{part}.weight"] = chunk.clone()
            else:
                key = double.get(rest) or double[rest.removesuffix(".weight")] + ".weight"
                out[f"transformer_blocks.{i}.{key}"] = value
        else:
            _, i, rest = name.split(".", 2)
            key = single.get(rest) or single[rest.removesuffix(".weight")] + ".weight"
            out[f"single_transformer_blocks.{i}.{key}"] = value
    return out


@pytest.mark.parametrize("config", [FLUX2_KLEIN_SMALL, FLUX2_DEV_SMALL], ids=["klein", "flux2-dev"])
def test_flux2_diffusers_source_converts_back_to_bfl(tmp_path, config):
    bfl = random_flux_state_dict(config, seed=4)
    src = write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", _flux2_diffusers_state_dict(bfl))
    result = convert_file(src, tmp_path / "o.gguf", "F32")
    assert result.layout == "diffusers" and not result.skipped
    reader = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(s) for s in t.shape]))) for t in reader.tensors}
    assert list(got) == list(bfl)
    for name, value in bfl.items():
        assert np.array_equal(got[name], value.numpy()), name


def test_kontext_keeps_its_name(tmp_path):
    """Kontext has dev's tensors: only the name tells them apart (Neo checks "kontext" in the path). The default
    output keeps it, and general.name carries it for loaders and inspect that read metadata."""
    sd = random_flux_state_dict(COMPACT_FLUX, seed=5, dtype=torch.bfloat16)
    src = write_safetensors(tmp_path / "flux1-kontext-dev-bf16.safetensors", sd)
    result = convert_file(src, None, "Q8_0")
    assert os.path.basename(result.path) == "flux1-kontext-dev-Q8_0.gguf"
    reader = gguf.GGUFReader(result.path)
    assert _reader_value(reader, "general.name") == "flux1-kontext-dev-bf16"
    _check_against_ggml(Path(result.path), sd, T.Q8_0, src, COMPACT_FLUX)


@pytest.mark.parametrize("family,drop,needle", [
    ("klein", "single_blocks.1.linear2.weight", "incomplete Flux transformer"),
    ("chroma", "distilled_guidance_layer.out_proj.weight", "incomplete Flux transformer"),
    ("klein", "txt_in.weight", "without 'txt_in.weight'")])
def test_family_sources_missing_a_tensor_are_one_line(tmp_path, family, drop, needle):
    sd = random_flux_state_dict(FAMILY_SHAPES[family], seed=2)
    sd.pop(drop)
    src = write_safetensors(tmp_path / "x.safetensors", sd)
    digest = _sha256(src)
    code = cli_main(["convert", str(src), "--to", "Q8_0", "-o", str(tmp_path / "o.gguf")])
    assert code == 1
    _assert_clean(tmp_path, {"x.safetensors"})
    assert _sha256(src) == digest
    with pytest.raises(FormatError, match=needle) as info:
        convert_file(src, tmp_path / "o.gguf", "Q8_0")
    assert "\n" not in str(info.value) and str(src) in str(info.value)
