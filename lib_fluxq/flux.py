"""FLUX.1 transformer facts: BFL parameter names and shapes, and the published quantization recipe.

Used by the converter (which tensors to quantize), the inspector (what a file is), the advisor and the comparison
(projected sizes of the whole model). Shapes are torch order ``(out_features, in_features)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Key that marks a BFL/ComfyUI Flux transformer (the one Forge's recogniser looks for).
FLUX_MARKER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
FORGE_PREFIX = "model.diffusion_model."

# Tensors the published GGUFs (city96) keep at high precision even when 2-D.
HIGH_PRECISION_PREFIXES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 3072
    mlp_ratio: int = 4
    heads: int = 24
    depth: int = 19          # double-stream blocks
    depth_single: int = 38   # single-stream blocks
    in_channels: int = 64    # 16 latent channels x 2x2 patch; Fill uses 384, Kontext/depth variants 128
    context_in: int = 4096   # T5-XXL width
    vec_in: int = 768        # CLIP-L pooled width
    guidance: bool = True    # dev has guidance_in, schnell does not

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * self.mlp_ratio

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance=False)


def flux_param_shapes(config: FluxConfig = FLUX_DEV) -> dict[str, tuple[int, ...]]:
    """Every parameter of a BFL Flux transformer with its torch shape, in a stable order."""
    h, m, hd = config.hidden, config.mlp_hidden, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_features: int, in_features: int) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    linear("img_in", h, config.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    if config.guidance:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("vector_in.in_layer", h, config.vec_in)
    linear("vector_in.out_layer", h, h)
    linear("txt_in", h, config.context_in)
    for i in range(config.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            linear(f"{p}_mod.lin", 6 * h, h)
            linear(f"{p}_attn.qkv", 3 * h, h)
            shapes[f"{p}_attn.norm.query_norm.scale"] = (hd,)
            shapes[f"{p}_attn.norm.key_norm.scale"] = (hd,)
            linear(f"{p}_attn.proj", h, h)
            linear(f"{p}_mlp.0", m, h)
            linear(f"{p}_mlp.2", h, m)
    for i in range(config.depth_single):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + m, h)
        linear(f"{p}.linear2", h, h + m)
        shapes[f"{p}.norm.query_norm.scale"] = (hd,)
        shapes[f"{p}.norm.key_norm.scale"] = (hd,)
        linear(f"{p}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", config.in_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def strip_prefix(name: str) -> str:
    """BFL name without Forge/ComfyUI's ``model.diffusion_model.`` prefix."""
    return name[len(FORGE_PREFIX):] if name.startswith(FORGE_PREFIX) else name


def is_quantized_by_recipe(name: str, shape: tuple[int, ...]) -> bool:
    """The published recipe: quantize the 2-D weights inside the blocks, keep everything else high precision."""
    name = strip_prefix(name)
    return (len(shape) == 2 and name.endswith(".weight") and not name.startswith(HIGH_PRECISION_PREFIXES)
            and name.startswith(("double_blocks.", "single_blocks.")))


def parameter_count(config: FluxConfig = FLUX_DEV) -> int:
    return sum(math.prod(s) for s in flux_param_shapes(config).values())
