"""Known Flux files worth downloading: quantized transformers (GGUF, NF4), text encoders and the VAE.

Each entry names the exact Hugging Face repository and file, its size, licence and the WebUI models folder it goes
in (``Stable-diffusion`` for transformers — Forge loads GGUF/NF4 checkpoints from there —, ``text_encoder``,
``VAE``). Sizes are decimal GB as the Hub lists them (``size_source="published"``) or, where no published figure is
at hand, the published dev size of the same level (``"estimated"``; schnell only lacks the 12 M-parameter
guidance embedder). The downloader always asks the Hub for the real size before it checks disk space.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from lib_fluxq.errors import FluxqError

DEV_LICENCE = "FLUX.1 [dev] Non-Commercial License"
APACHE = "Apache-2.0"
MIT = "MIT"

# What each kind of file is and the WebUI folder it belongs in (Forge/A1111 names under models/).
FOLDERS = {"transformer": "Stable-diffusion", "text_encoder": "text_encoder", "vae": "VAE"}


@dataclass(frozen=True)
class CatalogEntry:
    key: str                 # stable id used by the UI and the CLI
    title: str
    kind: str                # "transformer" | "text_encoder" | "vae"
    repo: str
    filename: str
    size_gb: float
    size_source: str         # "published" | "estimated"
    licence: str
    level: str | None = None     # quant level users call it (Q4_K_S, NF4 v2, fp8, ...)
    variant: str | None = None   # "dev" | "schnell" for transformers
    gated: bool = False          # the repository asks you to accept its licence on the Hub (token needed)
    provides: tuple[str, ...] = ()  # parts besides the transformer (all-in-one files): clip_l, t5xxl, ae
    note: str = ""

    @property
    def folder(self) -> str:
        """The WebUI models subfolder this file goes in."""
        return FOLDERS[self.kind]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.filename}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["folder"] = self.folder
        data["url"] = self.url
        return data


def _city96(variant: str, level: str, size_gb: float, source: str) -> CatalogEntry:
    dev = variant == "dev"
    return CatalogEntry(
        key=f"flux1-{variant}-{level.lower()}", title=f"FLUX.1 {variant} {level} (GGUF, city96)",
        kind="transformer", repo=f"city96/FLUX.1-{variant}-gguf", filename=f"flux1-{variant}-{level}.gguf",
        size_gb=size_gb, size_source=source, licence=DEV_LICENCE if dev else APACHE, level=level, variant=variant,
        note="transformer only: also needs CLIP-L, T5-XXL and the VAE")


# Published FLUX.1-dev GGUF sizes (city96/FLUX.1-dev-gguf file list), best fidelity first.
_DEV_GGUF_GB = (("Q8_0", 12.7), ("Q6_K", 9.86), ("Q5_1", 9.01), ("Q5_K_S", 8.29), ("Q5_0", 8.27), ("Q4_1", 7.53),
                ("Q4_K_S", 6.81), ("Q4_0", 6.79), ("Q3_K_S", 5.23), ("Q2_K", 4.03))
_SCHNELL_LEVELS = ("Q8_0", "Q5_K_S", "Q4_K_S", "Q4_0")

CATALOG: tuple[CatalogEntry, ...] = (
    *(_city96("dev", level, gb, "published") for level, gb in _DEV_GGUF_GB),
    *(_city96("schnell", level, gb, "estimated") for level, gb in _DEV_GGUF_GB if level in _SCHNELL_LEVELS),
    CatalogEntry(
        key="flux1-dev-nf4-v2", title="FLUX.1 dev NF4 v2 all-in-one (bitsandbytes, lllyasviel)",
        kind="transformer", repo="lllyasviel/flux1-dev-bnb-nf4", filename="flux1-dev-bnb-nf4-v2.safetensors",
        size_gb=12.0, size_source="published", licence=DEV_LICENCE, level="NF4 v2", variant="dev",
        provides=("clip_l", "t5xxl", "ae"),
        note="includes T5 fp8, CLIP-L and the VAE; needs an NVIDIA GPU (bitsandbytes CUDA kernels)"),
    CatalogEntry(
        key="clip_l", title="CLIP-L text encoder", kind="text_encoder", repo="comfyanonymous/flux_text_encoders",
        filename="clip_l.safetensors", size_gb=0.25, size_source="published", licence=MIT),
    CatalogEntry(
        key="t5xxl-fp8", title="T5-XXL text encoder fp8 e4m3fn", kind="text_encoder",
        repo="comfyanonymous/flux_text_encoders", filename="t5xxl_fp8_e4m3fn.safetensors", size_gb=4.9,
        size_source="published", licence=APACHE, level="fp8", note="for less than 32 GB of RAM"),
    CatalogEntry(
        key="t5xxl-fp16", title="T5-XXL text encoder fp16", kind="text_encoder",
        repo="comfyanonymous/flux_text_encoders", filename="t5xxl_fp16.safetensors", size_gb=9.5,
        size_source="published", licence=APACHE, level="fp16", note="best prompt fidelity; wants 32 GB of RAM"),
    CatalogEntry(
        key="ae", title="Flux VAE (ae)", kind="vae", repo="black-forest-labs/FLUX.1-schnell",
        filename="ae.safetensors", size_gb=0.33, size_source="published", licence=APACHE,
        note="works for dev and schnell"),
)

_BY_KEY = {entry.key: entry for entry in CATALOG}


def get(key: str) -> CatalogEntry:
    try:
        return _BY_KEY[key]
    except KeyError:
        raise FluxqError(f"unknown catalog entry '{key}'; choose one of: {', '.join(_BY_KEY)}") from None


def target_path(entry: CatalogEntry, folders: dict[str, str]) -> str:
    """Where ``entry`` lands, given this install's folders (``FOLDERS`` value -> real path)."""
    try:
        folder = folders[entry.folder]
    except KeyError:
        raise FluxqError(f"no '{entry.folder}' models folder is known for {entry.filename}; start the app with "
                         f"--models DIR (the WebUI's models folder)") from None
    return os.path.join(folder, entry.filename)


def for_part(part: str) -> list[CatalogEntry]:
    """Entries that provide a Flux part on their own (``clip_l``, ``t5xxl``, ``ae``): what to fetch when missing."""
    prefix = {"clip_l": "clip_l", "t5xxl": "t5xxl", "ae": "ae"}.get(part)
    if prefix is None:
        return []
    return [e for e in CATALOG if e.kind != "transformer" and e.key.split("-")[0] == prefix]
