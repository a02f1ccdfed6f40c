"""Files worth downloading — quantized transformers, text encoders, VAEs — generated from the family table.

Every entry comes from a ``families.Download`` row: the exact Hugging Face repository and path, its size (the
Hub's listing: ``size_source="published"``, or ``"estimated"`` from the same layout elsewhere), licence, and the
WebUI models folder it goes in (``Stable-diffusion`` for transformers — Forge and Neo load GGUF / NF4 checkpoints
from there —, ``text_encoder``, ``VAE``). Nothing here is typed twice: a new family or file is a table row. The
downloader always asks the Hub for the real size before it checks disk space.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from lib_fluxq import families as F
from lib_fluxq.errors import FluxqError

FOLDERS = F.FOLDERS    # kind -> the WebUI models subfolder


@dataclass(frozen=True)
class CatalogEntry:
    key: str                 # stable id used by the UI and the CLI
    title: str
    kind: str                # "transformer" | "text_encoder" | "vae"
    repo: str
    filename: str            # path inside the repository (the file lands under its base name)
    size_gb: float
    size_source: str         # "published" | "estimated"
    licence: str
    level: str | None = None     # what users call it: Q4_K_S, NF4 v2, fp8, bf16, ...
    variant: str | None = None   # the family key for transformers (flux-dev, flux2-klein-4b, ...)
    gated: bool = False          # the repository asks you to accept its licence on the Hub (token needed)
    provides: tuple[str, ...] = ()  # parts it holds besides the transformer (all-in-one files), or the part itself
    note: str = ""
    part: str | None = None      # for text encoders / VAEs: the families.COMPANIONS key it provides

    @property
    def folder(self) -> str:
        """The WebUI models subfolder this file goes in."""
        return FOLDERS[self.kind]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/blob/main/{self.filename}"

    @property
    def basename(self) -> str:
        return os.path.basename(self.filename)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["folder"] = self.folder
        data["url"] = self.url
        return data


def _transformer(fam: F.Family, d: F.Download) -> CatalogEntry:
    key = os.path.splitext(d.filename)[0].lower()
    provides = ("clip_l", "t5xxl", "ae") if "all-in-one" in d.note else ()   # lllyasviel's NF4 v2 bundle
    needs = " + ".join(F.part_title(p) for p in fam.companions if p not in provides)
    note = d.note or (f"transformer only: also needs {needs}" if needs else "")
    return CatalogEntry(key=key, title=f"{fam.title} {d.precision}", kind="transformer", repo=d.repo,
                        filename=d.path, size_gb=d.size_gb, size_source=d.size_source, licence=d.licence,
                        level=d.precision, variant=fam.key, gated=d.gated, provides=provides, note=note)


def _companion(comp: F.Companion, d: F.Download) -> CatalogEntry:
    key = comp.key if len(comp.downloads) == 1 else f"{comp.key}-{d.precision.lower().replace(' ', '')}"
    return CatalogEntry(key=key, title=f"{comp.title} {d.precision}", kind=comp.kind, repo=d.repo,
                        filename=d.path, size_gb=d.size_gb, size_source=d.size_source, licence=d.licence,
                        level=d.precision, gated=d.gated, provides=(comp.key,), note=d.note, part=comp.key)


def _build() -> tuple[CatalogEntry, ...]:
    entries = [_transformer(fam, d) for fam in F.FAMILIES.values() for d in fam.transformers]
    needed = {p for fam in F.FAMILIES.values() for p in fam.companions}
    entries += [_companion(comp, d) for comp in F.COMPANIONS.values() if comp.key in needed for d in comp.downloads]
    return tuple(entries)


CATALOG: tuple[CatalogEntry, ...] = _build()
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
        raise FluxqError(f"no '{entry.folder}' models folder is known for {entry.basename}; start the app with "
                         f"--models DIR (the WebUI's models folder)") from None
    return os.path.join(folder, entry.basename)


def for_part(part: str) -> list[CatalogEntry]:
    """Entries that provide a part on their own (``clip_l``, ``t5xxl``, ``qwen3_4b``, ``ae``, ``flux2_vae``, ...):
    what to fetch when it is missing, best default first."""
    return [e for e in CATALOG if e.part == part]


def for_family(family: str) -> list[CatalogEntry]:
    """Transformer files of a family (``flux-dev``, ``flux2-klein-4b``, ...)."""
    return [e for e in CATALOG if e.kind == "transformer" and e.variant == family]
