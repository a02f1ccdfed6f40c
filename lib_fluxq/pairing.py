"""Which text encoders and VAE a checkpoint needs, chosen by what the files contain (never by their names).

Host-free: the Forge / Neo hook (lib_fluxq/host/) feeds it the checkpoint and the files the WebUI lists under
"VAE / Text Encoder"; the tab and CLI use it the same way. Every file is classified by the one classifier
(lib_fluxq.classify) over the family table (lib_fluxq.families): the checkpoint's family says which parts it needs
(FLUX.1: CLIP-L + T5-XXL + ae; Chroma: T5-XXL + ae; FLUX.2 Klein 4B: Qwen3-4B + FLUX.2 VAE; Klein 9B: Qwen3-8B +
FLUX.2 VAE; FLUX.2 dev: Mistral + FLUX.2 VAE) and which selected modules it can take; every candidate file says
which parts it holds. Only headers are read, so deciding costs milliseconds even for a 12 GB file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lib_fluxq import families as F
from lib_fluxq.classify import FULL_PRECISIONS, Classification, classify_file
from lib_fluxq.errors import FluxqError

# Free RAM at and above which the 9.5 GB fp16 T5-XXL is preferred over fp8 / GGUF (the family table's value).
T5_FP16_MIN_FREE_RAM = F.companion("t5xxl").full_precision_min_free_ram or 0
# Smaller storage, best first, when full precision does not fit: fp8 keeps most fidelity, then GGUF, then 4-bit.
_SMALL_PRECISIONS = ("fp8", "gguf", "nf4", "int8", "mxfp8", "nvfp4", "fp4", "int4")
PART_TITLES: dict[str, str] = {key: comp.title for key, comp in F.COMPANIONS.items()}
SD_FAMILIES = frozenset(k for k, fam in F.FAMILIES.items() if fam.arch == "sd")


@dataclass(frozen=True)
class FileContents:
    """What one model file holds, from its header alone."""

    path: str
    family: str | None = None                      # a families.FAMILIES key (None: no diffusion model)
    parts: frozenset[str] = frozenset()            # "transformer" and families.COMPANIONS keys
    precisions: Mapping[str, str] = field(default_factory=dict)   # part -> fp16 / bf16 / fp32 / fp8 / gguf / nf4
    decided_by: str | None = None                  # "content" | "metadata" | "name" (how the family was told)
    format: str | None = None                      # main storage format (families.FORMATS key)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def t5_precision(self) -> str | None:
        return self.precisions.get("t5xxl")

    @property
    def needs(self) -> tuple[str, ...]:
        """The parts this file's family takes from other files (empty for SD checkpoints and non-models)."""
        return F.family(self.family).companions if self.family in F.FAMILIES else ()

    @classmethod
    def from_classification(cls, path: str, found: Classification) -> FileContents:
        return cls(path=path, family=found.family, parts=found.parts, precisions=dict(found.precisions),
                   decided_by=found.decided_by, format=found.format)


@dataclass
class Pairing:
    """The additional modules to load with a checkpoint, and the parts nothing provides."""

    modules: list[str]                             # paths, the user's own selection first
    added: dict[str, str] = field(default_factory=dict)      # part -> path we chose
    dropped: list[str] = field(default_factory=list)         # user-selected paths that do not fit this model
    missing: list[str] = field(default_factory=list)         # parts neither the checkpoint nor any file provides


