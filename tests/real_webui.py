"""Helpers shared by the opt-in real-WebUI tests (tests/real_forge.py for Forge dfdcbab6 under FORGE_DIR,
tests/real_neo.py for Forge Neo under NEO_DIR): start a WebUI CPU-only with the API on 127.0.0.1 and a private
--data-dir whose extensions/fluxq links to this repository, call the API, watch RSS, find tracebacks through our code
in its console log, parse its "Loading Model:" lines, and build random-weight model files at full FLUX.1 shape (GGUF
written tensor by tensor, never held in RAM) plus a kohya-style Flux LoRA."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import gguf
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3
T = gguf.GGMLQuantizationType


def api_status(url: str, path: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one API call; an error status is returned, not raised."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:  # the body names the exception; urllib's message only the status
        body = error.read()
        try:
            return error.code, json.loads(body)
        except json.JSONDecodeError:
            return error.code, {"raw": body[:2000].decode(errors="replace")}


def api(url: str, path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    status, body = api_status(url, path, payload, timeout)
    if status != 200:
        raise AssertionError(f"{path}: HTTP {status}: {json.dumps(body)[:2000]}")
    return body


def our_tracebacks(log_text: str) -> list[str]:
    """Tracebacks through our code (Forge's own "Failed reading extension data from Git repository" for a checkout
    without an 'origin' remote is not ours)."""
    tracebacks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+", log_text)
    return [t for t in tracebacks if "lib_fluxq" in t or "fluxq_hooks" in t or "fluxq_refine" in t]


def assert_clean_startup(startup: str) -> None:
    """The console up to "Startup time:" shows no error from loading or running our extension."""
    assert not our_tracebacks(startup), our_tracebacks(startup)
    assert not re.search(r"Error (loading|running|executing).*fluxq", startup), startup[-3000:]
    assert not re.search(r"\[fluxq\].*(failed|could not)", startup), startup[-3000:]


def model_loads(log_text: str) -> list[tuple[str, list[str]]]:
    """(checkpoint file name, additional module file names) of every "Loading Model:" line the WebUI printed
    (forge_model_reload)."""
    loads = []
    # a tqdm bar's cursor-up escape or carriage return may sit right before the line (Neo's console)
    for match in re.finditer(r"(?:^|\x1b\[A|\r)Loading Model: \{'checkpoint_info': \{'filename': '([^']*)'"
                             r".*?'additional_modules': (\[[^\]]*\])", log_text, flags=re.M):
        loads.append((Path(match.group(1)).name, [Path(m).name for m in ast.literal_eval(match.group(2))]))
    return loads


def wait_port_free(url: str, seconds: int = 600) -> None:
    """Wait while another process listens on ``url``'s port: a gradio app started elsewhere without a port (the
    tab's standalone UI, a test) takes the first free one from 7860 up, and a WebUI started on a taken port prints
    "Cannot find empty port" and then hangs instead of exiting."""
    parsed = urlparse(url)
    for _ in range(seconds):
        with socket.socket() as probe:
            if probe.connect_ex((parsed.hostname, parsed.port)) != 0:
                return
        time.sleep(1)
    raise AssertionError(f"{url} stayed taken by another process for {seconds} s: stop it and run again")


@contextmanager
def running_webui(args: Sequence[str], cwd: str, data_dir: Path, url: str, name: str, start_timeout: int = 240,
                  env: dict[str, str] | None = None, extension: bool = True) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A WebUI started with ``args`` on ``data_dir`` (extensions/fluxq → this repository), up once it printed
    "Startup time:" and /sdapi/v1/options answers; yields (process, console log path) and stops it afterwards.

    Why not just the API answering: webui.py mounts the routes (and the server already runs) BEFORE ``Api.__init__``
    has filled ``default_script_arg_txt2img``; a txt2img with ``alwayson_scripts`` in that window fails with
    "IndexError: list assignment index out of range" in ``init_script_args`` (seen in Forge dfdcbab6)."""
    (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
    link = data_dir / "extensions" / "fluxq"
    if extension and not (link.is_symlink() and link.resolve() == REPO):
        # a data dir shared between checkouts: the link must name the repository under test, not the last one's
        if link.is_symlink():
            link.unlink()
        link.symlink_to(REPO)
    elif not extension and link.is_symlink():   # the WebUI alone, same data dir (for side-by-side figures)
        link.unlink()
    log_path = data_dir / f"{name}.log"
    wait_port_free(url)
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(args), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(start_timeout):
            if "Startup time:" in log_path.read_text():
                # with the port taken the WebUI moves to the next one: the API there would be another server's
                served = re.search(r"Running on local URL:\s*(\S+)", log_path.read_text())
                assert served is None or served.group(1).rstrip("/") == url.rstrip("/"), (
                    f"{name} serves {served.group(1)}, not {url}: another server holds the port; stop it and rerun")
                try:
                    api(url, "/sdapi/v1/options", timeout=5)
                    break
                except OSError:
                    pass
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert "Cannot find empty port" not in log_path.read_text(), log_path.read_text()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError(f"{name} did not start in {start_timeout} s: {log_path.read_text()[-3000:]}")
        yield process, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


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
    """A --data-dir for one test: the directory named by $``keep_env`` (its models stay for the next run), or a
    pytest temp dir whose models/ (GBs; pytest keeps the last three temp dirs) is removed afterwards."""
    kept = os.environ.get(keep_env)
    data_dir = Path(kept) if kept else tmp_path_factory.mktemp(name)
    try:
        yield data_dir
    finally:
        if not kept:
            shutil.rmtree(data_dir / "models", ignore_errors=True)


# -------------------------------------------------------------------------------- model builders (random weights)


def t5_recipe(name: str, shape: tuple[int, ...]) -> bool:
    """city96's T5 GGUFs: block matrices and the token embedding quantized (Forge dequantizes token_embd itself and
    cannot handle an F16 one under torch 2.13), relative bias / norms not."""
    return len(shape) == 2 and (name.startswith("enc.blk.") or name == "token_embd.weight") and "attn_rel_b" not in name


def write_gguf_streaming(path: Path, shapes: dict[str, tuple[int, ...]], recipe: Callable[[str, tuple[int, ...]], bool],
                         arch: str, qtype: T) -> None:
    """Full-size GGUF without holding it in RAM: tensor infos first, then each tensor's bytes. One random matrix
    per distinct shape, quantized by ggml (tests/ggml_ref.py), reused: a load / memory / speed file, not a model.
    Written to a temporary name and renamed at the end, so an interrupted build never leaves a short file."""
    from tests import ggml_ref

    rng = np.random.default_rng(0)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    packed_by_shape: dict[tuple[int, ...], np.ndarray] = {}

    def data_for(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, T]:
        if len(shape) == 2 and shape[1] % block == 0 and recipe(name, shape):
            if shape not in packed_by_shape:
                values = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)
                packed_by_shape[shape] = ggml_ref.quantize(values, qtype)
            return packed_by_shape[shape], qtype
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32), T.F32
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16), T.F16

    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch=arch)
    order = []
    for name, shape in shapes.items():
        data, tensor_type = data_for(name, shape)
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=tensor_type)
        order.append((name, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape in order:
        writer.write_tensor_data(data_for(name, shape)[0])
    writer.close()
    os.replace(partial, path)


def t5_shapes() -> dict[str, tuple[int, ...]]:
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


def write_flux_gguf(path: Path, qtype: T) -> Path:
    """A transformer-only FLUX.1-dev GGUF at full shape, city96's recipe (2-D block weights quantized)."""
    from lib_fluxq.flux import FLUX_DEV, flux_param_shapes, is_quantized_by_recipe
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf_streaming(path, flux_param_shapes(FLUX_DEV), is_quantized_by_recipe, "flux", qtype)
    return path


def write_t5_gguf(path: Path, qtype: T) -> Path:
    """A T5-XXL encoder GGUF at full shape in city96's naming."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf_streaming(path, t5_shapes(), t5_recipe, "t5encoder", qtype)
    return path


BUILD_CLIP_VAE = r"""
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
save_file(sd, clip_out + '.partial')
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(repo + '/vae'))
save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_out + '.partial')
"""


def write_clip_and_ae(clip: Path, ae: Path, python: str, flux_repo: Path) -> None:
    """Random CLIP-L and Flux ae built by the WebUI's own transformers / diffusers from its bundled FLUX.1-dev
    configs (``flux_repo``: <webui>/backend/huggingface/black-forest-labs/FLUX.1-dev)."""
    if clip.exists() and ae.exists():
        return
    clip.parent.mkdir(parents=True, exist_ok=True)
    ae.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-c", BUILD_CLIP_VAE, str(flux_repo), str(clip), str(ae)], check=True, timeout=600)
    os.replace(str(clip) + ".partial", clip)
    os.replace(str(ae) + ".partial", ae)


def flux_lora_targets() -> dict[str, tuple[int, int]]:
    """kohya LoRA module name -> (out, in) of the FLUX.1 layers it patches: every double block's image/text
    attention qkv and every single block's linear1 (the big matrices; 19 x 2 + 38 = 76 layers)."""
    from lib_fluxq.flux import FLUX_DEV, flux_param_shapes
    shapes = flux_param_shapes(FLUX_DEV)
    targets = {}
    for name, shape in shapes.items():
        if name.endswith((".img_attn.qkv.weight", ".txt_attn.qkv.weight")) or \
                (name.startswith("single_blocks.") and name.endswith(".linear1.weight")):
            targets["lora_unet_" + name[:-len(".weight")].replace(".", "_")] = (shape[0], shape[1])
    return targets


