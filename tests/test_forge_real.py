"""Opt-in: the hook inside a REAL Forge (FORGE_DIR=/path/to/stable-diffusion-webui-forge with its venv in venv/).

Skipped unless FORGE_DIR is set. Prepare Forge as FORGE_NOTES §9 says (CPU torch, repositories/ present). The test
starts Forge CPU-only on 127.0.0.1 with a private --data-dir whose extensions/fluxq links to this repository, builds
a transformer-only FLUX.1-dev GGUF at full shape (Q2_K: ~4 GB; one random matrix per distinct shape, quantized by
ggml, reused — a load/memory test, not an image test), a full-shape T5-XXL GGUF (city96 names, Q2_K), and random
CLIP-L / VAE files (built by Forge's own transformers/diffusers from Forge's bundled configs), then asks for one
64x64 image through the API and checks: the extension loaded without errors, the hook is active, clip_l/t5xxl/ae
were paired at load, and the peak RSS stays near what was paged in from the files. Needs ~7 GB disk, ~8 GB RAM, and
several minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from lib_fluxq.flux import FLUX_DEV, flux_param_shapes, is_quantized_by_recipe
from tests.real_forge import FORGE_DIR, GB, api, forge_python, our_tracebacks, peak_rss, requires_forge, running_forge

pytestmark = requires_forge
T = gguf.GGMLQuantizationType
QTYPE = T.Q2_K       # no bake_inner in Forge: bytes stay in the file map through sampling too


def _t5_recipe(name: str, shape: tuple[int, ...]) -> bool:
    """city96's T5 GGUFs: block matrices and the token embedding quantized (Forge dequantizes token_embd itself and
    cannot handle an F16 one under torch 2.13), relative bias / norms not."""
    return len(shape) == 2 and (name.startswith("enc.blk.") or name == "token_embd.weight") and "attn_rel_b" not in name


def _write_gguf_streaming(path: Path, shapes: dict[str, tuple[int, ...]], recipe, arch: str) -> None:
    """Full-size GGUF without holding it in RAM: tensor infos first, then each tensor's bytes."""
    from tests import ggml_ref

    rng = np.random.default_rng(0)
    packed_by_shape: dict[tuple[int, ...], np.ndarray] = {}

    def data_for(name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, T]:
        if len(shape) == 2 and shape[1] % 256 == 0 and recipe(name, shape):
            if shape not in packed_by_shape:
                values = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])).astype(np.float32)
                packed_by_shape[shape] = ggml_ref.quantize(values, QTYPE)
            return packed_by_shape[shape], QTYPE
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


def _build_models(data_dir: Path) -> dict[str, Path]:
    models = data_dir / "models"
    for sub in ("Stable-diffusion", "VAE", "text_encoder"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    files = {"flux": models / "Stable-diffusion" / "flux1-dev-Q2_K.gguf",
             "t5": models / "text_encoder" / "t5-v1_1-xxl-encoder-Q2_K.gguf",
             "clip": models / "text_encoder" / "clip_l.safetensors",
             "ae": models / "VAE" / "ae.safetensors"}
    if not files["flux"].exists():
        _write_gguf_streaming(files["flux"], flux_param_shapes(FLUX_DEV), is_quantized_by_recipe, arch="flux")
    if not files["t5"].exists():
        _write_gguf_streaming(files["t5"], _t5_shapes(), _t5_recipe, arch="t5encoder")
    if not files["clip"].exists() or not files["ae"].exists():
        repo = Path(FORGE_DIR) / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev"
        subprocess.run([forge_python(), "-c", _BUILD_CLIP_VAE, str(repo),
                        str(files["clip"]), str(files["ae"])], check=True, timeout=600)
    return files


def _mapped_resident(pid: int, paths: list[str]) -> int:
    """Bytes of ``paths`` resident in the process (file pages counted in its RSS)."""
    total, current = 0, None
    real = {os.path.realpath(p) for p in paths}
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                current = parts[5].strip() if len(parts) == 6 else None
            elif line.startswith("Rss:") and current in real:
                total += int(line.split()[1]) * 1024
    return total


def test_real_forge_pairs_flux_parts_and_keeps_gguf_mapped(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = Path(os.environ.get("FLUXQ_FORGE_DATA", tmp_path_factory.mktemp("forge_data")))
    files = _build_models(data_dir)
    with running_forge(data_dir) as (forge, log_path):
        startup = log_path.read_text()
        assert "[fluxq] Forge load hook active" in startup, startup[-3000:]
        assert not re.search(r"Error (loading|running|executing).*fluxq", startup), startup[-3000:]
        assert not our_tracebacks(startup), our_tracebacks(startup)
        api("/sdapi/v1/options", {"sd_model_checkpoint": files["flux"].name, "forge_additional_modules": []})
        mapped = {"at_peak": 0}

        def measure_mapped() -> None:
            mapped["at_peak"] = _mapped_resident(forge.pid, [str(files["flux"]), str(files["t5"])])

        started = time.time()
        with peak_rss(forge.pid, on_peak=measure_mapped) as rss:
            result = api("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 64, "height": 64, "steps": 1,
                                               "cfg_scale": 1.0, "distilled_cfg_scale": 3.5, "sampler_name": "Euler",
                                               "scheduler": "Simple", "seed": 1}, timeout=1500)
        elapsed = time.time() - started
        log_text = log_path.read_text()
        report = {"baseline_rss_gb": rss["baseline"] / GB, "peak_rss_gb": rss["peak"] / GB,
                  "mapped_resident_at_peak_gb": mapped["at_peak"] / GB,
                  "flux_gguf_gb": files["flux"].stat().st_size / GB, "t5_gguf_gb": files["t5"].stat().st_size / GB,
                  "seconds": elapsed}
        print("REAL FORGE:", json.dumps(report))
        (data_dir / "report.json").write_text(json.dumps(report, indent=1))
        assert result.get("images"), log_text[-3000:]
        for part, name in (("clip_l", files["clip"].name), ("t5xxl", files["t5"].name), ("ae", files["ae"].name)):
            assert f"adding {part} from {name}" in log_text, log_text[-3000:]
        # Anonymous memory grown beyond the mapped file pages: CLIP-L + VAE (materialized by Forge) and activations.
        grown_private = rss["peak"] - rss["baseline"] - mapped["at_peak"]
        assert grown_private < 3 * GB, report
    sys.stdout.flush()
