"""Flux-family transformer geometry: BFL parameter names and shapes for FLUX.1, Chroma and FLUX.2, and the
published quantization recipe.

Used by the family table (lib_fluxq/families.py: every family's geometry is a ``FluxConfig``), the converter
(which tensors to quantize), the inspector, the advisor and the comparison (projected sizes of the whole model), and
by the tests to write header-faithful files. Shapes are torch order ``(out_features, in_features)``.

Sources for the three layouts (read, not copied):
- FLUX.1: BFL ``flux/model.py`` (19 double + 38 single blocks, width 3072, qkv bias, GELU MLP ratio 4).
- Chroma: Forge ``backend/nn/chroma.py`` ``IntegratedChromaTransformer2DModel`` — FLUX.1 blocks without any
  modulation layer, ``time_in`` / ``vector_in`` / ``guidance_in``; the modulations come from
  ``distilled_guidance_layer = Approximator(64, 3072, 5120, 5)``.
- FLUX.2: BFL ``flux2/model.py`` ``Flux2Params`` / ``Klein4BParams`` / ``Klein9BParams`` (as ported in
  ostris/ai-toolkit): no biases anywhere, SwiGLU MLP (ratio 3, first projection doubled), one model-wide
  modulation per stream (``double_stream_modulation_img/txt``, ``single_stream_modulation``), 128 input channels
  (32 latent channels, 2x2 patch packed by the VAE side), ``txt_in`` input = 3 x text-encoder hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Key that marks a BFL/ComfyUI Flux transformer (the one Forge's recogniser looks for).
FLUX_MARKER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
FORGE_PREFIX = "model.diffusion_model."

# Tensors the published GGUFs (city96) keep at high precision even when 2-D.
HIGH_PRECISION_PREFIXES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")

FLUX1, CHROMA, FLUX2 = "flux1", "chroma", "flux2"   # the three parameter layouts


@dataclass(frozen=True)
class FluxConfig:
    hidden: int = 3072
    mlp_ratio: int = 4
    heads: int = 24
    depth: int = 19          # double-stream blocks
    depth_single: int = 38   # single-stream blocks
    in_channels: int = 64    # img_in input: 16 latent channels x 2x2 patch; Fill 384, Depth/Canny 128; FLUX.2 128
    context_in: int = 4096   # txt_in input: T5-XXL width (FLUX.2: 3 x the text encoder's hidden size)
    vec_in: int = 768        # CLIP-L pooled width (FLUX.1 only)
    guidance: bool = True    # dev has guidance_in, schnell does not
    arch: str = FLUX1        # parameter layout: FLUX1, CHROMA or FLUX2
    out_channels: int = 64   # final_layer.linear output (64 for FLUX.1 / Chroma, Fill included; FLUX.2 128)
    approximator_hidden: int = 5120   # Chroma's distilled_guidance_layer width
    approximator_layers: int = 5      # ... and depth
    approximator_in: int = 64         # ... and input (16-dim timestep + 16-dim guidance + 32-dim index embeddings)

    @property
    def mlp_hidden(self) -> int:
        return self.hidden * self.mlp_ratio

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance=False)
FLUX_FILL = FluxConfig(in_channels=384)
CHROMA_HD = FluxConfig(arch=CHROMA, guidance=False)
# FLUX.2: Flux2Params (dev), Klein9BParams, Klein4BParams.
FLUX2_DEV = FluxConfig(arch=FLUX2, hidden=6144, heads=48, depth=8, depth_single=48, mlp_ratio=3, in_channels=128,
                       out_channels=128, context_in=15360, vec_in=0, guidance=True)
FLUX2_KLEIN_9B = FluxConfig(arch=FLUX2, hidden=4096, heads=32, depth=8, depth_single=24, mlp_ratio=3,
                            in_channels=128, out_channels=128, context_in=12288, vec_in=0, guidance=False)
FLUX2_KLEIN_4B = FluxConfig(arch=FLUX2, hidden=3072, heads=24, depth=5, depth_single=20, mlp_ratio=3,
                            in_channels=128, out_channels=128, context_in=7680, vec_in=0, guidance=False)


class _Shapes(dict[str, tuple[int, ...]]):
    def linear(self, name: str, out_features: int, in_features: int, bias: bool = True) -> None:
        self[f"{name}.weight"] = (out_features, in_features)
        if bias:
            self[f"{name}.bias"] = (out_features,)

    def qk_norm(self, prefix: str, head_dim: int) -> None:
        self[f"{prefix}.query_norm.scale"] = (head_dim,)
        self[f"{prefix}.key_norm.scale"] = (head_dim,)


def _flux1_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    h, m, hd = config.hidden, config.mlp_hidden, config.head_dim
    chroma = config.arch == CHROMA
    s = _Shapes()
    s.linear("img_in", h, config.in_channels)
    if chroma:
        a = config.approximator_hidden
        s.linear("distilled_guidance_layer.in_proj", a, config.approximator_in)
        for i in range(config.approximator_layers):
            s.linear(f"distilled_guidance_layer.layers.{i}.in_layer", a, a)
            s.linear(f"distilled_guidance_layer.layers.{i}.out_layer", a, a)
        for i in range(config.approximator_layers):
            s[f"distilled_guidance_layer.norms.{i}.scale"] = (a,)
        s.linear("distilled_guidance_layer.out_proj", h, a)
    else:
        s.linear("time_in.in_layer", h, 256)
        s.linear("time_in.out_layer", h, h)
        if config.guidance:
            s.linear("guidance_in.in_layer", h, 256)
            s.linear("guidance_in.out_layer", h, h)
        s.linear("vector_in.in_layer", h, config.vec_in)
        s.linear("vector_in.out_layer", h, h)
    s.linear("txt_in", h, config.context_in)
    for i in range(config.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            if not chroma:
                s.linear(f"{p}_mod.lin", 6 * h, h)
            s.linear(f"{p}_attn.qkv", 3 * h, h)
            s.qk_norm(f"{p}_attn.norm", hd)
            s.linear(f"{p}_attn.proj", h, h)
            s.linear(f"{p}_mlp.0", m, h)
            s.linear(f"{p}_mlp.2", h, m)
    for i in range(config.depth_single):
        p = f"single_blocks.{i}"
        s.linear(f"{p}.linear1", 3 * h + m, h)
        s.linear(f"{p}.linear2", h, h + m)
        s.qk_norm(f"{p}.norm", hd)
        if not chroma:
            s.linear(f"{p}.modulation.lin", 3 * h, h)
    s.linear("final_layer.linear", config.out_channels, h)
    if not chroma:
        s.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return dict(s)


def _flux2_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    h, m, hd = config.hidden, config.mlp_hidden, config.head_dim
    s = _Shapes()
    s.linear("img_in", h, config.in_channels, bias=False)
    s.linear("time_in.in_layer", h, 256, bias=False)
    s.linear("time_in.out_layer", h, h, bias=False)
    if config.guidance:
        s.linear("guidance_in.in_layer", h, 256, bias=False)
        s.linear("guidance_in.out_layer", h, h, bias=False)
    s.linear("txt_in", h, config.context_in, bias=False)
    for i in range(config.depth):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            s.linear(f"{p}_attn.qkv", 3 * h, h, bias=False)
            s.qk_norm(f"{p}_attn.norm", hd)
            s.linear(f"{p}_attn.proj", h, h, bias=False)
            s.linear(f"{p}_mlp.0", 2 * m, h, bias=False)      # SwiGLU: gate and value in one projection
            s.linear(f"{p}_mlp.2", h, m, bias=False)
    for i in range(config.depth_single):
        p = f"single_blocks.{i}"
        s.linear(f"{p}.linear1", 3 * h + 2 * m, h, bias=False)
        s.linear(f"{p}.linear2", h, h + m, bias=False)
        s.qk_norm(f"{p}.norm", hd)
    s.linear("double_stream_modulation_img.lin", 6 * h, h, bias=False)
    s.linear("double_stream_modulation_txt.lin", 6 * h, h, bias=False)
    s.linear("single_stream_modulation.lin", 3 * h, h, bias=False)
    s.linear("final_layer.linear", config.out_channels, h, bias=False)
    s.linear("final_layer.adaLN_modulation.1", 2 * h, h, bias=False)
    return dict(s)


_LAYOUTS: dict[str, Callable[[FluxConfig], dict[str, tuple[int, ...]]]] = {
    FLUX1: _flux1_shapes, CHROMA: _flux1_shapes, FLUX2: _flux2_shapes}


def flux_param_shapes(config: FluxConfig = FLUX_DEV) -> dict[str, tuple[int, ...]]:
    """Every parameter of a BFL-named Flux-family transformer with its torch shape, in a stable order."""
    try:
        return _LAYOUTS[config.arch](config)
    except KeyError:
        raise ValueError(f"unknown Flux layout {config.arch!r}; one of {', '.join(_LAYOUTS)}") from None


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
