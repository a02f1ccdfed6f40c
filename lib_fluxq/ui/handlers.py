"""The functions behind the Flux Quant tab: plain Python in, plain data / HTML out, no gradio.

tab.py wires these to widgets; tests call them directly. Every section degrades to a clear "not available yet" note
when the engine module it shows is missing in this install (``optional(...)``), never to made-up numbers.

Safety on a shared WebUI (docs/tab.md, "Exposing the WebUI"): a file name that comes from the page is a label of
``listing.Listing`` and is resolved there before anything is opened; outputs go next to a listed source or into the
catalog's model folder, never over an existing file unless the page asked for it; jobs run within
``jobs.JobRunner``'s per-kind limits; other visitors' jobs show only their titles and progress; an empty token field
sends no token (never the server's own Hugging Face login).
"""

from __future__ import annotations

import html
import importlib
import os
import re
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lib_fluxq import catalog, families, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.hardware import GIB, Hardware, detect, with_overrides
from lib_fluxq.ui.listing import ListedFile, Listing, RefusedPath

SIZE_PRESETS = ("1024x1024", "896x1152", "832x1216", "768x1344", "768x1024", "768x768", "512x768", "512x512")
MODEL_COLUMNS = ["file", "folder", "family", "level", "size", "components", "verdict", "missing parts"]
CATALOG_COLUMNS = ["key", "file", "what", "size", "licence", "folder", "repository"]
COMPARE_COLUMNS = ["level", "bits/w", "Flux-dev GB", "weight rRMSE", "block rel.err", "block cos", "dequant M/s"]
CONVERTIBLE_LEVELS = ("F32", "F16", "BF16", "FP8 e4m3fn", "FP8 e5m2")
COMPARABLE_LEVELS = ("F32", "F16", "BF16")   # the comparison's reference must be full precision
# Families whose transformer "Use this" and Convert work with (the family table's diffusion transformers)
TRANSFORMER_FAMILIES = tuple(key for key, fam in families.FAMILIES.items() if fam.arch != "sd")
# The comparison measures FLUX.1 blocks (compare_engine builds FLUX.1's DoubleStreamBlock / SingleStreamBlock);
# Chroma's blocks lack the per-block modulation and FLUX.2's the biases, so their files are not offered there.
COMPARE_ARCHS = ("flux1",)
DEFAULT_MODEL = "flux-dev"
SYNTHETIC = "(synthetic slice)"
MAX_TEXT = 200   # longest free text (levels, output name) the tab accepts
SHOWN_JOBS = 6   # finished jobs listed per section, after every running or waiting one


def optional(name: str) -> ModuleType | None:
    """An engine module that may not be in this install yet (sections then say so)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def not_available(what: str, module: str) -> str:
    return (f'<div class="fluxq-note fluxq-unavailable">{html.escape(what)} is not available yet in this fluxq '
            f'install (<code>{html.escape(module)}</code> is missing).</div>')


# The engine's messages are written for the command line; the tab says where on the page to act instead.
_UI_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\(e\.g\. --vram (\d+) --gpu '([^']+)'\)"), r"(e.g. VRAM \1 and GPU '\2' under This machine)"),
    (re.compile(r"no card name given \(--gpu\)"), "no card name given (GPU field under This machine)"),
    (re.compile(r"`?python -m lib_fluxq convert`?"), "Convert below"),
    (re.compile(r"run `?python -m lib_fluxq compare [^`;]*`?"), "pick a Flux file under Weights"),
    (re.compile(r"; pass --force to overwrite it or choose another name with -o"),
     ": tick 'Replace an existing file' or give another output name"),
    (re.compile(r" (?:or choose another (?:folder|name) )?with -o\b"), ""),
    (re.compile(r"--vram\b"), "VRAM"), (re.compile(r"--ram\b"), "RAM"), (re.compile(r"--gpu\b"), "GPU"),
    (re.compile(r"--levels\b"), "Levels"),
)


def ui_text(text: str) -> str:
    """An engine message in the tab's words: the field or section to use instead of a command-line flag."""
    for pattern, words in _UI_WORDS:
        text = pattern.sub(words, text)
    return text


def error_html(exc: BaseException | str) -> str:
    return f'<div class="fluxq-note fluxq-error">{html.escape(ui_text(str(exc)))}</div>'


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GB"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


class Markup(str):
    """A table cell this module built as HTML from escaped parts (a download button); every other cell is text."""


def _cell(value: Any) -> str:
    return value if isinstance(value, Markup) else html.escape(str(value))


