"""Shared helpers of the opt-in real-Forge tests (FORGE_DIR set; see FORGE_NOTES §9): start Forge CPU-only with the
API on 127.0.0.1 and a private --data-dir whose extensions/fluxq links to this repository, call the API, watch RSS,
find tracebacks through our code in its console log, and build the random-weight model files the tests load
(a full-shape FLUX.1-dev Q2_K GGUF with T5-XXL / CLIP-L / ae, and an SD1.5 single-file checkpoint)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest

from lib_fluxq.flux import FLUX_DEV, flux_param_shapes, is_quantized_by_recipe

FORGE_DIR = os.environ.get("FORGE_DIR")
requires_forge = pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR to a prepared Forge checkout to run")
REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:7860"  # no --port: an upstream bug breaks /sdapi/v1/cmd-flags with it (FORGE_NOTES §9)
GB = 1024**3


def forge_python() -> str:
    return str(Path(FORGE_DIR or ".") / "venv" / "bin" / "python")


def api(path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # the body names the exception; urllib's message only the status
        raise AssertionError(f"{path}: HTTP {error.code}: {error.read()[:2000]!r}") from error


def our_tracebacks(log_text: str) -> list[str]:
    """Tracebacks through our code (Forge's own "Failed reading extension data from Git repository" for a checkout
    without an 'origin' remote is not ours)."""
    tracebacks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+", log_text)
    return [t for t in tracebacks if "lib_fluxq" in t or "fluxq_hooks" in t or "fluxq_refine" in t]


def assert_clean_startup(startup: str) -> None:
    """Forge's console up to "Startup time:" shows no error from loading or running our extension."""
    assert not our_tracebacks(startup), our_tracebacks(startup)
    assert not re.search(r"Error (loading|running|executing).*fluxq", startup), startup[-3000:]


def model_loads(log_text: str) -> list[tuple[str, list[str]]]:
    """(checkpoint file name, additional module file names) of every "Loading Model:" line Forge printed
    (forge_model_reload)."""
    loads = []
    for match in re.finditer(r"^Loading Model: \{'checkpoint_info': \{'filename': '([^']*)'.*?'additional_modules': "
                             r"(\[[^\]]*\])", log_text, flags=re.M):
        loads.append((Path(match.group(1)).name, [Path(m).name for m in ast.literal_eval(match.group(2))]))
    return loads


