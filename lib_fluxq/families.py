"""The family table: every Flux-family model, companion part and storage format fluxq knows — as data.

Nothing outside this module branches per family; inspect, pairing, the missing-files message, the download catalog,
the advisor, convert and the tab read these rows. Adding a family is one ``Family`` row (plus its test files).

How to use it::

    from lib_fluxq import families as F
    fam = F.family("flux2-klein-4b")          # Family row: title, geometry, companions, hosts, defaults
    fam.geometry                              # lib_fluxq.flux.FluxConfig (hidden, heads, blocks, in/out channels)
    fam.parameters                            # parameter count, computed from the geometry
    [F.companion(p).title for p in fam.companions]   # ['Qwen3-4B text encoder', 'FLUX.2 VAE (32 ch)']
    F.companion("t5xxl").downloads[0].url     # exact Hugging Face file, with size and licence
    fam.hosts["neo"]                          # Support(runs=True, note=...)
    F.fmt("svdq-int4").hosts["neo"].note      # which host runs a storage format, and what it needs

To classify a file, use ``lib_fluxq.classify.classify_file(path)``: it evaluates the ``Signature`` of every row
below against the file's header (tensor names, shapes, dtypes and metadata — never tensor data).

Signature keys are matched as *name suffixes* at a dot boundary, so every prefix a tool puts in front of the names
("model.diffusion_model.", "net.", "model.", "vae.", "text_encoders.t5xxl.transformer.", "first_stage_model.") is
covered. ``"a | b"`` means either key; ``*`` in a key matches one run of digits (a block index).

Sources (read through the search tools or on a local checkout, never copied): ComfyUI ``comfy/model_detection.py``,
``comfy/sd.py detect_te_model``, ``comfy/quant_ops.py``; city96/ComfyUI-GGUF ``loader.py`` / ``tools/convert.py``;
black-forest-labs/flux2 ``model.py`` (via ostris/ai-toolkit's port); InvokeAI ``configs/{flux2_variant,
qwen3_encoder,mistral_encoder,vae}.py``; Forge dfdcbab6 (``/tmp/forge``: ``backend/loader.py``,
``backend/nn/chroma.py``, ``backend/operations.py``, huggingface_guess ``detection.py``); Forge Neo 2.26
(``/tmp/neo``: ``backend/loader.py``, ``backend/state_dict.py``, ``backend/quant_ops.py``, ``backend/nn/svdq.py``,
``modules_forge/packages/huggingface_guess/{detection,model_list}.py``); nunchaku ``src/FluxModel.cpp``,
``src/Linear.cpp``. Sizes are the Hugging Face file listings (``size_source="published"``) unless marked
``"estimated"``. Details with sources per row: ../shared/FAMILY_NOTES.md and docs/families.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from lib_fluxq.flux import (
    CHROMA_HD,
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX_DEV,
    FLUX_FILL,
    FLUX_SCHNELL,
    FluxConfig,
    parameter_count,
)

GiB = 1024**3

# ------------------------------------------------------------------------------------------------------ vocabulary

HOSTS: dict[str, str] = {"forge": "Forge (dfdcbab6)", "neo": "Forge Neo (2.26)", "a1111": "A1111 (1.10)"}
# The WebUI models subfolder each kind of file goes in (Forge / Neo / A1111 names; ComfyUI's in docs/families.md).
FOLDERS: dict[str, str] = {"transformer": "Stable-diffusion", "text_encoder": "text_encoder", "vae": "VAE"}

DEV_LICENCE = "FLUX.1 [dev] Non-Commercial License"
FLUX2_DEV_LICENCE = "FLUX.2 [dev] Non-Commercial License"
FLUX_NC_LICENCE = "FLUX Non-Commercial License"
APACHE = "Apache-2.0"
MIT = "MIT"


@dataclass(frozen=True)
class Support:
    """Whether a host runs something, and the condition or reason (one short sentence)."""

    runs: bool
    note: str = ""

    def text(self) -> str:
        return ("yes" if self.runs else "no") + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class Signature:
    """How to tell a row from the header alone.

    present: every entry must exist (an entry is "key" or "key | key" = any of them).
    absent:  no key of any entry may exist.
    dims:    (keys, axis, allowed): some tensor matching ``keys`` has ``shape[axis]`` in ``allowed`` (a tuple of
             sizes or a ``range``); torch order, axis -1 = input features.
    """

    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    dims: tuple[tuple[str, int, tuple[int, ...] | range], ...] = ()


@dataclass(frozen=True)
class Download:
    """One file on the Hugging Face Hub: exact repository and path, size, licence."""

    repo: str
    path: str                      # path inside the repository
    size_gb: float                 # decimal GB
    licence: str
    precision: str                 # what it holds: bf16, fp16, fp8, fp8 mixed, Q8_0, NF4 v2, SVDQ INT4, ...
    size_source: str = "published"  # "published" (the Hub's listing) or "estimated" (same layout elsewhere)
    gated: bool = False             # the repository asks you to accept its licence (token needed)
    note: str = ""

    @property
    def filename(self) -> str:
        return os.path.basename(self.path)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.path}"


@dataclass(frozen=True)
class Companion:
    """A part a transformer-only file needs from another file: a text encoder or a VAE."""

    key: str
    title: str
    kind: str                      # "text_encoder" | "vae" (FOLDERS gives the WebUI folder)
    signature: Signature
    size_key: str                  # the dimension that identifies it (hidden size / latent channels) ...
    size: int                      # ... and its value
    formats: str                   # acceptable precisions and layouts, for people
    downloads: tuple[Download, ...] = ()   # first = the default recommendation
    # Prefer a full-precision file when at least this much RAM is free (else fp8 / GGUF first); None: any.
    full_precision_min_free_ram: int | None = None
    # A weight whose dtype tells the part's precision (norms stay bf16 in fp8 files); default: the signature's.
    precision_key: str | None = None

    @property
    def folder(self) -> str:
        return FOLDERS[self.kind]


@dataclass(frozen=True)
class Family:
    """A diffusion model family: how its transformer (or UNet) looks, what it needs, who runs it."""

    key: str
    title: str
    arch: str                      # "flux1" | "chroma" | "flux2" | "sd"
    signature: Signature
    companions: tuple[str, ...]    # parts to pair with a transformer-only file (Companion keys)
    accepts: frozenset[str]        # parts a separately selected module may bring (others are left out)
    hosts: Mapping[str, Support]
    geometry: FluxConfig | None = None
    latent_channels: int | None = None
    resolutions: tuple[tuple[int, int], ...] = ()
    steps: int | None = None
    cfg: float | None = None               # real CFG scale
    distilled_cfg: float | None = None     # FLUX.1 dev-style guidance embedding ("Distilled CFG Scale" in Forge)
    licence: str = ""
    source: str = ""                       # the original Hugging Face repository
    transformers: tuple[Download, ...] = ()  # known transformer files (the download catalog)
    same_weights_as: str | None = None     # content cannot tell this family from that one ...
    name_hints: tuple[str, ...] = ()       # ... so a regex over the lower-case file name decides,
    metadata_hints: tuple[tuple[str, str], ...] = ()  # ... after metadata (key, lower-case value substring)
    accepts_if_missing: frozenset[str] = frozenset()  # parts a module may bring only if the checkpoint lacks them
    fallback: bool = False                 # matched only when no other row of the architecture matches
    note: str = ""

    @property
    def parameters(self) -> int | None:
        return parameter_count(self.geometry) if self.geometry is not None else None

    @property
    def needs_companions(self) -> bool:
        return bool(self.companions)


@dataclass(frozen=True)
class Format:
    """A storage format found in models/Stable-diffusion: how the header marks it and which host runs it."""

    key: str
    title: str
    marked: str                    # how the header marks it (for people; the classifier implements it)
    hosts: Mapping[str, Support]
    quantized: bool = True
    # Architectures a host runs in this format (empty: any): Neo loads SVDQuant files only as FLUX.1.
    archs: tuple[str, ...] = ()
    # CUDA compute capabilities (x10, inclusive range) the format's kernels are built for; None: any device.
    cuda_sm: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------------- signatures

# FLUX.1 / Chroma / FLUX.2 share BFL block names. Alternatives cover diffusers names and Nunchaku's SVDQuant files
# (diffusers-style names with qweight; ComfyUI fork and Neo detect "single_transformer_blocks.0.mlp_fc1.qweight").
_QK_NORM = ("double_blocks.0.img_attn.norm.key_norm.scale | double_blocks.0.img_attn.norm.key_norm.weight"
            " | single_transformer_blocks.0.attn.norm_k.weight | single_transformer_blocks.0.mlp_fc1.qweight")
_IMG_IN = "img_in.weight | x_embedder.weight"
_TXT_IN = "txt_in.weight | context_embedder.weight"
_VEC_IN = "vector_in.in_layer.weight | time_text_embed.text_embedder.linear_1.weight"   # CLIP-L pooled input
_GUIDANCE = ("guidance_in.in_layer.weight | time_text_embed.guidance_embedder.linear_1.weight"
             " | time_guidance_embed.guidance_embedder.linear_1.weight")   # BFL | diffusers FLUX.1 | diffusers FLUX.2
GUIDANCE_KEYS = _GUIDANCE
_FLUX2 = "double_stream_modulation_img.lin.weight | double_stream_modulation_img.linear.weight"
_CHROMA = ("distilled_guidance_layer.in_proj.weight | distilled_guidance_layer.norms.0.scale"
           " | distilled_guidance_layer.norms.0.weight | distilled_guidance_layer.0.norms.0.scale"
           " | distilled_guidance_layer.layers.0.in_layer.weight")
_ANY_FLUX = f"{_QK_NORM} | {_FLUX2} | {_CHROMA} | double_blocks.0.img_attn.qkv.weight"


def _flux1(in_channels: int, guidance: bool | None) -> Signature:
    # ComfyUI model_detection: FLUX.1 = key_norm + img_in, no double_stream_modulation_img; dev vs schnell by
    # guidance_in (also InvokeAI, diffusers); Fill by img_in in-features 384 (diffusers "flux-fill", sd.cpp).
    # vector_in (CLIP-L pooled) is what separates FLUX.1 from Chroma (Forge chroma.py has none).
    present = (_QK_NORM, _IMG_IN, _VEC_IN) + ((_GUIDANCE,) if guidance else ())
    absent = (_FLUX2,) + ((_GUIDANCE,) if guidance is False else ())
    return Signature(present=present, absent=absent, dims=((_IMG_IN, -1, (in_channels,)),))


def _flux2(context_in: int | None, guidance: bool | None) -> Signature:
    # FLUX.2 = double_stream_modulation_img (ComfyUI, sd.cpp); variant by txt_in in-features = 3 x the text
    # encoder's hidden size (InvokeAI flux2_variant.py: 7680 / 12288 / 15360); dev alone has guidance_in.
    present = (_FLUX2, _TXT_IN) + ((_GUIDANCE,) if guidance else ())
    absent = (_GUIDANCE,) if guidance is False else ()
    dims = ((_TXT_IN, -1, (context_in,)),) if context_in else ()
    return Signature(present=present, absent=absent, dims=dims)


_SD_CROSS_ATTN = ("input_blocks.*.1.transformer_blocks.0.attn2.to_k.weight"
                  " | down_blocks.*.attentions.0.transformer_blocks.0.attn2.to_k.weight")


def _sd_unet(context: int) -> Signature:
    # Forge's own test (backend/loader.py legacy_test_key): the cross-attention width 768 / 1024 / 1280 / 2048.
    return Signature(present=(_SD_CROSS_ATTN,), absent=(_ANY_FLUX,), dims=((_SD_CROSS_ATTN, -1, (context,)),))


# ---------------------------------------------------------------------------------------------------- companions

_T5_K = "encoder.block.0.layer.0.SelfAttention.k.weight | enc.blk.0.attn_k.weight"  # HF names | city96 GGUF names
_LLM_NORM = "layers.0.post_attention_layernorm.weight | blk.0.ffn_norm.weight"      # HF | llama.cpp GGUF names
_LLM_QK_NORM = "layers.0.self_attn.q_norm.weight | blk.0.attn_q_norm.weight"        # Qwen3 has it, Mistral not
_LLM_EMBED = "embed_tokens.weight | token_embd.weight"
_LLM_K_PROJ = "layers.0.self_attn.k_proj.weight | blk.0.attn_k.weight"
_VAE_IN = "decoder.conv_in.weight"
_CLIP_WIDTH = ("text_model.final_layer_norm.weight | text_model.encoder.layers.0.layer_norm1.bias"
               " | text_model.encoder.layers.0.layer_norm1.weight | transformer.resblocks.0.ln_1.bias"
               " | ln_final.weight")


def _clip(width: int) -> Signature:
    # ComfyUI detect_te_model / Forge: CLIP-L is the 768-wide CLIP text model (CLIP-G 1280, CLIP-H 1024).
    return Signature(dims=((_CLIP_WIDTH, 0, (width,)),))


def _qwen3(hidden: int) -> Signature:
    # ComfyUI detect_te_model: Qwen3 has self_attn.q_norm (Qwen2 has not); size by hidden (InvokeAI
    # qwen3_encoder.py: 2560 = 4B, 4096 = 8B). GGUF: city96 LLAMA_SD_MAP / llama.cpp names.
    return Signature(present=(_LLM_QK_NORM,), dims=((_LLM_NORM, 0, (hidden,)),))


COMPANIONS: dict[str, Companion] = {c.key: c for c in (
    Companion(
        "clip_l", "CLIP-L text encoder", "text_encoder", _clip(768), "hidden", 768,
        "fp16 / fp32 safetensors (HF names, or open_clip names inside SD checkpoints)",
        downloads=(Download("comfyanonymous/flux_text_encoders", "clip_l.safetensors", 0.25, MIT, "fp16"),)),
    Companion(
        "t5xxl", "T5-XXL text encoder", "text_encoder",
        Signature(present=(_T5_K,)), "hidden", 4096,
        "fp16 / bf16 safetensors, fp8 e4m3fn (plain or Comfy 'scaled'), city96 GGUF (t5encoder, enc.blk.* names)",
        downloads=(
            Download("comfyanonymous/flux_text_encoders", "t5xxl_fp8_e4m3fn.safetensors", 4.89, APACHE, "fp8",
                     note="for less than 32 GB of free RAM"),
            Download("comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors", 9.79, APACHE, "fp16",
                     note="best prompt fidelity; wants 32 GB of free RAM"),
            Download("city96/t5-v1_1-xxl-encoder-gguf", "t5-v1_1-xxl-encoder-Q8_0.gguf", 5.06, APACHE, "Q8_0",
                     note="GGUF; Q5_K_M (3.39 GB) and smaller in the same repository"),
        ),
        # Forge-measured rule kept from the first pairing: a 9.5 GB fp16 T5 next to the transformer swaps below it.
        full_precision_min_free_ram=32 * GiB),
    Companion(
        "qwen3_4b", "Qwen3-4B text encoder", "text_encoder", _qwen3(2560), "hidden", 2560,
        "bf16 safetensors (HF or Comfy names), Comfy fp8/fp4 mixed (Neo), GGUF arch qwen3 (Neo)",
        precision_key=_LLM_K_PROJ,
        downloads=(
            Download("Comfy-Org/Flux-2-Klein-4B", "split_files/text_encoders/qwen_3_4b.safetensors", 8.04, APACHE,
                     "bf16"),
        ),
        # Same ratio as T5's rule (free RAM >= ~3x the full-precision file), not measured separately.
        full_precision_min_free_ram=24 * GiB),
    Companion(
        "qwen3_8b", "Qwen3-8B text encoder", "text_encoder", _qwen3(4096), "hidden", 4096,
        "bf16 safetensors, Comfy fp8/fp4 mixed (Neo), GGUF arch qwen3 (Neo)", precision_key=_LLM_K_PROJ,
        downloads=(
            Download("Comfy-Org/Flux-2-Klein-9B", "split_files/text_encoders/qwen_3_8b_fp8mixed.safetensors", 8.07,
                     APACHE, "fp8 mixed", size_source="estimated", note="Comfy mixed fp8: Forge Neo"),
            Download("Comfy-Org/Flux-2-Klein-9B", "split_files/text_encoders/qwen_3_8b.safetensors", 16.4, APACHE,
                     "bf16"),
        ),
        full_precision_min_free_ram=48 * GiB),
    Companion(
        "mistral3_24b", "Mistral-Small-3 24B text encoder", "text_encoder",
        # ComfyUI detect_te_model: hidden 5120 without q_norm; InvokeAI mistral_encoder.py adds vocab >= 100000
        # (Llama-2-13B shares the geometry). 40 layers = Mistral-Small 3.x, 30 = BFL's pruned FLUX.2 encoder.
        Signature(absent=(_LLM_QK_NORM,), dims=((_LLM_NORM, 0, (5120,)), (_LLM_EMBED, 0, range(100_000, 1 << 24)))),
        "hidden", 5120,
        "bf16 / fp8 safetensors (40-layer Mistral-Small 3.x or the 30-layer FLUX.2 cut), GGUF arch llama",
        precision_key=_LLM_K_PROJ,
        downloads=(
            Download("Comfy-Org/flux2-dev", "split_files/text_encoders/mistral_3_small_flux2_fp8.safetensors", 18.0,
                     APACHE, "fp8"),
            Download("Comfy-Org/flux2-dev", "split_files/text_encoders/mistral_3_small_flux2_bf16.safetensors", 35.6,
                     APACHE, "bf16"),
            Download("unsloth/Mistral-Small-3.1-24B-Instruct-2503-GGUF",
                     "Mistral-Small-3.1-24B-Instruct-2503-Q4_K_M.gguf", 14.3, APACHE, "Q4_K_M",
                     note="GGUF of the full 40-layer model (FLUX.2 was trained with Mistral-Small 3.1)"),
        ),
        full_precision_min_free_ram=112 * GiB),
    Companion(
        "ae", "FLUX.1 VAE (ae, 16 ch)", "vae",
        # ComfyUI sd.py: z_channels = decoder.conv_in in-channels; InvokeAI vae.py: 16 -> FLUX.1. SD3's VAE has the
        # same shapes: content cannot tell them apart.
        Signature(dims=((_VAE_IN, 1, (16,)),)), "latent channels", 16,
        "fp32 / bf16 / fp16 safetensors, BFL (ldm) or diffusers names",
        downloads=(Download("black-forest-labs/FLUX.1-schnell", "ae.safetensors", 0.34, APACHE, "fp32",
                            note="works for every FLUX.1 model and Chroma"),)),
    Companion(
        "flux2_vae", "FLUX.2 VAE (32 ch)", "vae",
        # BFL flux2 autoencoder.py: z_channels 32 (+ a BatchNorm over 4*z); InvokeAI _is_flux2_vae.
        Signature(dims=((_VAE_IN, 1, (32,)),)), "latent channels", 32,
        "bf16 / fp32 safetensors, BFL or diffusers (AutoencoderKLFlux2) names",
        downloads=(Download("Comfy-Org/Flux-2-Klein-4B", "split_files/vae/flux2-vae.safetensors", 0.34, APACHE,
                            "fp32", note="the same file serves FLUX.2 dev and both Klein sizes"),)),
    # Parts of SD checkpoints: recognised so pairing can leave them out of Flux loads (no downloads offered).
    Companion("sd_vae", "SD VAE (4 ch)", "vae", Signature(dims=((_VAE_IN, 1, (4,)),)), "latent channels", 4,
              "any"),
    Companion("clip_g", "CLIP-G text encoder", "text_encoder", _clip(1280), "hidden", 1280, "any"),
)}


# ------------------------------------------------------------------------------------------------------ families

_FLUX1_PARTS = ("clip_l", "t5xxl", "ae")
_FORGE_FLUX = Support(True, "GGUF, NF4, fp8, bf16")
_NEO_FLUX = Support(True)
_NO_A1111 = Support(False, "A1111 has no Flux-family support")
_SQUARE_1MP = ((1024, 1024), (832, 1216), (1216, 832), (896, 1152), (1152, 896))
# Default steps / CFG / distilled CFG: FLUX.2 dev 50 / guidance 4, Klein distilled 4 / 1, Klein base 50 / 4 (read in
# a stored Klein setup page citing the model cards); FLUX.1 dev and schnell from Forge's Flux preset; Kontext
# (28 / 2.5), Krea (28 / 4.5), Fill (50 / 30) and Chroma (26 / CFG 4) as remembered from their model cards, not
# re-read here.


def _city96(variant: str, level: str, size_gb: float, licence: str, source: str = "published") -> Download:
    return Download(f"city96/FLUX.1-{variant}-gguf", f"flux1-{variant}-{level}.gguf", size_gb, licence, level,
                    size_source=source)


# Metadata keys where a saving tool may name the model (SAI modelspec in safetensors, GGUF general.name); no BFL
# release was checked to carry one, so the file name is the usual decider (as in Neo and InvokeAI).
_NAME_KEYS = ("modelspec.title", "modelspec.architecture", "general.name", "general.basename")
_WORD_BASE = r"(?<![a-z])base(?![a-z])"


def _named(word: str) -> tuple[tuple[str, str], ...]:
    return tuple((key, word) for key in _NAME_KEYS)


# Published FLUX.1-dev GGUF sizes (city96/FLUX.1-dev-gguf file list), best fidelity first.
_DEV_GGUF_GB = (("Q8_0", 12.7), ("Q6_K", 9.86), ("Q5_1", 9.01), ("Q5_K_S", 8.29), ("Q5_0", 8.27), ("Q4_1", 7.53),
                ("Q4_K_S", 6.81), ("Q4_0", 6.79), ("Q3_K_S", 5.23), ("Q2_K", 4.03))
_SCHNELL_LEVELS = ("Q8_0", "Q5_K_S", "Q4_K_S", "Q4_0")

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family(
        "flux-dev", "FLUX.1 [dev]", "flux1", _flux1(64, guidance=True), _FLUX1_PARTS, frozenset(_FLUX1_PARTS),
        {"forge": _FORGE_FLUX, "neo": _NEO_FLUX, "a1111": _NO_A1111},
        geometry=FLUX_DEV, latent_channels=16, resolutions=_SQUARE_1MP,
        # Forge's Flux preset: 20 steps, CFG 1, Distilled CFG 3.5 (BFL's card: guidance 3.5, 50 steps).
        steps=20, cfg=1.0, distilled_cfg=3.5, licence=DEV_LICENCE, source="black-forest-labs/FLUX.1-dev",
        transformers=(
            *(_city96("dev", level, gb, DEV_LICENCE) for level, gb in _DEV_GGUF_GB),
            Download("lllyasviel/flux1-dev-bnb-nf4", "flux1-dev-bnb-nf4-v2.safetensors", 12.0, DEV_LICENCE,
                     "NF4 v2", note="all-in-one: includes T5 fp8, CLIP-L and the VAE; NVIDIA GPU (bitsandbytes)"),
        )),
    Family(
        "flux-schnell", "FLUX.1 [schnell]", "flux1", _flux1(64, guidance=False), _FLUX1_PARTS,
        frozenset(_FLUX1_PARTS), {"forge": _FORGE_FLUX, "neo": _NEO_FLUX, "a1111": _NO_A1111},
        geometry=FLUX_SCHNELL, latent_channels=16, resolutions=_SQUARE_1MP, steps=4, cfg=1.0,
        licence=APACHE, source="black-forest-labs/FLUX.1-schnell",
        # Schnell lacks only the 12 M-parameter guidance embedder: the dev size of the same level is the estimate.
        transformers=tuple(_city96("schnell", level, gb, APACHE, "estimated") for level, gb in _DEV_GGUF_GB
                           if level in _SCHNELL_LEVELS)),
    Family(
        "flux-kontext", "FLUX.1 Kontext [dev]", "flux1", _flux1(64, guidance=True), _FLUX1_PARTS,
        frozenset(_FLUX1_PARTS),
        {"forge": Support(False, "loads as FLUX.1 dev: no reference-image editing"),
         "neo": Support(True, "Neo edits with it when 'kontext' is in the file name"), "a1111": _NO_A1111},
        geometry=FLUX_DEV, latent_channels=16, resolutions=_SQUARE_1MP, steps=28, cfg=1.0, distilled_cfg=2.5,
        licence=DEV_LICENCE, source="black-forest-labs/FLUX.1-Kontext-dev",
        # Same keys and shapes as dev (ComfyUI, diffusers, InvokeAI and sd.cpp all call it dev); Neo itself decides
        # by `"kontext" in path` (backend/loader.py).
        same_weights_as="flux-dev", name_hints=("kontext",), metadata_hints=_named("kontext")),
    Family(
        "flux-krea", "FLUX.1 Krea [dev]", "flux1", _flux1(64, guidance=True), _FLUX1_PARTS, frozenset(_FLUX1_PARTS),
        {"forge": Support(True, "same architecture as dev"), "neo": _NEO_FLUX, "a1111": _NO_A1111},
        geometry=FLUX_DEV, latent_channels=16, resolutions=_SQUARE_1MP, steps=28, cfg=1.0, distilled_cfg=4.5,
        licence=DEV_LICENCE, source="black-forest-labs/FLUX.1-Krea-dev",
        same_weights_as="flux-dev", name_hints=("krea",), metadata_hints=_named("krea")),
    Family(
        "flux-fill", "FLUX.1 Fill [dev]", "flux1", _flux1(384, guidance=True), _FLUX1_PARTS, frozenset(_FLUX1_PARTS),
        {"forge": Support(False, "Forge's Flux recogniser fixes in_channels at 16: the load fails"),
         "neo": Support(False, "Neo 2.26 has no mask conditioning for Flux (inpaint_model is False)"),
         "a1111": _NO_A1111},
        geometry=FLUX_FILL, latent_channels=16, resolutions=_SQUARE_1MP, steps=50, cfg=1.0, distilled_cfg=30.0,
        licence=DEV_LICENCE, source="black-forest-labs/FLUX.1-Fill-dev",
        note="img_in takes 384 channels: 64 noise + 64 masked image + 256 mask"),
    Family(
        "flux-other", "FLUX.1 (variant not recognised)", "flux1",
        Signature(present=(_QK_NORM, _IMG_IN, _VEC_IN), absent=(_FLUX2,)), _FLUX1_PARTS, frozenset(_FLUX1_PARTS),
        {"forge": Support(False, "only in_channels 64 loads"), "neo": Support(False, "not recognised"),
         "a1111": _NO_A1111},
        latent_channels=16, fallback=True,
        note="FLUX.1 blocks with unusual img_in in-features (128: Depth / Canny, 196: Flex.2)"),
    Family(
        "chroma", "Chroma", "chroma",
        # Forge chroma.py / ComfyUI / sd.cpp: the distilled_guidance_layer; no time_in, vector_in, guidance_in.
        Signature(present=(_CHROMA, "img_in.weight"), absent=(_FLUX2, _VEC_IN, _GUIDANCE)),
        ("t5xxl", "ae"), frozenset({"t5xxl", "ae"}),
        {"forge": Support(True, "backend/nn/chroma.py"), "neo": _NEO_FLUX, "a1111": _NO_A1111},
        geometry=CHROMA_HD, latent_channels=16, resolutions=_SQUARE_1MP, steps=26, cfg=4.0,
        licence=APACHE, source="lodestones/Chroma1-HD",
        note="T5-XXL only: no CLIP-L"),
    Family(
        "flux2-dev", "FLUX.2 [dev]", "flux2", _flux2(15360, guidance=True), ("mistral3_24b", "flux2_vae"),
        frozenset({"mistral3_24b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"),
         "neo": Support(False, "Neo 2.26 knows the Klein sizes only (model_list Flux2K4B / Flux2K9B)"),
         "a1111": _NO_A1111},
        geometry=FLUX2_DEV, latent_channels=32, resolutions=_SQUARE_1MP, steps=50, cfg=1.0, distilled_cfg=4.0,
        licence=FLUX2_DEV_LICENCE, source="black-forest-labs/FLUX.2-dev",
        transformers=(
            Download("city96/FLUX.2-dev-gguf", "flux2-dev-Q4_K_S.gguf", 19.3, FLUX2_DEV_LICENCE, "Q4_K_S"),
            Download("city96/FLUX.2-dev-gguf", "flux2-dev-Q4_0.gguf", 19.3, FLUX2_DEV_LICENCE, "Q4_0"),
            Download("city96/FLUX.2-dev-gguf", "flux2-dev-Q5_K_S.gguf", 23.2, FLUX2_DEV_LICENCE, "Q5_K_S"),
        ),
        note="runs in ComfyUI and stable-diffusion.cpp today"),
    Family(
        "flux2-klein-4b", "FLUX.2 [klein] 4B", "flux2", _flux2(7680, guidance=False), ("qwen3_4b", "flux2_vae"),
        frozenset({"qwen3_4b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"), "neo": Support(True), "a1111": _NO_A1111},
        geometry=FLUX2_KLEIN_4B, latent_channels=32, resolutions=_SQUARE_1MP, steps=4, cfg=1.0,
        licence=APACHE, source="black-forest-labs/FLUX.2-klein-4B",
        transformers=(Download("Comfy-Org/Flux-2-Klein-4B", "split_files/diffusion_models/flux-2-klein-4b.safetensors",
                               7.75, APACHE, "bf16"),),
        note="step-distilled (4 steps)"),
    Family(
        "flux2-klein-base-4b", "FLUX.2 [klein] Base 4B", "flux2", _flux2(7680, guidance=False),
        ("qwen3_4b", "flux2_vae"), frozenset({"qwen3_4b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"), "neo": Support(True), "a1111": _NO_A1111},
        geometry=FLUX2_KLEIN_4B, latent_channels=32, resolutions=_SQUARE_1MP, steps=50, cfg=4.0,
        licence=APACHE, source="black-forest-labs/FLUX.2-klein-base-4B",
        # InvokeAI: base and distilled "cannot be distinguished from the state dict"; it uses "base" in the name.
        same_weights_as="flux2-klein-4b", name_hints=(_WORD_BASE,), metadata_hints=_named("base")),
    Family(
        "flux2-klein-9b", "FLUX.2 [klein] 9B", "flux2", _flux2(12288, guidance=False), ("qwen3_8b", "flux2_vae"),
        frozenset({"qwen3_8b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"), "neo": Support(True), "a1111": _NO_A1111},
        geometry=FLUX2_KLEIN_9B, latent_channels=32, resolutions=_SQUARE_1MP, steps=4, cfg=1.0,
        licence=FLUX_NC_LICENCE, source="black-forest-labs/FLUX.2-klein-9B", note="step-distilled (4 steps)"),
    Family(
        "flux2-klein-base-9b", "FLUX.2 [klein] Base 9B", "flux2", _flux2(12288, guidance=False),
        ("qwen3_8b", "flux2_vae"), frozenset({"qwen3_8b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"), "neo": Support(True), "a1111": _NO_A1111},
        geometry=FLUX2_KLEIN_9B, latent_channels=32, resolutions=_SQUARE_1MP, steps=50, cfg=4.0,
        licence=FLUX_NC_LICENCE, source="black-forest-labs/FLUX.2-klein-base-9B",
        same_weights_as="flux2-klein-9b", name_hints=(_WORD_BASE,), metadata_hints=_named("base")),
    Family(
        "flux2-other", "FLUX.2 (variant not recognised)", "flux2", _flux2(None, guidance=None), ("flux2_vae",),
        frozenset({"qwen3_4b", "qwen3_8b", "mistral3_24b", "flux2_vae"}),
        {"forge": Support(False, "no FLUX.2 support"), "neo": Support(False, "not recognised"), "a1111": _NO_A1111},
        latent_channels=32, fallback=True,
        note="txt_in in-features match no known text encoder (7680 / 12288 / 15360)"),
    # SD families: recognised so pairing leaves Flux modules out of their loads (Forge issue #2255). Their text
    # encoders and VAE live inside the checkpoint; a separate SD VAE is the only module they take.
    Family("sd15", "Stable Diffusion 1.x", "sd", _sd_unet(768), (), frozenset({"sd_vae"}),
           {"forge": Support(True), "neo": Support(True), "a1111": Support(True)}, latent_channels=4),
    Family("sd2", "Stable Diffusion 2.x", "sd", _sd_unet(1024), (), frozenset({"sd_vae"}),
           {"forge": Support(True), "neo": Support(False, "not in Neo's model list"), "a1111": Support(True)},
           latent_channels=4),
    Family("sdxl-refiner", "SDXL refiner", "sd", _sd_unet(1280), (), frozenset({"sd_vae"}),
           {"forge": Support(True), "neo": Support(True), "a1111": Support(True)}, latent_channels=4),
    Family("sdxl", "SDXL", "sd", _sd_unet(2048), (), frozenset({"sd_vae"}),
           {"forge": Support(True), "neo": Support(True), "a1111": Support(True)}, latent_channels=4),
    Family(
        "sd3", "Stable Diffusion 3", "sd",
        Signature(present=("joint_blocks.0.context_block.attn.qkv.weight | pos_embed.proj.weight"
                           " | final_layer.adaLN_modulation.1.bias",),
                  absent=(_ANY_FLUX,)),
        (), frozenset({"clip_l", "clip_g", "t5xxl"}),
        {"forge": Support(True), "neo": Support(False, "not in Neo's model list"), "a1111": Support(True)},
        latent_channels=16,
        # A separate 16-channel VAE replaces SD3's own: the Flux ae has the same shapes and gives wrong colours.
        accepts_if_missing=frozenset({"ae"})),
)}


# --------------------------------------------------------------------------------------------------------- formats

_NEO_ONLY = Support(False, "no Comfy mixed-quant loader")
# Neo 2.26 loads Nunchaku files as FLUX.1 only (huggingface_guess detection.py: single_transformer_blocks.0.mlp_fc1.
# qweight -> image_model "flux", dev vs schnell by the guidance embedder; backend/loader.py SVDQFluxTransformer2DModel).
# Kernels: INT4 on Turing / Ampere / Ada (sm_75-sm_89), FP4 on Blackwell RTX 50 (sm_120): nunchaku README (sm_80 /
# sm_86 / sm_89) and SD.Next's Nunchaku wiki ("Turing/Ampere/Ada/Blackwell ... on Blackwell FP4, else INT4").
_SVDQ_ARCHS = ("flux1",)
FORMATS: dict[str, Format] = {f.key: f for f in (
    Format("gguf", "GGUF",
           "GGUF container; general.architecture 'flux' for FLUX.1, Chroma and FLUX.2 alike (city96 convert.py), "
           "so the family comes from the tensors",
           {"forge": Support(True, "Q2_K-Q8_0, BF16; fluxq adds IQ4_NL / IQ4_XS"),
            "neo": Support(True, "fluxq adds IQ4_NL / IQ4_XS"), "a1111": Support(False)}),
    Format("bnb-nf4", "bitsandbytes NF4", "'<layer>.weight.quant_state.bitsandbytes__nf4' next to each packed weight",
           {"forge": Support(True, "NVIDIA GPU (bitsandbytes CUDA kernels)"),
            "neo": Support(True, "NVIDIA GPU, bitsandbytes installed (--bnb)"), "a1111": Support(False)}),
    Format("bnb-fp4", "bitsandbytes FP4", "'<layer>.weight.quant_state.bitsandbytes__fp4'",
           {"forge": Support(True, "NVIDIA GPU"), "neo": Support(True, "NVIDIA GPU, --bnb"),
            "a1111": Support(False)}),
    Format("fp8-scaled", "fp8 scaled (Comfy legacy)",
           "root tensor 'scaled_fp8' (its dtype picks e4m3 / e5m2), per-layer 'scale_weight' (+ 'scale_input')",
           {"forge": Support(True, "weight scales applied (backend/operations.py)"),
            "neo": Support(True, "converted to Comfy mixed quant (backend/state_dict.py)"), "a1111": Support(False)}),
    Format("comfy-fp8", "fp8 mixed (Comfy quant)",
           "'_quantization_metadata' in __metadata__ or per-layer '<layer>.comfy_quant' JSON: float8_e4m3fn / e5m2",
           {"forge": _NEO_ONLY, "neo": Support(True, "fast on fp8-capable GPUs (RTX 40+), else dequantized"),
            "a1111": Support(False)}),
    Format("comfy-nvfp4", "NVFP4 mixed (Comfy quant)", "comfy_quant format 'nvfp4' (uint8 weight, 2 scales)",
           {"forge": _NEO_ONLY, "neo": Support(True, "native on RTX 50 (Blackwell); other GPUs dequantize"),
            "a1111": Support(False)}),
    Format("comfy-mxfp8", "MXFP8 mixed (Comfy quant)", "comfy_quant format 'mxfp8' (fp8 weight, e8m0 block scales)",
           {"forge": _NEO_ONLY, "neo": Support(True, "native on Blackwell with torch >= 2.10; else dequantized"),
            "a1111": Support(False)}),
    Format("comfy-int8", "INT8 mixed (Comfy quant)", "comfy_quant format 'int8_tensorwise' (int8 + weight_scale)",
           {"forge": _NEO_ONLY, "neo": Support(True), "a1111": Support(False)}),
    Format("comfy-w4a4", "ConvRot W4A4 (Comfy quant)", "comfy_quant format 'convrot_w4a4'",
           {"forge": _NEO_ONLY, "neo": Support(True), "a1111": Support(False)}),
    Format("svdq-int4", "SVDQuant INT4 (Nunchaku)",
           "'<layer>.qweight' int8 [out, in/2] with bf16 'wscales' [in/64, out], 'smooth', 'lora_down/up'",
           {"forge": Support(False, "no Nunchaku support"),
            "neo": Support(True, "needs Nunchaku: the nunchaku package, NVIDIA RTX 20-40 (not 50)"),
            "a1111": Support(False)},
           archs=_SVDQ_ARCHS, cuda_sm=(75, 89)),
    Format("svdq-fp4", "SVDQuant NVFP4 (Nunchaku)",
           "'<layer>.qweight' with fp8 'wscales' [in/16, out] and 'wtscale' / 'wcscales'",
           {"forge": Support(False, "no Nunchaku support"),
            "neo": Support(True, "needs Nunchaku: the nunchaku package, NVIDIA RTX 50 (Blackwell)"),
            "a1111": Support(False)},
           archs=_SVDQ_ARCHS, cuda_sm=(120, 129)),
    Format("fp8-e4m3fn", "fp8 e4m3fn", "F8_E4M3 weights without scales",
           {"forge": Support(True), "neo": Support(True), "a1111": Support(False)}),
    Format("fp8-e5m2", "fp8 e5m2", "F8_E5M2 weights without scales",
           {"forge": Support(True), "neo": Support(True), "a1111": Support(False)}),
    Format("bf16", "BF16", "BF16 weights", {"forge": Support(True), "neo": Support(True), "a1111": Support(True)},
           quantized=False),
    Format("fp16", "FP16", "F16 weights", {"forge": Support(True), "neo": Support(True), "a1111": Support(True)},
           quantized=False),
    Format("fp32", "FP32", "F32 weights", {"forge": Support(True), "neo": Support(True), "a1111": Support(True)},
           quantized=False),
)}


# --------------------------------------------------------------------------------------------------------- lookups

def family(key: str) -> Family:
    """The row for ``key`` (KeyError names the known keys)."""
    try:
        return FAMILIES[key]
    except KeyError:
        raise KeyError(f"unknown family {key!r}; known: {', '.join(FAMILIES)}") from None


def companion(key: str) -> Companion:
    try:
        return COMPANIONS[key]
    except KeyError:
        raise KeyError(f"unknown part {key!r}; known: {', '.join(COMPANIONS)}") from None


def fmt(key: str) -> Format:
    try:
        return FORMATS[key]
    except KeyError:
        raise KeyError(f"unknown format {key!r}; known: {', '.join(FORMATS)}") from None


def companions_for(family_key: str | None) -> tuple[Companion, ...]:
    """The parts a transformer-only file of this family needs, in pairing order (empty for unknown / SD)."""
    if family_key not in FAMILIES:
        return ()
    return tuple(COMPANIONS[p] for p in FAMILIES[family_key].companions)


def part_title(part: str) -> str:
    return COMPANIONS[part].title if part in COMPANIONS else part


def runs_on(family_key: str | None, format_key: str | None, host: str) -> Support:
    """Whether ``host`` runs this family stored in this format: both must be supported; the first refusal wins."""
    checks = [s for s in ((FAMILIES[family_key].hosts.get(host) if family_key in FAMILIES else None),
                          (FORMATS[format_key].hosts.get(host) if format_key in FORMATS else None)) if s]
    refused = next((s for s in checks if not s.runs), None)
    if refused is not None:
        return refused
    return Support(True, "; ".join(s.note for s in checks if s.note)) if checks else Support(False, "unknown")


def host_summary(family_key: str | None, format_key: str | None) -> str:
    """One line for people, e.g. "Forge Neo (2.26): yes (needs Nunchaku: ...); Forge (dfdcbab6): no (...)"."""
    parts = []
    for host, title in HOSTS.items():
        support = runs_on(family_key, format_key, host)
        parts.append(f"{title}: {support.text()}")
    return "; ".join(parts)


@dataclass(frozen=True)
class FamilyRow:
    """A README/docs table row (what fluxq recognises, what it needs, who runs it)."""

    family: str
    title: str
    needs: str
    hosts: dict[str, str] = field(default_factory=dict)


def overview() -> list[FamilyRow]:
    """The family table for people (docs/families.md is written from the same rows)."""
    rows = []
    for fam in FAMILIES.values():
        needs = " + ".join(COMPANIONS[p].title for p in fam.companions) or "its own (all-in-one checkpoint)"
        rows.append(FamilyRow(fam.key, fam.title, needs, {h: fam.hosts[h].text() for h in HOSTS if h in fam.hosts}))
    return rows


# ---------------------------------------------------------------------------------------------- tables for people

def _cell(text: str) -> str:
    return text.replace("|", "/")


def markdown_families(compact: bool = False) -> str:
    """The family table as Markdown (README: ``compact``; docs/families.md: full). Tests keep the docs equal."""
    rows = [f for f in FAMILIES.values() if not f.fallback and (not compact or f.arch != "sd")]
    if compact:   # yes / no only: the reasons and conditions are in docs/families.md
        out = ["| family | needs | Forge | Neo |", "|---|---|---|---|"]
        for f in rows:
            needs = " + ".join(COMPANIONS[p].title for p in f.companions) or "-"
            yes_no = ["yes" if f.hosts[h].runs else "no" for h in ("forge", "neo")]
            out.append(f"| {f.title} | {_cell(needs)} | {yes_no[0]} | {yes_no[1]} |")
        return "\n".join(out)
    out = ["| key | family | parameters | latent ch | needs | steps / CFG / distilled CFG | licence | "
           "Forge | Neo | A1111 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in rows:
        params = f"{f.parameters / 1e9:.2f} B" if f.parameters else "-"
        needs = " + ".join(f"`{p}`" for p in f.companions) or "-"
        defaults = " / ".join("-" if v is None else f"{v:g}" for v in (f.steps, f.cfg, f.distilled_cfg))
        hosts = " | ".join(_cell(f.hosts[h].text()) if h in f.hosts else "-" for h in HOSTS)
        title = f.title + (f" (same weights as `{f.same_weights_as}`: told by file name)" if f.same_weights_as else "")
        out.append(f"| `{f.key}` | {title} | {params} | {f.latent_channels or '-'} | {needs} | {defaults} | "
                   f"{f.licence or '-'} | {hosts} |")
    return "\n".join(out)


def markdown_companions() -> str:
    out = ["| part | what | folder | formats | files (size, licence) |", "|---|---|---|---|---|"]
    for c in COMPANIONS.values():
        if not c.downloads:
            continue
        files = "<br>".join(f"[{d.filename}]({d.url}) ({d.precision}, {d.size_gb:g} GB"
                            f"{', estimated' if d.size_source == 'estimated' else ''}, {d.licence})"
                            for d in c.downloads)
        out.append(f"| `{c.key}` | {c.title} | `{c.folder}` | {_cell(c.formats)} | {files} |")
    return "\n".join(out)


def markdown_formats() -> str:
    out = ["| format | how the header marks it | Forge | Neo |", "|---|---|---|---|"]
    for f in FORMATS.values():
        out.append(f"| `{f.key}` {f.title} | {_cell(f.marked)} | {_cell(f.hosts['forge'].text())} | "
                   f"{_cell(f.hosts['neo'].text())} |")
    return "\n".join(out)