def table_html(columns: list[str], rows: list[list[Any]], elem_class: str = "fluxq-table",
               wrap: Collection[str] = ()) -> str:
    """A plain HTML table that scrolls sideways on a narrow screen (gradio's Dataframe virtualizes rows and leaves
    off-screen ones blank). Cells stay on one line, except those of the ``wrap`` columns (long text). Every cell is
    text (file names and metadata never render as HTML), except Markup."""
    long = [c in wrap for c in columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{' class=fluxq-long' if long[i] else ''}>{_cell(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return (f'<div class="fluxq-scroll"><table class="{elem_class}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


# ------------------------------------------------------------------------------------------------- this machine

@dataclass
class Plan:
    """What the user plans for: the detected machine plus their overrides, a target size and Flux variant."""

    hardware: Hardware
    width: int = 1024
    height: int = 1024
    model: str = DEFAULT_MODEL      # a family the advisor plans for (families.py key)
    overridden: list[str] = field(default_factory=list)
    host: str = "forge"             # the advisor's host profile (ui.host: what this WebUI is like)


def detect_machine(models_dir: str | None = None) -> Hardware:
    return detect(models_dir)


def machine_fields(hardware: Hardware) -> tuple[str, float | None, float | None]:
    """(GPU name, VRAM GB, RAM GB) to prefill the editable fields."""
    vram = None if hardware.vram_total is None else round(hardware.vram_total / GIB, 1)
    ram = None if hardware.ram_total is None else round(hardware.ram_total / GIB, 1)
    return hardware.gpu_name or "", vram, ram


def machine_html(hardware: Hardware) -> str:
    """What was detected. The disk line names no server folder (the page may be seen by others)."""
    rows = [("Backend", hardware.backend.upper()), ("GPU", hardware.gpu_name or "none found"),
            ("VRAM", _gb(hardware.vram_total) + (f" ({_gb(hardware.vram_free)} free)" if hardware.vram_free else "")),
            ("RAM", _gb(hardware.ram_total) + (f" ({_gb(hardware.ram_available)} available)"
                                               if hardware.ram_available else "")),
            ("CPU cores", str(hardware.cpu_cores or "-")),
            ("Free disk", f"{_gb(hardware.disk_free)} in the models folder" if hardware.disk_free else "-")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    sources = ", ".join(f"{k}: {v}" for k, v in hardware.sources.items())
    notes = "".join(f"<li>{html.escape(ui_text(n))}</li>" for n in hardware.notes)
    return (f'<table class="fluxq-kv">{body}</table><details class="fluxq-small"><summary>how this was detected'
            f'</summary>{html.escape(sources)}</details>{f"<ul class=fluxq-small>{notes}</ul>" if notes else ""}')


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{2,5})\s*[xX×*]\s*(\d{2,5})\s*", str(text or ""))
    if not match:
        raise FluxqError(f"size '{str(text)[:20]}': give WIDTHxHEIGHT, e.g. 1024x1024")
    return int(match.group(1)), int(match.group(2))


def _number(value: Any, what: str) -> float | None:
    if value in (None, "", 0):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FluxqError(f"{what}: give a number of GB") from None


def model_choices() -> list[tuple[str, str]]:
    """(title, family key) of every family the advisor plans for, FLUX.1 dev first."""
    model = optional("lib_fluxq.advisor.model")   # the advisor's family rows (advisor/__init__ does not re-export)
    planned = model.planned_families() if model is not None else []
    return [(fam.title, fam.key) for fam in planned] or [(families.FAMILIES[DEFAULT_MODEL].title, DEFAULT_MODEL)]


def planned_keys() -> set[str]:
    """The family keys the advisor plans for (the family table's rows with a geometry)."""
    return {key for _, key in model_choices()}


def model_for(family: str | None, model: str) -> str:
    """The family to plan a file with: its own when the advisor plans for it, else the chosen ``model``."""
    return family if family in planned_keys() else model


def _family_key(model: Any) -> str:
    """The family key a Model value names ("flux-schnell", or the advisor's aliases such as "schnell")."""
    advisor_model = optional("lib_fluxq.advisor.model")
    known = {key for _, key in model_choices()}
    if isinstance(model, str) and advisor_model is not None:
        try:
            key = advisor_model.resolve_family(model).key
        except FluxqError:
            key = None
        if key in known:
            return key
    if model in known:
        return str(model)
    raise FluxqError("choose a model family from the list")


def family_title(key: str | None) -> str:
    """A family or companion key in words ("flux-dev" -> "FLUX.1 [dev]"); unknown keys as they are."""
    if key in families.FAMILIES:
        return families.FAMILIES[key].title
    if key in families.COMPANIONS:
        return families.COMPANIONS[key].title
    return key or "-"


def make_plan(detected: Hardware, gpu_name: str | None, vram_gb: float | None, ram_gb: float | None,
              size: str = "1024x1024", model: str = DEFAULT_MODEL, host: str = "forge") -> Plan:
    """The machine to plan for: a field left as detected (or empty) is not an override."""
    det_gpu, det_vram, det_ram = machine_fields(detected)
    gpu = str(gpu_name or "").strip()[:80] or None
    gpu = None if gpu == det_gpu else gpu
    vram_gb, ram_gb = _number(vram_gb, "VRAM"), _number(ram_gb, "RAM")
    vram = None if vram_gb is None or (det_vram is not None and abs(vram_gb - det_vram) < 0.05) else vram_gb
    ram = None if ram_gb is None or (det_ram is not None and abs(ram_gb - det_ram) < 0.05) else ram_gb
    model = _family_key(model)
    try:
        hardware = with_overrides(detected, vram_gb=vram, ram_gb=ram, gpu_name=gpu)
    except FluxqError as exc:
        raise FluxqError(ui_text(str(exc))) from None
    width, height = parse_size(size)
    overridden = [name for name, value in (("GPU", gpu), ("VRAM", vram), ("RAM", ram)) if value is not None]
    return Plan(hardware, width, height, model, overridden, host)


# ---------------------------------------------------------------------------------------------- recommendation

def advise(plan: Plan, files: list[Any] | None = None) -> Any | None:
    """The advisor's Advice for ``plan`` (None when lib_fluxq.advisor is not installed)."""
    advisor = optional("lib_fluxq.advisor")
    if advisor is None:
        return None
    return advisor.advise(plan.hardware, plan.width, plan.height, model=plan.model, files=files, host=plan.host)


def _value_text(label: str, value: Any) -> str:
    """An advisor value in words: {'t5': 'fp16', 'placement': 'RAM'} -> 'T5 fp16, kept in RAM'."""
    if isinstance(value, dict) and "t5" in value:
        return f"T5 {value['t5']}, kept in {value.get('placement', 'RAM')}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{value[0]}×{value[1]}"
    if isinstance(value, bool):
        return "yes" if value else "not needed"
    if label == "GPU Weights":
        return f"{value} MB"
    if label == "VAE decode":
        return f"{value} decode"
    return str(value)


def preset_buttons(sizes: list[tuple[int, int]], label: str = "Send size to txt2img / img2img") -> str:
    """Buttons fluxq.js turns into txt2img/img2img width/height (data-fluxq-size)."""
    buttons = "".join(f'<button type="button" class="fluxq-preset" data-fluxq-size="{w}x{h}">{w}×{h}</button>'
                      for w, h in sizes)
    return (f'<div class="fluxq-presets"><span>{html.escape(label)}:</span>{buttons}'
            '<span class="fluxq-size-status fluxq-small"></span></div>')


def lora_note(advice: Any, lora_mode: str | None) -> str | None:
    """What LoRA does on the recommended level with the hook as installed (None: nothing to say).

    ``lora_mode`` is the host's answer (``host.lora_on_gguf()``): "requant" (fluxq re-quantizes LoRA-merged weights
    of every GGUF type), "online" (the WebUI applies LoRA in fp16 at every step), "off" (the WebUI merges and fluxq's
    re-quantization is off), "none" (no Flux loader); None: no WebUI here, the plan is for one with fluxq installed."""
    advisor = optional("lib_fluxq.advisor")
    level = getattr(advice.recommended, "value", None)
    spec = getattr(advisor, "LEVELS", {}).get(level) if advisor is not None else None
    if spec is None or getattr(spec, "lora_patch", True) or lora_mode == "none":
        return None   # Forge itself re-quantizes it (Q8_0, Q5_0, Q4_0), or not a level LoRA is merged into
    if lora_mode == "off":
        return (f"LoRA on {level}: Forge alone cannot re-quantize it and fluxq's re-quantization is off; turn on "
                f"'GGUF + LoRA: re-quantize every type' in Settings → fluxq, or set Diffusion in Low Bits to "
                f"'Automatic (fp16 LoRA)'")
    if lora_mode == "online":
        return f"LoRA works on {level}: this WebUI applies it in fp16 at every step"
    where = "" if lora_mode == "requant" else " in Forge with fluxq installed"
    return f"LoRA works on {level}{where}: fluxq re-quantizes the LoRA-merged weights (Forge alone cannot)"


def recommendation_html(advice: Any | None, plan: Plan, lora_mode: str | None = None) -> str:
    """The plan in plain words first (summary, one value per setting, warnings), the reasons and the advisor's
    numbers one click away."""
    if advice is None:
        return not_available("The recommendation", "lib_fluxq.advisor")
    planned = f" (planning for {', '.join(plan.overridden)} as entered)" if plan.overridden else ""
    parts = [f'<div class="fluxq-summary" id="fluxq_summary">{html.escape(advice.summary)}</div>',
             f'<div class="fluxq-small">{html.escape(family_title(plan.model))} on '
             f'{html.escape(advice.gpu or "no GPU")}'
             f' · VRAM {advice.vram_gb or 0:g} GB · RAM {advice.ram_gb or 0:g} GB{html.escape(planned)}</div>']
    if advice.recommended.value is None:
        parts.append(f'<div class="fluxq-note">{html.escape(ui_text(advice.recommended.reason))}</div>')
        return "".join(parts)
    rows = [("Quant level", advice.recommended), ("Faster alternative", advice.faster),
            ("Resolution", advice.resolution), ("GPU Weights", advice.gpu_weights_mb),
            ("Swap method", advice.swap_method), ("Swap location", advice.swap_location),
            ("Text encoders", advice.text_encoder), ("VAE decode", advice.vae), ("Refine", advice.refine)]
    plain, detail = [], []
    for label, choice in rows:
        if choice is None:
            plain.append(f"<tr><th>{label}</th><td>none faster at similar fidelity</td></tr>")
            continue
        plain.append(f"<tr><th>{label}</th><td class='fluxq-value'>"
                     f"{html.escape(_value_text(label, choice.value))}</td></tr>")
        numbers = ", ".join(f"{k} {v}" for k, v in choice.numbers.items() if v is not None)
        detail.append(f"<tr><th>{label}</th><td>{html.escape(ui_text(choice.reason))}"
                      f"{f'<div class=fluxq-small>{html.escape(numbers)}</div>' if numbers else ''}</td></tr>")
    parts.append(f'<div class="fluxq-scroll"><table class="fluxq-advice">{"".join(plain)}</table></div>')
    fitting = [(r["width"], r["height"]) for r in advice.resolutions if r.get("fit") in ("resident", "near-resident")]
    parts.append(preset_buttons([(advice.width, advice.height)] + [s for s in fitting
                                                                    if s != (advice.width, advice.height)]))
    note = lora_note(advice, lora_mode)
    warnings = [w for w in advice.warnings if not w.startswith("LoRA:")]   # replaced by the hook-aware note
    if note is not None and lora_mode == "off":
        warnings.insert(0, note)
    parts.extend(f'<div class="fluxq-note">{html.escape(ui_text(w))}</div>' for w in warnings)
    if note is not None and lora_mode != "off":
        parts.append(f'<div class="fluxq-small fluxq-lora">{html.escape(note)}</div>')
    parts.append(f'<details class="fluxq-numbers"><summary>Why, and the numbers</summary><div class="fluxq-scroll">'
                 f'<table class="fluxq-advice">{"".join(detail)}</table></div></details>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------- your models

@dataclass
class Inventory:
    files: list[ListedFile]            # the listing: readable files first, broken ones and outside links last
    verdicts: dict[str, Any]           # file name -> advisor FileVerdict
    note: str = ""

    @property
    def reports(self) -> list[Any]:
        """The inspector's reports of the files inside the model folders."""
        return [f.report for f in self.files if f.report is not None]


def new_listing(scan_paths: list[str]) -> Listing | None:
    """The listing of the model folders (None when lib_fluxq.inspect is not installed)."""
    inspect = optional("lib_fluxq.inspect")
    if inspect is None:
        return None
    folders = getattr(inspect, "MODEL_FOLDERS", None)
    return Listing(scan_paths, inspect.iter_model_files, inspect.inspect_file,
                   **({"model_folders": folders} if folders else {}))


def scan_models(paths: list[str]) -> list[Any] | None:
    """Inspector reports of the model files under ``paths``, as the tab lists them: each real file once, links that
    lead out of the folders not read (None when lib_fluxq.inspect is not installed)."""
    listing = new_listing(paths)
    return None if listing is None else [f.report for f in listing.rescan() if f.report is not None]


def inventory(listing: Listing | None, plan: Plan) -> Inventory | None:
    """Rescan the folders and judge each file for ``plan``."""
    if listing is None:
        return None
    files = listing.rescan()
    reports = [f.report for f in files if f.report is not None]
    advisor = optional("lib_fluxq.advisor")
    verdicts: dict[str, Any] = {}
    note = ""
    if advisor is None:
        note = "verdicts need lib_fluxq.advisor, which is not available yet in this install"
    else:
        # the advisor judges each file as its own family (a FLUX.2 [dev] Q4 weighs 19 GB, a FLUX.1 Q4 7 GB)
        planner = advisor.Planner(plan.hardware, plan.width, plan.height, model=plan.model, host=plan.host)
        for verdict in planner.rank_files(advisor.files_from_reports(reports)):
            verdicts[verdict.name] = verdict
    return Inventory(files, verdicts, note)


def verdict_text(verdict: Any | None) -> str:
    """'fits ~2.7 s/it' / 'offloads ~6.1 s/it' / "won't fit" / 'component' / '-'."""
    if verdict is None:
        return "-"
    if verdict.verdict in ("fits", "offloads") and verdict.step_s is not None:
        return f"{verdict.verdict} ~{verdict.step_s:g} s/it"
    return verdict.verdict


def plan_ram(plan: Plan) -> int:
    """Free RAM (bytes) the pairing plans with: it picks the T5 precision."""
    return plan.hardware.ram_available or plan.hardware.ram_total or 0


def download_button(entry: catalog.CatalogEntry, title: str | None = None) -> str:
    """A button fluxq.js turns into a download of catalog entry ``entry`` (the same event as Get a model's)."""
    label = f"Get {title or entry.title} ({entry.size_gb:g} GB)"
    where = f"{entry.repo}/{entry.filename} into {entry.folder}"
    return (f'<button type="button" class="fluxq-get" data-fluxq-download="{html.escape(entry.key)}" '
            f'title="{html.escape(where)}">{html.escape(label)}</button>')


FULL_PRECISION = ("fp32", "fp16", "bf16")


def part_download(part: str, free_ram: int = 0) -> catalog.CatalogEntry | None:
    """The file to get for a missing ``part``: the family table's default, or its full-precision file where the
    table says this much free RAM affords it (T5-XXL fp16 from 32 GB)."""
    entries = catalog.for_part(part)
    comp = families.COMPANIONS.get(part)
    threshold = getattr(comp, "full_precision_min_free_ram", None)
    if threshold is not None:
        full = [e for e in entries if (e.level or "").lower() in FULL_PRECISION]
        small = [e for e in entries if e not in full]
        entries = full + small if free_ram >= threshold else small + full
    return entries[0] if entries else None


def missing_cell(parts: list[str], free_ram: int = 0) -> Markup:
    """The parts a checkpoint lacks, each with a button that downloads its file from the catalog."""
    items = []
    for part in parts:
        entry = part_download(part, free_ram)
        title = families.part_title(part)
        items.append(download_button(entry, title) if entry else html.escape(title))
    return Markup(f'<div class="fluxq-missing" data-parts="{html.escape(",".join(parts))}">{"".join(items)}</div>')


def _missing(report: Any, pairing: ModuleType | None, available: list[Any], ram: int) -> str | Markup:
    """A transformer's "missing parts": what neither the file nor a text-encoder / VAE file on disk provides (the
    same pairing "Use this" and the load hook do), with a download button per part, or the files it pairs with."""
    if pairing is None:   # no pairing in this install: what the file itself lacks
        lacking = [p for p in report.missing_for_flux if p != "transformer"]
        return missing_cell(lacking, ram) if lacking else "-"
    try:
        chosen = pairing.choose_pairing(pairing.describe_file(report.path), [], available, ram)
    except (FluxqError, OSError):
        return "? (the file could not be read again)"
    if chosen.missing:
        return missing_cell(list(chosen.missing), ram)
    if chosen.added:
        return "none: pairs with " + ", ".join(os.path.basename(path) for path in chosen.added.values())
    return "none"


def is_transformer(entry: ListedFile) -> bool:
    return entry.report is not None and entry.report.status == "ok" and entry.report.family in TRANSFORMER_FAMILIES


def is_convertible(entry: ListedFile) -> bool:
    return is_transformer(entry) and entry.report.level in CONVERTIBLE_LEVELS


def is_comparable(entry: ListedFile) -> bool:
    return (is_transformer(entry) and entry.report.level in COMPARABLE_LEVELS
            and families.FAMILIES[entry.report.family].arch in COMPARE_ARCHS)


def module_files(host: Any, listing: Listing | None) -> list[str]:
    """The host's text-encoder / VAE files that lie inside the model folders (a link leading out is never read)."""
    files = host.module_files()
    return files if listing is None else [f for f in files if listing.inside(f)]


def model_rows(inv: Inventory, module_paths: list[str] | None = None, ram: int = 0) -> list[list[Any]]:
    """One table row per file, readable ones first. ``module_paths``: the text-encoder / VAE files Forge can pair
    (``module_files``); ``ram``: free RAM in bytes, which picks the T5 precision as "Use this" does."""
    pairing = optional("lib_fluxq.pairing")
    available = pairing.describe_files(module_paths or []) if pairing is not None else []
    rows = []
    for entry in inv.files:
        r = entry.report
        if r is None:
            rows.append([entry.name, "-", "link outside the model folders", "-", "-", "-", "-",
                         "not read: the tab uses only files inside the model folders"])
        elif r.status != "ok":
            rows.append([entry.name, r.folder or "-", r.status, "-", _size(r.file_size), "-", "-",
                         ui_text(r.error or "")])
        else:
            missing = _missing(r, pairing, available, ram) if r.family in TRANSFORMER_FAMILIES else "-"
            rows.append([entry.name, r.folder or "-", family_title(r.family), r.level or "-", _size(r.file_size),
                         ", ".join(r.components) or "-", verdict_text(inv.verdicts.get(entry.name)), missing])
    return rows


def transformer_choices(inv: Inventory | None) -> list[str]:
    """Labels of the Flux transformers in the inventory, best verdict first (for "Use this")."""
    if inv is None:
        return []
    order = {"fits": 0, "offloads": 1}
    found = [f for f in inv.files if is_transformer(f)]
    found.sort(key=lambda f: (order.get(getattr(inv.verdicts.get(f.name), "verdict", ""), 2), f.name))
    return [f.label for f in found]


def convertible_choices(inv: Inventory | None) -> list[str]:
    """Labels of the full-precision / FP8 Flux transformers the converter accepts."""
    return [] if inv is None else [f.label for f in inv.files if is_convertible(f)]


def comparable_choices(inv: Inventory | None) -> list[str]:
    """Labels of the full-precision FLUX.1-family transformers the comparison measures."""
    return [] if inv is None else [f.label for f in inv.files if is_comparable(f)]


def find_checkpoint(listing: Listing | None, label: Any) -> ListedFile:
    if listing is None:
        raise FluxqError("listing model files needs lib_fluxq.inspect, which is not available yet")
    return listing.find(label, is_transformer, "a Flux-family transformer (FLUX.1, Chroma, FLUX.2)")


def find_convertible(listing: Listing | None, label: Any) -> ListedFile:
    if listing is None:
        raise FluxqError("listing model files needs lib_fluxq.inspect, which is not available yet")
    return listing.find(label, is_convertible, "a full-precision or FP8 Flux transformer (F32 / F16 / BF16 / FP8)")


def find_comparable(listing: Listing | None, label: Any) -> ListedFile:
    if listing is None:
        raise FluxqError("listing model files needs lib_fluxq.inspect, which is not available yet")
    return listing.find(label, is_comparable, "a full-precision FLUX.1 transformer (F32 / F16 / BF16): the "
                                              "comparison measures FLUX.1 blocks")


# ---------------------------------------------------------------------------------------------------- use this

@dataclass
class UsePlan:
    checkpoint: str
    modules: list[str]                 # text encoder / VAE paths to select
    added: dict[str, str]              # part -> path chosen by pairing
    missing: list[str]                 # parts nothing on disk provides
    gpu_weights_mb: int | None
    width: int
    height: int
    message: str


def use_plan(checkpoint: str, module_paths: list[str], plan: Plan, advice: Any | None,
             free_ram: int | None = None) -> UsePlan:
    """Which modules go with ``checkpoint`` (by content, lib_fluxq.pairing) and the advisor's GPU Weights/size.
    ``checkpoint`` is a path the listing resolved (``find_checkpoint``)."""
    pairing = optional("lib_fluxq.pairing")
    if pairing is None:
        raise FluxqError("choosing text encoders / VAE needs lib_fluxq.pairing, which is not available yet")
    contents = pairing.describe_file(checkpoint)
    available = pairing.describe_files(module_paths)
    ram = free_ram if free_ram is not None else plan_ram(plan)
    chosen = pairing.choose_pairing(contents, [], available, ram)
    gpu_mb = None
    width, height = plan.width, plan.height
    if advice is not None and advice.recommended.value is not None:
        gpu_mb = int(advice.gpu_weights_mb.value)
        width, height = advice.width, advice.height
    lines = [f"Checkpoint: {os.path.basename(checkpoint)}"]
    lines += [f"{pairing.PART_TITLES.get(p, p)}: {os.path.basename(path)}" for p, path in chosen.added.items()]
    if chosen.missing:
        titles = ", ".join(pairing.PART_TITLES.get(p, p) for p in chosen.missing)
        keys = ", ".join(e.key for p in chosen.missing for e in catalog.for_part(p))
        lines.append(f"Missing: {titles}. Download under Get a model ({keys}); fluxq pairs them by content.")
    if gpu_mb is not None:
        lines.append(f"GPU Weights: {gpu_mb} MB; size {width}x{height}")
    return UsePlan(checkpoint, list(chosen.modules), dict(chosen.added), list(chosen.missing), gpu_mb, width,
                   height, "\n".join(lines))


# ------------------------------------------------------------------------------------------------- get a model

def catalog_choices() -> list[tuple[str, str]]:
    """(label, key) for the download list: what the file is, its name and size; the key is what the server checks."""
    return [(f"{e.title} — {e.basename} ({e.size_gb:g} GB)", e.key) for e in catalog.CATALOG]


def catalog_html() -> str:
    """The catalog table, one click away (it lists every family's files)."""
    return (f'<details class="fluxq-catalog"><summary>Browse the catalog ({len(catalog.CATALOG)} files: '
            f'transformers, text encoders, VAEs — repository, size, licence, folder)</summary>'
            f'{table_html(CATALOG_COLUMNS, catalog_rows(), wrap=("what",))}</details>')


def catalog_rows() -> list[list[str]]:
    return [[e.key, e.filename, e.title + (f" — {e.note}" if e.note else ""),
             f"{e.size_gb:g} GB" + (" (est.)" if e.size_source == "estimated" else ""),
             e.licence + (" (gated)" if e.gated else ""), e.folder, e.repo] for e in catalog.CATALOG]


def _shown(listing: Listing | None, path: str) -> str:
    return listing.shown_path(path) if listing is not None else os.path.basename(path)


def _redacting(work: Callable[[jobs.Job], Any], listing: Listing | None) -> Callable[[jobs.Job], Any]:
    """``work`` whose errors name model files relative to the models folder, in the tab's words."""
    def run(job: jobs.Job) -> Any:
        try:
            return work(job)
        except FluxqError as exc:
            text = ui_text(str(exc))
            raise FluxqError(listing.redact(text) if listing is not None else text) from None
    return run


def start_download(runner: jobs.JobRunner, key: Any, folders: dict[str, str], token: str | None = None,
                   listing: Listing | None = None) -> jobs.Job:
    """Queue the download of catalog entry ``key`` into its WebUI folder (refused if it is already running).

    An empty ``token`` sends no token at all: a visitor never borrows the server's own Hugging Face login."""
    from lib_fluxq import download
    if not isinstance(key, str) or key not in {e.key for e in catalog.CATALOG}:
        raise RefusedPath(f"'{str(key)[:40]}' is not in the catalog; pick a file from the list")
    entry = catalog.get(key)
    dest = catalog.target_path(entry, folders)
    secret = str(token or "").strip() or False

    def work(job: jobs.Job) -> str:
        def space(folder: str, needed: int) -> None:
            runner.reserve(job, folder, needed, entry.filename)

        result = download.download(entry.repo, entry.filename, os.path.dirname(dest), token=secret,
                                   progress=lambda done, total, text: job.report(done, total, text,
                                                                                 bytes_left=total - done),
                                   cancel=job.cancel, space_check=space)
        shown = _shown(listing, result.path)
        if result.already_present:
            return f"{shown} is already there ({_size(result.size)})"
        resumed = f", resumed at {_size(result.resumed_from)}" if result.resumed_from else ""
        return f"saved {shown} ({_size(result.size)} in {result.seconds:.1f} s{resumed})"

    return runner.start("download", f"download {entry.filename}", dest, _redacting(work, listing))


# ------------------------------------------------------------------------------------------------------ convert

def convert_targets() -> list[str]:
    convert = optional("lib_fluxq.convert")
    return convert.target_names() if convert is not None else []


def _convert_module() -> ModuleType:
    convert = optional("lib_fluxq.convert")
    if convert is None:
        raise FluxqError("converting needs lib_fluxq.convert, which is not available yet")
    return convert


def convert_output(src: str, qtype: str) -> str:
    """The converter's default output path for ``src`` (next to it)."""
    convert = _convert_module()
    return str(convert.default_output(src, convert.parse_target(qtype)))


def default_output_name(listing: Listing | None, label: Any, qtype: Any) -> str:
    """The output file name Convert suggests for a listed source ('' when there is none yet)."""
    if listing is None or not label or not qtype:
        return ""
    try:
        source = find_convertible(listing, label)
        return os.path.basename(convert_output(source.path, qtype))
    except FluxqError:
        return ""


def _output_suffix(qtype: str) -> str:
    return ".safetensors" if str(qtype).lower() == "nf4" else ".gguf"


def convert_destination(source: ListedFile, qtype: str, name: str | None, replace: bool) -> str:
    """Where Convert writes: a plain file name (the suggested one when empty) in the source's own folder.

    Refuses folders in the name, hidden names, another format's extension, the source itself, a folder or a link
    of that name, and an existing file unless ``replace``. (A file that appears after this check is still never
    overwritten without ``replace``: the job publishes with ``jobs.place_file``.)"""
    folder = os.path.dirname(source.real)
    shown_folder = os.path.dirname(source.label) or "its folder"
    text = str(name or "").strip()
    if not text:
        text = os.path.basename(convert_output(source.real, qtype))
    suffix = _output_suffix(qtype)
    if len(text) > MAX_TEXT or re.search(r"[\x00-\x1f/\\:]", text) or text.startswith(".") or text in ("", ".."):
        raise FluxqError("give the output as a plain file name (no folder, not starting with a dot); it is written "
                         f"next to the source, in {shown_folder}")
    if not text.lower().endswith(suffix):
        if text.lower().endswith((".gguf", ".safetensors")):
            raise FluxqError(f"{text}: a {qtype} file is written as {suffix}; change the name's ending")
        text += suffix
    dst = os.path.join(folder, text)
    if os.path.lexists(dst):
        if os.path.islink(dst) or not os.path.isfile(dst):
            raise FluxqError(f"{text} in {shown_folder} is a link or a folder; give another output name")
        if os.path.samefile(dst, source.real):
            raise FluxqError(f"{text} is the source itself; give another output name")
        if not replace:
            raise FluxqError(f"{text} already exists in {shown_folder}: tick 'Replace an existing file' or give "
                             f"another output name")
    return dst


def _estimated_bytes(source: ListedFile, qtype: str) -> int:
    """About what the output of ``source`` at ``qtype`` takes on disk (for the disk-space reservation)."""
    params = getattr(source.report, "parameters", 0) or 0
    if str(qtype).lower() == "nf4":
        bits = 4.6   # 4-bit codes + a bf16 absmax per 64 weights, plus the few tensors kept in bf16
    else:
        import gguf
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[str(qtype).upper()]]
        bits = 8 * size / block
    return int(params * bits / 8 * 1.05) + (1 << 20) if params else os.path.getsize(source.real)


def start_convert(runner: jobs.JobRunner, source: ListedFile, qtype: Any, recipe: Any = "default",
                  name: str | None = None, replace: bool = False, listing: Listing | None = None) -> jobs.Job:
    """Queue the conversion of a listed ``source`` (``find_convertible``) to ``qtype`` in its folder."""
    convert = _convert_module()
    if qtype not in convert_targets():
        raise FluxqError(f"'{str(qtype)[:20]}' is not a type Convert offers; pick one from the list")
    if recipe not in ("default", "all"):
        raise FluxqError("choose the recipe 'default' or 'all'")
    dst = convert_destination(source, qtype, name, bool(replace))
    folder, out_name = os.path.dirname(dst), os.path.basename(dst)
    shown = _shown(listing, dst)

    def work(job: jobs.Job) -> str:
        runner.reserve(job, folder, _estimated_bytes(source, qtype), out_name)
        # written under a hidden name first, then published in one step that never overwrites a file that appeared
        # meanwhile (unless the page asked to replace it)
        hidden = os.path.join(folder, f".{out_name}.{secrets.token_hex(4)}.fluxq-tab")
        try:
            result = convert.convert_file(source.real, hidden, qtype, recipe=recipe, cancel=job.cancel,
                                          progress=lambda done, total, tensor: job.report(
                                              done, total, f"{done}/{total} tensors — {tensor}"))
            try:
                jobs.place_file(hidden, dst, replace=bool(replace))
            except FileExistsError:
                raise FluxqError(f"{out_name} appeared while converting and was not replaced: tick 'Replace an "
                                 f"existing file' or give another output name") from None
        finally:
            if os.path.lexists(hidden):
                os.unlink(hidden)
        return (f"wrote {shown}: {result.target}, {result.n_quantized} of {result.n_tensors} tensors quantized, "
                f"{_size(result.n_bytes)} in {result.seconds:.1f} s")

    return runner.start("convert", f"convert {source.name} → {qtype}", dst, _redacting(work, listing))


# ------------------------------------------------------------------------------------------------------ compare

def start_compare(runner: jobs.JobRunner, source: ListedFile | None, levels: Any, plot_path: str,
                  listing: Listing | None = None) -> jobs.Job:
    """Queue a comparison on a listed full-precision ``source`` (``find_comparable``) or the synthetic slice."""
    compare = optional("lib_fluxq.compare")
    if compare is None:
        raise FluxqError("the comparison needs lib_fluxq.compare, which is not available yet")
    text = str(levels or "")
    if len(text) > MAX_TEXT:
        raise FluxqError("Levels: give a short comma-separated list such as Q8_0,Q4_K,NF4")
    try:
        chosen = compare.select_levels(text or None)
    except FluxqError as exc:
        raise FluxqError(ui_text(str(exc))) from None

    def work(job: jobs.Job) -> Any:
        job.report(0, None, "reading blocks")
        weights = compare.open_source(source.real if source is not None else None)
        try:
            defaults = compare.SYNTHETIC_DEFAULTS if weights.info.synthetic else compare.FILE_DEFAULTS
            config = weights.info.config
            blocks = max(1, min(defaults["blocks"], config.depth, config.depth_single))
            width, height = compare.parse_resolution(defaults["res"])
            result = compare.run_comparison(weights, chosen, blocks=blocks, width=width, height=height,
                                            text_tokens=defaults["text_tokens"], progress=False)
        finally:
            weights.close()
        compare.write_plot(result, plot_path)
        return result

    what = source.name if source is not None else "the synthetic slice"
    job = runner.start("compare", f"compare levels on {what}", plot_path, _redacting(work, listing))
    job.on_forget.append(lambda: os.path.exists(plot_path) and os.remove(plot_path))
    return job


def compare_rows(comparison: Any) -> list[list[str]]:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)
    rows = []
    for r in comparison.levels:
        if not r.available:
            rows.append([r.level, "-", "-", "-", "-", "-", ui_text(r.reason or "unavailable")])
            continue
        rows.append([r.level, fmt(r.bits_per_weight, ".3f"), fmt(r.flux_dev_gb, ".2f"), fmt(r.weight_rel_rmse, ".3e"),
                     fmt(r.block_rel_error, ".3e"), fmt(r.block_cosine, ".6f"), fmt(r.dequant_melem_s, ".0f")])
    return rows


# --------------------------------------------------------------------------------------------------------- jobs

def jobs_html(runner: jobs.JobRunner, kind: str | None = None, mine: Collection[int] = ()) -> str:
    """Progress bars of the jobs (of one kind), newest first. Jobs in ``mine`` (the visitor's own) show their
    progress text and result; other visitors' jobs only their title (base names), state and progress."""
    listed = [j for j in runner.jobs() if kind is None or j.kind == kind]
    if not listed:
        return '<div class="fluxq-small">no jobs yet</div>'
    active = [j for j in listed if j.active]   # few: the runner's limits bound them
    shown = active + [j for j in listed if not j.active][:max(0, SHOWN_JOBS - len(active))]
    items = []
    for job in shown:
        fraction = job.fraction
        bar = (f'<progress max="1" value="{fraction:.4f}"></progress> {fraction * 100:.0f}%' if fraction is not None
               else '<progress></progress>')
        own = job.id in mine
        text = (job.result if not job.active and job.result else job.text) if own else "(started by another visitor)"
        state = "cancelling" if job.active and job.cancel.is_set() else job.state
        items.append(f'<div class="fluxq-job fluxq-job-{job.state}" data-job="{job.id}" data-state="{job.state}" '
                     f'data-mine="{int(own)}"><b>#{job.id} {html.escape(job.title)}</b> '
                     f'<span class="fluxq-state">{state}</span> {bar} '
                     f'<span class="fluxq-jobtext">{html.escape(text or "")}</span> '
                     f'<span class="fluxq-small">{job.elapsed():.1f} s</span></div>')
    return "".join(items)


def any_active(runner: jobs.JobRunner, kind: str | None = None, mine: Collection[int] | None = None) -> bool:
    """Whether a job (of ``kind``; among ``mine`` when given) is running or waiting."""
    return any(j.active for j in runner.jobs()
               if (kind is None or j.kind == kind) and (mine is None or j.id in mine))