@contextmanager
def running_forge(data_dir: Path, start_timeout: int = 240,
                  with_fluxq: bool = True) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Forge started on ``data_dir`` (extensions/fluxq → this repository), up once it printed "Startup time:" and
    /sdapi/v1/options answers; yields (process, console log path) and stops it afterwards.

    Why not just the API answering: webui.py mounts the routes (and the server already runs) BEFORE ``Api.__init__``
    has filled ``default_script_arg_txt2img``; a txt2img with ``alwayson_scripts`` in that window fails with
    "IndexError: list assignment index out of range" in ``init_script_args`` (seen here, Forge dfdcbab6)."""
    (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
    link = data_dir / "extensions" / "fluxq"
    if with_fluxq and not link.is_symlink():
        link.symlink_to(REPO)
    elif not with_fluxq and link.is_symlink():   # "Forge alone": the same data dir without the extension
        link.unlink()
    log_path = data_dir / "forge.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [forge_python(), "launch.py", "--always-cpu", "--api", "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check", "--do-not-download-clip",
            "--data-dir", str(data_dir),
            # gradio serves files only from allowed paths, which default to the data dir alone: without this, the
            # page's own script.js / javascript/*.js (Forge's checkout) answer 403 and Generate does nothing
            "--gradio-allowed-path", str(FORGE_DIR)]
    with open(log_path, "w") as log:
        forge = subprocess.Popen(args, cwd=FORGE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(start_timeout):
            if "Startup time:" in log_path.read_text():
                try:
                    api("/sdapi/v1/options", timeout=5)
                    break
                except OSError:
                    pass
            assert forge.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError(f"Forge did not start in {start_timeout} s: {log_path.read_text()[-3000:]}")
        yield forge, log_path
    finally:
        forge.terminate()
        try:
            forge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            forge.kill()


@contextmanager
def peak_rss(pid: int, on_peak: Callable[[], None] | None = None, interval: float = 0.2) -> Iterator[dict[str, int]]:
    """Samples the RSS of ``pid`` in a thread; the yielded dict holds 'baseline' and 'peak' (bytes). ``on_peak`` is
    called whenever a new peak is seen (to take more measurements at that moment)."""
    import psutil

    process = psutil.Process(pid)
    baseline = process.memory_info().rss
    result = {"baseline": baseline, "peak": baseline}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                rss = process.memory_info().rss
                if rss > result["peak"]:
                    result["peak"] = rss
                    if on_peak is not None:
                        on_peak()
            except (psutil.Error, OSError):
                return
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield result
    finally:
        stop.set()
        watcher.join()


@contextmanager
def model_data_dir(tmp_path_factory: pytest.TempPathFactory, keep_env: str, name: str) -> Iterator[Path]:
    """A Forge --data-dir for one test: the directory named by $``keep_env`` (its models stay for the next run), or
    a pytest temp dir whose models/ (GBs; pytest keeps the last three temp dirs) is removed afterwards."""
    kept = os.environ.get(keep_env)
    data_dir = Path(kept) if kept else tmp_path_factory.mktemp(name)
    try:
        yield data_dir
    finally:
        if not kept:
            shutil.rmtree(data_dir / "models", ignore_errors=True)


# -------------------------------------------------------------------------------- model builders (random weights)

T = gguf.GGMLQuantizationType
FLUX_QTYPE = T.Q2_K       # no bake_inner in Forge: bytes stay in the file map through sampling too


def _t5_recipe(name: str, shape: tuple[int, ...]) -> bool:
    """city96's T5 GGUFs: block matrices and the token embedding quantized (Forge dequantizes token_embd itself and
    cannot handle an F16 one under torch 2.13), relative bias / norms not."""
    return len(shape) == 2 and (name.startswith("enc.blk.") or name == "token_embd.weight") and "attn_rel_b" not in name


def _write_gguf_streaming(path: Path, shapes: dict[str, tuple[int, ...]], recipe, arch: str,
                          qtype: T = FLUX_QTYPE) -> None:
    """Full-size GGUF without holding it in RAM: tensor infos first, then each tensor's bytes."""
    from tests import ggml_ref

    rng = np.random.default_rng(0)
    packed_by_shape: dict[tuple[int, ...], np.ndarray] = {}

    def data_for(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, T]:
        if len(shape) == 2 and shape[1] % 256 == 0 and recipe(name, shape):
            if shape not in packed_by_shape:
                values = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)
                packed_by_shape[shape] = ggml_ref.quantize(values, qtype)
            return packed_by_shape[shape], qtype
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32), T.F32
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16), T.F16

    writer = gguf.GGUFWriter(str(path), arch=arch)
    order = []
    for name, shape in shapes.items():
        data, qtype = data_for(name, shape)
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=qtype)
        order.append((name, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in order:
        writer.write_tensor_data(data_for(name, shape)[0])
    writer.close()


def _t5_shapes() -> dict[str, tuple[int, ...]]:
    d, ff, heads = 4096, 10240, 64
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (32128, d)}
    for i in range(24):
        p = f"enc.blk.{i}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_o"):
            shapes[p + n + ".weight"] = (d, d)
        if i == 0:
            shapes[p + "attn_rel_b.weight"] = (32, heads)
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "ffn_gate.weight"] = (ff, d)
        shapes[p + "ffn_up.weight"] = (ff, d)
        shapes[p + "ffn_down.weight"] = (d, ff)
        shapes[p + "ffn_norm.weight"] = (d,)
    shapes["enc.output_norm.weight"] = (d,)
    return shapes


_BUILD_CLIP_VAE = r"""
import sys, torch
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers import AutoencoderKL
from safetensors.torch import save_file
repo, clip_out, vae_out = sys.argv[1:4]
torch.manual_seed(0)
cfg = CLIPTextConfig.from_pretrained(repo + '/text_encoder')
clip = CLIPTextModel(cfg).half()
sd = {k: v.contiguous() for k, v in clip.state_dict().items()}
sd['text_model.final_layer_norm.bias'] = torch.full_like(sd['text_model.final_layer_norm.bias'], 0.01)
save_file(sd, clip_out)
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(repo + '/vae'))
save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_out)
"""