def write_flux_lora(path: Path, rank: int = 16) -> Path:
    """A kohya-style (sd-scripts) FLUX.1 LoRA: ``lora_unet_<layer>.lora_down/lora_up.weight`` and ``.alpha``,
    fp16, small random values."""
    import torch
    from safetensors.torch import save_file
    if path.exists():
        return path
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (out_features, in_features) in flux_lora_targets().items():
        tensors[f"{module}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).half()
        tensors[f"{module}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).half()
        tensors[f"{module}.alpha"] = torch.tensor(float(rank)).half()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path) + ".partial", metadata={"ss_network_module": "networks.lora_flux"})
    os.replace(str(path) + ".partial", path)
    return path


# Forge's UNet takes ldm-style config (what huggingface_guess detects for SD1.5); its VAE class already has the ldm
# key names, so both state dicts are saved as they are under the single-file prefixes.
BUILD_SD15 = r"""
import sys
repo, checkpoint_out, vae_out, cpu_flag, packages = sys.argv[1:6]
sys.argv[1:] = [cpu_flag]  # the WebUI's backend parses argv at import; CPU-only torch here
sys.path[:0] = ['.', packages]  # the WebUI's root and its vendored packages (gguf)
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
save_file(sd, checkpoint_out + '.partial')
torch.manual_seed(1)
user_vae = IntegratedAutoencoderKL.from_config(vae_config).half()  # a standalone SD VAE (ldm names, no prefix)
save_file({k: v.contiguous() for k, v in user_vae.state_dict().items()}, vae_out + '.partial')
"""


def write_sd15(checkpoint: Path, vae: Path, python: str, webui_dir: Path, cpu_flag: str, packages: str) -> None:
    """A random SD1.5 single-file checkpoint and a standalone random SD VAE, built by the WebUI's own UNet / VAE
    classes (Forge and Neo share them) from its bundled runwayml configs. ``cpu_flag``: Forge ``--always-cpu``, Neo
    ``--cpu``; ``packages``: the folder of its vendored packages (Forge packages_3rdparty, Neo
    modules_forge/packages)."""
    if checkpoint.exists() and vae.exists():
        return
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    vae.parent.mkdir(parents=True, exist_ok=True)
    repo = webui_dir / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    subprocess.run([python, "-c", BUILD_SD15, str(repo), str(checkpoint), str(vae), cpu_flag, packages],
                   cwd=webui_dir, check=True, timeout=900)
    os.replace(str(checkpoint) + ".partial", checkpoint)
    os.replace(str(vae) + ".partial", vae)
