"""The advisor: from this machine's VRAM and RAM to a quant level, a resolution, Forge's "GPU Weights (MB)" value and
a text-encoder plan — with the reason and the numbers behind every choice.

Modules: ``calibration`` (the memory and speed models and their constants, with sources), ``model`` (weight levels and
what they cost for a model's geometry), ``gpus`` (card specs), ``plan`` (the Planner: choices and file verdicts),
``render`` (text / JSON), ``cli`` (``python -m lib_fluxq advise``). Other modules import from here.
"""

from lib_fluxq.advisor.calibration import *  # noqa: F403  (the named constants, for callers and tests)
from lib_fluxq.advisor.cli import add_arguments, run
from lib_fluxq.advisor.gpus import GPU_PROFILES, GpuProfile, find_gpu_profile, profile_for_vram
from lib_fluxq.advisor.model import (
    LEVELS,
    T5_OPTIONS,
    WeightLevel,
    activation_bytes,
    flux_step_flops,
    forge_activation_bytes,
    image_tokens,
    largest_layer_elements,
    quantized_parameters,
    resolve_level,
    sdcpp_params_bytes,
    t5_bytes,
    transformer_bytes,
    vae_decode_bytes,
)
from lib_fluxq.advisor.plan import (
    Advice,
    Choice,
    FileVerdict,
    LevelEstimate,
    ModelFile,
    Planner,
    advise,
    family_vram_gb,
    files_from_reports,
    gpu_weights_mb_for_file,
    gpu_weights_mb_for_loaded_model,
    scan_models,
    transformer_vram_gb,
)
from lib_fluxq.advisor.render import render_json, render_text
from lib_fluxq.flux import FLUX_DEV, FLUX_SCHNELL

__all__ = [
    "FLUX_DEV", "FLUX_SCHNELL", "GPU_PROFILES", "LEVELS", "T5_OPTIONS", "Advice", "Choice", "FileVerdict",
    "GpuProfile", "LevelEstimate", "ModelFile", "Planner", "WeightLevel", "activation_bytes", "add_arguments",
    "advise", "family_vram_gb", "files_from_reports", "find_gpu_profile", "flux_step_flops", "forge_activation_bytes",
    "gpu_weights_mb_for_file", "gpu_weights_mb_for_loaded_model", "image_tokens", "largest_layer_elements",
    "profile_for_vram", "quantized_parameters", "render_json", "render_text", "resolve_level", "run",
    "scan_models", "sdcpp_params_bytes", "t5_bytes", "transformer_bytes", "transformer_vram_gb",
    "vae_decode_bytes",
]