def build_flux_models(data_dir: Path, qtype: T = FLUX_QTYPE) -> dict[str, Path]:
    """Full-shape random FLUX.1-dev GGUF ("flux") and T5-XXL GGUF ("t5") of ``qtype`` (Q2_K unless told), CLIP-L
    ("clip") and ae ("ae")."""
    models = data_dir / "models"
    for sub in ("Stable-diffusion", "VAE", "text_encoder"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    files = {"flux": models / "Stable-diffusion" / f"flux1-dev-{qtype.name}.gguf",
             "t5": models / "text_encoder" / f"t5-v1_1-xxl-encoder-{qtype.name}.gguf",
             "clip": models / "text_encoder" / "clip_l.safetensors",
             "ae": models / "VAE" / "ae.safetensors"}
    if not files["flux"].exists():
        _write_gguf_streaming(files["flux"], flux_param_shapes(FLUX_DEV), is_quantized_by_recipe, arch="flux",
                              qtype=qtype)
    if not files["t5"].exists():
        _write_gguf_streaming(files["t5"], _t5_shapes(), _t5_recipe, arch="t5encoder", qtype=qtype)
    if not files["clip"].exists() or not files["ae"].exists():
        repo = Path(FORGE_DIR) / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev"
        subprocess.run([forge_python(), "-c", _BUILD_CLIP_VAE, str(repo),
                        str(files["clip"]), str(files["ae"])], check=True, timeout=600)
    return files


# Forge's UNet takes ldm-style config (what huggingface_guess detects for SD1.5); its VAE class already has the ldm
# key names, so both state dicts are saved as they are under the single-file prefixes.
_BUILD_SD15 = r"""
import sys
repo, checkpoint_out, vae_out = sys.argv[1:4]
sys.argv[1:] = ['--always-cpu']  # Forge's backend parses argv at import; CPU-only torch here
sys.path[:0] = ['.', 'packages_3rdparty']  # Forge's root and its vendored gguf
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.nn.vae import IntegratedAutoencoderKL
torch.manual_seed(0)
sd = {}
unet = IntegratedUNet2DConditionModel(
    in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    num_heads=8, num_head_channels=-1, use_spatial_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    use_linear_in_transformer=False, context_dim=768, adm_in_channels=None).half()
sd.update({'model.diffusion_model.' + k: v.contiguous() for k, v in unet.state_dict().items()})
del unet
vae_config = IntegratedAutoencoderKL.load_config(repo + '/vae')
vae = IntegratedAutoencoderKL.from_config(vae_config).half()
sd.update({'first_stage_model.' + k: v.contiguous() for k, v in vae.state_dict().items()})
clip = CLIPTextModel(CLIPTextConfig.from_pretrained(repo + '/text_encoder')).half()
for k, v in clip.state_dict().items():
    sd['cond_stage_model.transformer.' + k] = v.contiguous()
# zero final-norm bias → NaN images downstream (FORGE_NOTES §9)
key = 'cond_stage_model.transformer.text_model.final_layer_norm.bias'
sd[key] = torch.full_like(sd[key], 0.01)
save_file(sd, checkpoint_out)
torch.manual_seed(1)
user_vae = IntegratedAutoencoderKL.from_config(vae_config).half()  # a standalone SD VAE (ldm names, no prefix)
save_file({k: v.contiguous() for k, v in user_vae.state_dict().items()}, vae_out)
"""

SD15_FIRST, SD15_REFINE = "fluxq_first_sd15.safetensors", "fluxq_refine_sd15.safetensors"


def build_sd15_models(data_dir: Path) -> dict[str, Path]:
    """One random SD1.5 single-file checkpoint under two names ("first": SD15_FIRST, "refine": SD15_REFINE, a hard
    link) and a standalone random SD VAE ("vae"), built by Forge's own classes from its bundled runwayml configs."""
    checkpoints, vae_dir = data_dir / "models" / "Stable-diffusion", data_dir / "models" / "VAE"
    checkpoints.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    files = {"first": checkpoints / SD15_FIRST, "refine": checkpoints / SD15_REFINE,
             "vae": vae_dir / "fluxq_user_vae.safetensors"}
    if not files["first"].exists() or not files["vae"].exists():
        repo = Path(FORGE_DIR) / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
        subprocess.run([forge_python(), "-c", _BUILD_SD15, str(repo), str(files["first"]), str(files["vae"])],
                       cwd=FORGE_DIR, check=True, timeout=900)
    if not files["refine"].exists():
        os.link(files["first"], files["refine"])  # a second name without a second 2 GB
    return files
