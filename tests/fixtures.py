"""Checkpoints the tests build themselves: Flux-shaped models with real BFL names and random weights, written as
real files by the reference libraries (gguf-py's GGUFWriter, safetensors, ggml's quantizer) — never by our code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

from lib_fluxq.flux import FluxConfig, flux_param_shapes, is_quantized_by_recipe
from tests import ggml_ref

# Smallest Flux that keeps real names, head_dim 128 and K-quant-compatible rows (every row a multiple of 256).
SMALL_FLUX = FluxConfig(hidden=256, heads=2, depth=2, depth_single=2, context_in=512, vec_in=256)


def random_flux_state_dict(config: FluxConfig = SMALL_FLUX, seed: int = 0, dtype: torch.dtype = torch.float32,
                           prefix: str = "") -> dict[str, torch.Tensor]:
    """Weights ~ N(0, 1/fan_in) with a few heavy outlier columns, biases small, norm scales ~ 1."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in flux_param_shapes(config).items():
        if name.endswith(".scale"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            outliers = torch.randint(0, shape[1], (max(1, shape[1] // 128),), generator=gen)
            t[:, outliers] *= 8.0
        sd[prefix + name] = t.to(dtype)
    return sd


def write_safetensors(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def recipe_qtype(qtype: gguf.GGMLQuantizationType) -> Callable[[str, tuple[int, ...]], gguf.GGMLQuantizationType]:
    """city96's recipe: block 2-D weights in ``qtype``, 1-D tensors F32, the rest F16."""
    def choose(name: str, shape: tuple[int, ...]) -> gguf.GGMLQuantizationType:
        if is_quantized_by_recipe(name, shape):
            return qtype
        return gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16
    return choose


def write_gguf(path: Path, sd: dict[str, torch.Tensor],
               choose: Callable[[str, tuple[int, ...]], gguf.GGMLQuantizationType],
               arch: str | None = "flux") -> dict[str, np.ndarray]:
    """Write ``sd`` as GGUF with gguf-py, quantizing with ggml's C quantizer. Returns the packed bytes per tensor."""
    writer = gguf.GGUFWriter(str(path), arch=arch or "flux")
    if arch is None:  # sd.cpp-style files carry no general.architecture
        writer.kv_data[0].pop("general.architecture", None)
    packed: dict[str, np.ndarray] = {}
    for name, tensor in sd.items():
        shape = tuple(tensor.shape)
        qtype = choose(name, shape)
        values = tensor.float().numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            data = values.astype(np.float32)
        elif qtype == gguf.GGMLQuantizationType.F16:
            data = values.astype(np.float16)
        else:
            data = ggml_ref.quantize(values.reshape(-1, shape[-1]), qtype)
        packed[name] = data
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return packed


def diffusers_state_dict(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own BFL -> diffusers conversion. It hard-codes FLUX.1's widths (3072, 12288) for the single-block
    split, so for the small test model its torch.split sees the same proportions (q, k, v = h each, mlp = 4h)."""
    from diffusers.loaders import single_file_utils

    real_split = torch.split

    def split(tensor, sizes, dim=0):
        if isinstance(sizes, tuple) and sum(sizes) != tensor.shape[dim]:
            h = tensor.shape[dim] // 7
            sizes = (h, h, h, 4 * h)
        return real_split(tensor, sizes, dim=dim)

    shim = type("TorchShim", (), {"__getattr__": lambda self, name: getattr(torch, name),
                                  "split": staticmethod(split)})()
    original = single_file_utils.torch
    single_file_utils.torch = shim
    try:
        return single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    finally:
        single_file_utils.torch = original


def drop_root_permission_override() -> None:
    """``preexec_fn`` for a child process: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    that the program it executes, when run by root (as in CI), meets permission bits like any user. A no-op for other
    users."""
    import ctypes
    import os

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