class MissingComponentsError(FluxqError):
    """A checkpoint lacks text encoders / VAE and no file on disk provides them."""

    def __init__(self, checkpoint: str, missing: Sequence[str], folders: dict[str, str] | None = None,
                 family: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.missing = list(missing)
        self.family = family
        super().__init__(missing_files_message(checkpoint, missing, folders, family=family))


def missing_files_message(checkpoint: str, missing: Sequence[str], folders: dict[str, str] | None = None,
                          family: str | None = None) -> str:
    """What is missing, which exact files provide each part (URL, size, licence) and the folder each goes in.

    ``folders`` maps the folder kind ("text_encoder", "VAE") to the real path in this install; ``family`` (a
    families key) names the model the parts are for.
    """
    folders = folders or {}
    what = F.family(family).title if family in F.FAMILIES else "this model"
    titles = ", ".join(F.part_title(p) for p in missing)
    lines = [f"{os.path.basename(checkpoint)} ({what}) does not contain everything it needs; missing: {titles}.",
             "Download (once) one file per part into the folder shown, then press Generate again (fluxq picks "
             "it up):"]
    for part in missing:
        comp = F.COMPANIONS.get(part)
        if comp is None:
            lines.append(f"  - {part}: no known download")
            continue
        folder = folders.get(comp.folder, os.path.join("models", comp.folder))
        lines.append(f"  - {comp.title}  ->  {folder}")
        for download in comp.downloads:
            gated = ", accept the licence on the Hub first" if download.gated else ""
            note = f"; {download.note}" if download.note else ""
            size = f"{'about ' if download.size_source == 'estimated' else ''}{download.size_gb:g} GB"
            lines.append(f"      {download.filename} ({download.precision}, {size}, {download.licence}{gated}{note}): "
                         f"{download.url}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Reading


def describe_file(path: str | os.PathLike[str]) -> FileContents:
    """Read ``path``'s header and classify it (FormatError when it cannot be read)."""
    path = os.fspath(path)
    return FileContents.from_classification(path, classify_file(path))


def describe_files(paths: Iterable[str]) -> list[FileContents]:
    """Classify every readable file; unreadable or unsupported ones are skipped (they are just not candidates)."""
    result = []
    for p in paths:
        try:
            result.append(describe_file(p))
        except (FluxqError, OSError):
            continue
    return result


# ---------------------------------------------------------------------------------------------------------------
# Choosing


def _precision_rank(contents: FileContents, part: str, free_ram_bytes: int) -> int:
    """0 = best. Full precision first when the part's RAM rule allows it, else the smaller storages first."""
    threshold = F.companion(part).full_precision_min_free_ram if part in F.COMPANIONS else None
    if threshold is None:
        return 0
    full_first = free_ram_bytes >= threshold
    preferred = FULL_PRECISIONS + _SMALL_PRECISIONS if full_first else _SMALL_PRECISIONS + FULL_PRECISIONS
    precision = contents.precisions.get(part, "")
    return preferred.index(precision) if precision in preferred else len(preferred)


def _standalone(contents: FileContents, part: str) -> bool:
    """A text-encoder/VAE file holding ``part`` (not another diffusion checkpoint that happens to embed it)."""
    return part in contents.parts and "transformer" not in contents.parts


def _fits(checkpoint: FileContents, module: FileContents) -> bool:
    """Can this selected module go with ``checkpoint``? Every part it brings must be one the family takes (or, for
    ``accepts_if_missing``, one the checkpoint lacks): a Flux VAE in an SD load, CLIP-L for Chroma, T5 for Klein
    are left out (Forge issue #2255). A file we could not classify (no parts) is the host's to judge."""
    fam = F.FAMILIES.get(checkpoint.family or "")
    if fam is None or not module.parts:
        return True
    allowed = fam.accepts | (fam.accepts_if_missing - checkpoint.parts)
    return module.parts <= allowed


def choose_pairing(checkpoint: FileContents, selected: Sequence[FileContents], available: Sequence[FileContents],
                   free_ram_bytes: int, pair: bool = True, drop: bool = True) -> Pairing:
    """The module list to load ``checkpoint`` with.

    ``selected``: what the user picked in "VAE / Text Encoder" (kept unless it does not fit this model: ``drop``).
    ``available``: every VAE/text-encoder file the WebUI knows; each part the checkpoint's family needs that
    neither the checkpoint nor the selection provides is filled from them (``pair``), by content. Among candidates:
    the precision the free RAM allows (T5-XXL: fp16 from 32 GiB free, else fp8 / GGUF first; each the other's
    fallback), then a file holding only that part over a bundle, then the name (stable between loads).
    """
    kept = [m for m in selected if not drop or _fits(checkpoint, m)]
    pairing = Pairing(modules=[m.path for m in kept], dropped=[m.path for m in selected if m not in kept])
    have = set(checkpoint.parts)
    for m in kept:
        have |= m.parts
    for part in checkpoint.needs:
        if part in have:
            continue
        candidates = [c for c in available if _standalone(c, part) and c.path not in pairing.modules
                      and _fits(checkpoint, c)]
        if not pair or not candidates:
            pairing.missing.append(part)
            continue
        candidates.sort(key=lambda c: (_precision_rank(c, part, free_ram_bytes), len(c.parts), c.name))
        chosen = candidates[0]
        pairing.modules.append(chosen.path)
        pairing.added[part] = chosen.path
        have |= chosen.parts
    return pairing
