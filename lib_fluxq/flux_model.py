"""A minimal FLUX.1 transformer in plain torch, with BFL semantics and BFL parameter names.

A BFL/ComfyUI/Forge state dict (prefix stripped) loads with ``load_state_dict``: ``DoubleStreamBlock`` and
``SingleStreamBlock`` match ``double_blocks.N.*`` / ``single_blocks.N.*``, ``FluxTransformer`` the whole model.
Every projection is a plain ``nn.Linear``, so ``lib_fluxq.ops.swap_quantized_linears`` can replace them with
quantized Linears. Used by ``compare`` (reference vs quantized blocks) and by end-to-end tests of the engine.

Shapes: ``img`` (B, L_img, hidden), ``txt`` (B, L_txt, hidden), ``vec`` (B, hidden); ``pe`` is the rotary table
from :func:`rope_embedding` over the ids of ``cat(txt, img)`` — text first, as in BFL's forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lib_fluxq.flux import FLUX_DEV, FluxConfig

# Rotary axes (t, h, w) split the 128-dim head; BFL's values for every FLUX.1 model.
ROPE_AXES_DIM = (16, 56, 56)
ROPE_THETA = 10_000
TIMESTEP_DIM = 256
LATENT_DOWNSCALE = 8   # VAE: 8 pixels per latent
PATCH = 2              # 2x2 latent patches per image token


# ----------------------------------------------------------------------------------------------- positional / time


def rope_embedding(ids: torch.Tensor, axes_dim: tuple[int, ...] = ROPE_AXES_DIM,
                   theta: int = ROPE_THETA) -> torch.Tensor:
    """(B, L, n_axes) position ids -> (B, 1, L, head_dim/2, 2, 2) rotation matrices, float32 (BFL's ``EmbedND``)."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} axes, axes_dim {axes_dim} has {len(axes_dim)}")
    per_axis = []
    for axis, dim in enumerate(axes_dim):
        # float64 for the angles: positions x frequencies loses precision in float32 at large positions.
        scale = torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim
        omega = 1.0 / (theta ** scale)
        angles = ids[..., axis].to(torch.float64)[..., None] * omega          # (B, L, dim/2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        rotation = torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*angles.shape, 2, 2)
        per_axis.append(rotation.float())
    return torch.cat(per_axis, dim=-3).unsqueeze(1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate consecutive pairs of q/k channels by ``pe`` (computed in float32, returned in the input dtype)."""
    def rotate(x: torch.Tensor) -> torch.Tensor:
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        return out.reshape(*x.shape).type_as(x)
    return rotate(q), rotate(k)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) q/k/v -> (B, L, H*D) after RoPE and softmax attention."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


def timestep_embedding(t: torch.Tensor, dim: int = TIMESTEP_DIM, max_period: int = 10_000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (BFL scales by 1000 first); [cos | sin] halves."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def image_ids(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Position ids (t=0, row, col) of the image tokens of a ``height`` x ``width`` pixel image: (B, L_img, 3)."""
    rows, cols = image_token_grid(height, width)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(1, rows * cols, 3).repeat(batch, 1, 1)


def text_ids(length: int, batch: int = 1) -> torch.Tensor:
    """Text tokens all sit at position 0 on every axis (BFL): (B, L_txt, 3) zeros."""
    return torch.zeros(batch, length, 3)


def image_token_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of image tokens for a pixel size: 8x VAE downscale, then 2x2 patches."""
    step = LATENT_DOWNSCALE * PATCH
    if height % step or width % step or height <= 0 or width <= 0:
        raise ValueError(f"Flux resolutions are positive multiples of {step} pixels, got {width}x{height}")
    return height // step, width // step


# ----------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds ``qkv``, ``norm`` and ``proj``; the double block drives them (joint attention over both streams)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, hidden) -> normalised q, k and v, each (B, H, L, D)."""
        q, k, v = _split_qkv(self.qkv(x), self.heads)
        q, k = self.norm(q, k, v)
        return q, k, v


def _split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H*D) laid out (K H D) -> three (B, H, L, D)."""
    batch, length, width = qkv.shape
    qkv = qkv.reshape(batch, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class Modulation(nn.Module):
    """``lin(silu(vec))`` split into (shift, scale, gate) triples: two for a double block, one for a single."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [tuple(chunks[i:i + 3]) for i in range(0, self.multiplier, 3)]


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    # Indices 0 and 2 are the BFL names (img_mlp.0 / img_mlp.2).
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


def _layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention (BFL ``DoubleStreamBlock``)."""

    def __init__(self, hidden: int = FLUX_DEV.hidden, heads: int = FLUX_DEV.heads,
                 mlp_ratio: int = FLUX_DEV.mlp_ratio) -> None:
        super().__init__()
        self.hidden, self.heads = hidden, heads
        mlp_hidden = hidden * mlp_ratio
        for stream in ("img", "txt"):
            self.add_module(f"{stream}_mod", Modulation(hidden, double=True))
            self.add_module(f"{stream}_norm1", _layer_norm(hidden))
            self.add_module(f"{stream}_attn", SelfAttention(hidden, heads))
            self.add_module(f"{stream}_norm2", _layer_norm(hidden))
            self.add_module(f"{stream}_mlp", _mlp(hidden, mlp_hidden))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.split_heads((1 + img_scale1) * self.img_norm1(img) + img_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.split_heads((1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1)
        joint = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                          torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over ``cat(txt, img)``; attention and MLP in parallel from one fused ``linear1`` (BFL)."""

    def __init__(self, hidden: int = FLUX_DEV.hidden, heads: int = FLUX_DEV.heads,
                 mlp_ratio: int = FLUX_DEV.mlp_ratio) -> None:
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.mlp_hidden = hidden * mlp_ratio
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = _layer_norm(hidden)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        fused = self.linear1((1 + scale) * self.pre_norm(x) + shift)
        qkv, mlp = torch.split(fused, [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = _split_qkv(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=2))
        return x + gate * out


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = _layer_norm(hidden)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class FluxConditioning(nn.Module):
    """The conditioning vector ``vec`` = time_in(t) [+ guidance_in(g)] + vector_in(pooled CLIP).

    Its parameter names are the BFL top-level ones, so the conditioning part of a checkpoint loads on its own.
    """

    def __init__(self, config: FluxConfig = FLUX_DEV) -> None:
        super().__init__()
        self.time_in = MLPEmbedder(TIMESTEP_DIM, config.hidden)
        self.vector_in = MLPEmbedder(config.vec_in, config.hidden)
        self.guidance_in = MLPEmbedder(TIMESTEP_DIM, config.hidden) if config.guidance else None

    def forward(self, timesteps: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        return conditioning_vector(self, timesteps, pooled, guidance)


def conditioning_vector(owner: nn.Module, timesteps: torch.Tensor, pooled: torch.Tensor,
                        guidance: torch.Tensor | None) -> torch.Tensor:
    """``vec`` from ``owner``'s time_in / guidance_in / vector_in (BFL ``Flux.forward``)."""
    vec = owner.time_in(timestep_embedding(timesteps).to(pooled.dtype))
    if owner.guidance_in is not None:
        if guidance is None:
            raise ValueError("this is a guidance-distilled (dev) model: pass a guidance value")
        vec = vec + owner.guidance_in(timestep_embedding(guidance).to(pooled.dtype))
    return vec + owner.vector_in(pooled)


class FluxTransformer(nn.Module):
    """The whole transformer (BFL ``Flux``): packed latents + T5 tokens + pooled CLIP -> velocity per token."""

    def __init__(self, config: FluxConfig = FLUX_DEV) -> None:
        super().__init__()
        self.config = config
        if config.hidden // config.heads != sum(ROPE_AXES_DIM):
            raise ValueError(f"head dim {config.hidden // config.heads} must equal sum{ROPE_AXES_DIM}")
        self.img_in = nn.Linear(config.in_channels, config.hidden)
        self.txt_in = nn.Linear(config.context_in, config.hidden)
        self.time_in = MLPEmbedder(TIMESTEP_DIM, config.hidden)
        self.vector_in = MLPEmbedder(config.vec_in, config.hidden)
        self.guidance_in = MLPEmbedder(TIMESTEP_DIM, config.hidden) if config.guidance else None
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(config.hidden, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config.hidden, config.heads, config.mlp_ratio) for _ in range(config.depth_single))
        self.final_layer = LastLayer(config.hidden, config.in_channels)

    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        img = self.img_in(img)
        txt = self.txt_in(txt)
        vec = conditioning_vector(self, timesteps, pooled, guidance)
        pe = rope_embedding(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class BlockInputs:
    """What a block sees: image and text tokens, the conditioning vector and the rotary table of cat(txt, img)."""

    img: torch.Tensor   # (B, L_img, hidden)
    txt: torch.Tensor   # (B, L_txt, hidden)
    vec: torch.Tensor   # (B, hidden)
    pe: torch.Tensor    # (B, 1, L_txt + L_img, head_dim/2, 2, 2)

    @property
    def joint(self) -> torch.Tensor:
        """The single blocks' input: text tokens first, then image tokens."""
        return torch.cat((self.txt, self.img), dim=1)


def deterministic_inputs(hidden: int, height: int, width: int, text_tokens: int, seed: int = 0,
                         conditioning: FluxConditioning | None = None, timestep: float = 0.5,
                         guidance: float = 3.5, vec_in: int = FLUX_DEV.vec_in) -> BlockInputs:
    """The same inputs every run: unit-Gaussian tokens (seeded), positions for the resolution, and ``vec``.

    ``vec`` comes from the checkpoint's own time_in / guidance_in / vector_in when ``conditioning`` is given
    (timestep ``timestep``, guidance ``guidance``, a seeded Gaussian pooled CLIP vector), else a seeded Gaussian.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, cols = image_token_grid(height, width)
    img = torch.randn(1, rows * cols, hidden, generator=gen)
    txt = torch.randn(1, text_tokens, hidden, generator=gen)
    pooled = torch.randn(1, vec_in, generator=gen)
    if conditioning is not None:
        with torch.no_grad():
            vec = conditioning(torch.tensor([timestep]), pooled, torch.tensor([guidance]))
    else:
        vec = torch.randn(1, hidden, generator=gen)
    pe = rope_embedding(torch.cat((text_ids(text_tokens), image_ids(height, width)), dim=1))
    return BlockInputs(img=img, txt=txt, vec=vec, pe=pe)
