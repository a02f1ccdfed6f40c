"""The functions behind the Flux Quant tab: plain Python in, plain data / HTML out, no gradio.

tab.py wires these to widgets; tests call them directly. Every section degrades to a clear "not available yet" note
when the engine module it shows is missing in this install (``optional(...)``), never to made-up numbers.
"""

from __future__ import annotations

import html
import importlib
import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lib_fluxq import catalog, jobs
from lib_fluxq.errors import FluxqError
from lib_fluxq.hardware import GIB, Hardware, detect, with_overrides

SIZE_PRESETS = ("1024x1024", "896x1152", "832x1216", "768x1344", "768x1024", "768x768", "512x768", "512x512")
MODEL_COLUMNS = ["file", "folder", "family", "level", "size", "components", "verdict", "missing parts"]
CATALOG_COLUMNS = ["key", "file", "what", "size", "licence", "folder", "repository"]
COMPARE_COLUMNS = ["level", "bits/w", "Flux-dev GB", "weight rRMSE", "block rel.err", "block cos", "dequant M/s"]
CONVERTIBLE_LEVELS = ("F32", "F16", "BF16", "FP8 e4m3fn", "FP8 e5m2")
TRANSFORMER_FAMILIES = ("flux-dev", "flux-schnell")


def optional(name: str) -> ModuleType | None:
    """An engine module that may not be in this install yet (sections then say so)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def not_available(what: str, module: str) -> str:
    return (f'<div class="fluxq-note fluxq-unavailable">{html.escape(what)} is not available yet in this fluxq '
            f'install (<code>{html.escape(module)}</code> is missing).</div>')


def error_html(exc: BaseException) -> str:
    return f'<div class="fluxq-note fluxq-error">{html.escape(str(exc))}</div>'


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GB"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


# ------------------------------------------------------------------------------------------------- this machine

@dataclass
class Plan:
    """What the user plans for: the detected machine plus their overrides, a target size and Flux variant."""

    hardware: Hardware
    width: int = 1024
    height: int = 1024
    model: str = "dev"
    overridden: list[str] = field(default_factory=list)


def detect_machine(models_dir: str | None = None) -> Hardware:
    return detect(models_dir)


def machine_fields(hardware: Hardware) -> tuple[str, float | None, float | None]:
    """(GPU name, VRAM GB, RAM GB) to prefill the editable fields."""
    vram = None if hardware.vram_total is None else round(hardware.vram_total / GIB, 1)
    ram = None if hardware.ram_total is None else round(hardware.ram_total / GIB, 1)
    return hardware.gpu_name or "", vram, ram


def machine_html(hardware: Hardware) -> str:
    rows = [("Backend", hardware.backend.upper()), ("GPU", hardware.gpu_name or "none found"),
            ("VRAM", _gb(hardware.vram_total) + (f" ({_gb(hardware.vram_free)} free)" if hardware.vram_free else "")),
            ("RAM", _gb(hardware.ram_total) + (f" ({_gb(hardware.ram_available)} available)"
                                               if hardware.ram_available else "")),
            ("CPU cores", str(hardware.cpu_cores or "-")),
            ("Free disk", f"{_gb(hardware.disk_free)} in {hardware.disk_path}" if hardware.disk_free else "-")]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    sources = ", ".join(f"{k}: {v}" for k, v in hardware.sources.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in hardware.notes)
    return (f'<table class="fluxq-kv">{body}</table><div class="fluxq-small">detected by {html.escape(sources)}'
            f'</div>{f"<ul class=fluxq-small>{notes}</ul>" if notes else ""}')


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", text or "")
    if not match:
        raise FluxqError(f"size '{text}': give WIDTHxHEIGHT, e.g. 1024x1024")
    return int(match.group(1)), int(match.group(2))


def make_plan(detected: Hardware, gpu_name: str | None, vram_gb: float | None, ram_gb: float | None,
              size: str = "1024x1024", model: str = "dev") -> Plan:
    """The machine to plan for: a field left as detected (or empty) is not an override."""
    det_gpu, det_vram, det_ram = machine_fields(detected)
    gpu = (gpu_name or "").strip() or None
    gpu = None if gpu == det_gpu else gpu
    vram = None if vram_gb in (None, 0) or (det_vram is not None and abs(float(vram_gb) - det_vram) < 0.05) \
        else float(vram_gb)
    ram = None if ram_gb in (None, 0) or (det_ram is not None and abs(float(ram_gb) - det_ram) < 0.05) \
        else float(ram_gb)
    hardware = with_overrides(detected, vram_gb=vram, ram_gb=ram, gpu_name=gpu)
    width, height = parse_size(size)
    overridden = [name for name, value in (("GPU", gpu), ("VRAM", vram), ("RAM", ram)) if value is not None]
    return Plan(hardware, width, height, model, overridden)


# ---------------------------------------------------------------------------------------------- recommendation

def advise(plan: Plan, files: list[Any] | None = None) -> Any | None:
    """The advisor's Advice for ``plan`` (None when lib_fluxq.advisor is not installed)."""
    advisor = optional("lib_fluxq.advisor")
    if advisor is None:
        return None
    return advisor.advise(plan.hardware, plan.width, plan.height, model=plan.model, files=files)


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value)


def preset_buttons(sizes: list[tuple[int, int]], label: str = "Send size to txt2img / img2img") -> str:
    """Buttons fluxq.js turns into txt2img/img2img width/height (data-fluxq-size)."""
    buttons = "".join(f'<button type="button" class="fluxq-preset" data-fluxq-size="{w}x{h}">{w}×{h}</button>'
                      for w, h in sizes)
    return (f'<div class="fluxq-presets"><span>{html.escape(label)}:</span>{buttons}'
            '<span class="fluxq-size-status fluxq-small"></span></div>')


def recommendation_html(advice: Any | None, plan: Plan) -> str:
    if advice is None:
        return not_available("The recommendation", "lib_fluxq.advisor")
    planned = f" (planning for {', '.join(plan.overridden)} as entered)" if plan.overridden else ""
    parts = [f'<div class="fluxq-summary" id="fluxq_summary">{html.escape(advice.summary)}</div>',
             f'<div class="fluxq-small">FLUX.1-{html.escape(plan.model)} on {html.escape(advice.gpu or "no GPU")}'
             f' · VRAM {advice.vram_gb or 0:g} GB · RAM {advice.ram_gb or 0:g} GB{html.escape(planned)}</div>']
    if advice.recommended.value is None:
        parts.append(f'<div class="fluxq-note">{html.escape(advice.recommended.reason)}</div>')
        return "".join(parts)
    rows = [("Quant level", advice.recommended), ("Faster alternative", advice.faster),
            ("Resolution", advice.resolution), ("GPU Weights (MB)", advice.gpu_weights_mb),
            ("Swap method", advice.swap_method), ("Swap location", advice.swap_location),
            ("Text encoders", advice.text_encoder), ("VAE decode", advice.vae), ("Refine", advice.refine)]
    body = []
    for label, choice in rows:
        if choice is None:
            body.append(f"<tr><th>{label}</th><td>-</td><td>none faster at similar fidelity</td></tr>")
            continue
        numbers = ", ".join(f"{k} {v}" for k, v in choice.numbers.items() if v is not None)
        body.append(f"<tr><th>{label}</th><td class='fluxq-value'>{html.escape(_value_text(choice.value))}</td>"
                    f"<td>{html.escape(choice.reason)}<div class='fluxq-small'>{html.escape(numbers)}</div></td></tr>")
    parts.append(f'<table class="fluxq-advice"><tr><th></th><th>value</th><th>why (and the numbers)</th></tr>'
                 f'{"".join(body)}</table>')
    fitting = [(r["width"], r["height"]) for r in advice.resolutions if r.get("fit") in ("resident", "near-resident")]
    parts.append(preset_buttons([(advice.width, advice.height)] + [s for s in fitting
                                                                    if s != (advice.width, advice.height)]))
    parts.extend(f'<div class="fluxq-note">{html.escape(w)}</div>' for w in advice.warnings)
    return "".join(parts)


# ------------------------------------------------------------------------------------------------- your models

@dataclass
class Inventory:
    reports: list[Any]                 # lib_fluxq.inspect FileReports
    verdicts: dict[str, Any]           # file name -> advisor FileVerdict
    note: str = ""


def scan_models(paths: list[str]) -> list[Any] | None:
    inspect = optional("lib_fluxq.inspect")
    if inspect is None:
        return None
    # a host may name a models root and its subfolders (Forge's --ckpt-dir etc.): list each file once
    seen: set[str] = set()
    reports = []
    for report in inspect.scan([p for p in paths if os.path.exists(p)]):
        key = os.path.realpath(report.path)
        if key not in seen:
            seen.add(key)
            reports.append(report)
    return reports


def inventory(paths: list[str], plan: Plan) -> Inventory | None:
    reports = scan_models(paths)
    if reports is None:
        return None
    advisor = optional("lib_fluxq.advisor")
    verdicts: dict[str, Any] = {}
    note = ""
    if advisor is None:
        note = "verdicts need lib_fluxq.advisor, which is not available yet in this install"
    else:
        planner = advisor.Planner(plan.hardware, plan.width, plan.height, model=plan.model)
        for verdict in planner.rank_files(advisor.files_from_reports(reports)):
            verdicts[verdict.name] = verdict
    return Inventory(reports, verdicts, note)


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


def _missing_text(report: Any, pairing: ModuleType | None, available: list[Any], ram: int) -> str:
    """A Flux transformer's "missing parts": what neither the file nor a text-encoder / VAE file on disk provides
    (the same pairing "Use this" and the load hook do), or which files it will be paired with."""
    if pairing is None:   # no pairing in this install: what the file itself lacks
        return ", ".join(p for p in report.missing_for_flux if p != "transformer") or "-"
    try:
        chosen = pairing.choose_pairing(pairing.describe_file(report.path), [], available, ram)
    except (FluxqError, OSError) as exc:
        return f"? ({exc})"
    if chosen.missing:
        return ", ".join(chosen.missing) + " (see Get a model)"
    if chosen.added:
        return "none: pairs with " + ", ".join(os.path.basename(path) for path in chosen.added.values())
    return "none"


def model_rows(inv: Inventory, module_files: list[str] | None = None, ram: int = 0) -> list[list[str]]:
    """One table row per file. ``module_files``: the text-encoder / VAE files Forge can pair (host.module_files());
    ``ram``: free RAM in bytes, which picks the T5 precision as "Use this" does."""
    pairing = optional("lib_fluxq.pairing")
    available = pairing.describe_files(module_files or []) if pairing is not None else []
    rows = []
    for r in inv.reports:
        name = os.path.basename(r.path)
        if r.status != "ok":
            rows.append([name, r.folder or "-", r.status, "-", _size(r.file_size), "-", "-", r.error or ""])
            continue
        missing = _missing_text(r, pairing, available, ram) if r.family in TRANSFORMER_FAMILIES else "-"
        rows.append([name, r.folder or "-", r.family, r.level or "-", _size(r.file_size),
                     ", ".join(r.components) or "-", verdict_text(inv.verdicts.get(name)), missing])
    return rows


def transformer_choices(inv: Inventory | None) -> list[str]:
    """Paths of the Flux transformers in the inventory, best verdict first (for "Use this")."""
    if inv is None:
        return []
    order = {"fits": 0, "offloads": 1}
    found = [r for r in inv.reports if r.status == "ok" and r.family in TRANSFORMER_FAMILIES]
    found.sort(key=lambda r: (order.get(getattr(inv.verdicts.get(os.path.basename(r.path)), "verdict", ""), 2),
                              os.path.basename(r.path)))
    return [r.path for r in found]


def convertible_choices(inv: Inventory | None) -> list[str]:
    """Full-precision / FP8 Flux transformers the converter accepts."""
    if inv is None:
        return []
    return [r.path for r in inv.reports if r.status == "ok" and r.family in TRANSFORMER_FAMILIES
            and (r.level in CONVERTIBLE_LEVELS)]


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


def use_plan(checkpoint: str, module_files: list[str], plan: Plan, advice: Any | None,
             free_ram: int | None = None) -> UsePlan:
    """Which modules go with ``checkpoint`` (by content, lib_fluxq.pairing) and the advisor's GPU Weights/size."""
    pairing = optional("lib_fluxq.pairing")
    if pairing is None:
        raise FluxqError("choosing text encoders / VAE needs lib_fluxq.pairing, which is not available yet")
    contents = pairing.describe_file(checkpoint)
    available = pairing.describe_files(module_files)
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
        lines.append(pairing.missing_files_message(checkpoint, chosen.missing))
    if gpu_mb is not None:
        lines.append(f"GPU Weights: {gpu_mb} MB; size {width}x{height}")
    return UsePlan(checkpoint, list(chosen.modules), dict(chosen.added), list(chosen.missing), gpu_mb, width,
                   height, "\n".join(lines))


def table_html(columns: list[str], rows: list[list[str]], elem_class: str = "fluxq-table") -> str:
    """A plain HTML table (gradio's Dataframe virtualizes rows and leaves off-screen ones blank)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{elem_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ------------------------------------------------------------------------------------------------- get a model

def catalog_rows() -> list[list[str]]:
    return [[e.key, e.filename, e.title + (f" — {e.note}" if e.note else ""),
             f"{e.size_gb:g} GB" + (" (est.)" if e.size_source == "estimated" else ""),
             e.licence + (" (gated)" if e.gated else ""), e.folder, e.repo] for e in catalog.CATALOG]


def start_download(runner: jobs.JobRunner, key: str, folders: dict[str, str], token: str | None = None) -> jobs.Job:
    """Queue the download of catalog entry ``key`` into its WebUI folder (refused if it is already running)."""
    from lib_fluxq import download
    entry = catalog.get(key)
    dest = catalog.target_path(entry, folders)

    def work(job: jobs.Job) -> str:
        result = download.download(entry.repo, entry.filename, os.path.dirname(dest), token=(token or None),
                                   progress=lambda done, total, text: job.report(done, total, text),
                                   cancel=job.cancel)
        if result.already_present:
            return f"{result.path} is already there ({_size(result.size)})"
        resumed = f", resumed at {_size(result.resumed_from)}" if result.resumed_from else ""
        return f"saved {result.path} ({_size(result.size)} in {result.seconds:.1f} s{resumed})"

    return runner.start("download", f"download {entry.filename}", dest, work)


# ------------------------------------------------------------------------------------------------------ convert

def convert_targets() -> list[str]:
    convert = optional("lib_fluxq.convert")
    return convert.target_names() if convert is not None else []


def convert_output(src: str, qtype: str) -> str:
    convert = optional("lib_fluxq.convert")
    if convert is None:
        raise FluxqError("converting needs lib_fluxq.convert, which is not available yet")
    return str(convert.default_output(src, convert.parse_target(qtype)))


def start_convert(runner: jobs.JobRunner, src: str, qtype: str, recipe: str = "default",
                  dst: str | None = None) -> jobs.Job:
    convert = optional("lib_fluxq.convert")
    if convert is None:
        raise FluxqError("converting needs lib_fluxq.convert, which is not available yet")
    if not src:
        raise FluxqError("choose a source file to convert (a full-precision or FP8 Flux transformer)")
    out = dst or convert_output(src, qtype)

    def work(job: jobs.Job) -> str:
        result = convert.convert_file(src, out, qtype, recipe=recipe, cancel=job.cancel,
                                      progress=lambda done, total, name: job.report(
                                          done, total, f"{done}/{total} tensors — {name}"))
        return (f"wrote {result.path}: {result.target}, {result.n_quantized} of {result.n_tensors} tensors "
                f"quantized, {_size(result.n_bytes)} in {result.seconds:.1f} s")

    return runner.start("convert", f"convert {os.path.basename(src)} → {qtype}", out, work)


# ------------------------------------------------------------------------------------------------------ compare

def start_compare(runner: jobs.JobRunner, source: str | None, levels: str, plot_path: str) -> jobs.Job:
    compare = optional("lib_fluxq.compare")
    if compare is None:
        raise FluxqError("the comparison needs lib_fluxq.compare, which is not available yet")
    chosen = compare.select_levels(levels or None)

    def work(job: jobs.Job) -> Any:
        job.report(0, None, "reading blocks")
        weights = compare.open_source(source or None)
        try:
            defaults = compare.SYNTHETIC_DEFAULTS if weights.info.synthetic else compare.FILE_DEFAULTS
            width, height = compare.parse_resolution(defaults["res"])
            result = compare.run_comparison(weights, chosen, blocks=defaults["blocks"], width=width, height=height,
                                            text_tokens=defaults["text_tokens"], progress=False)
        finally:
            weights.close()
        compare.write_plot(result, plot_path)
        return result

    return runner.start("compare", "compare quantization levels", plot_path, work)


def compare_rows(comparison: Any) -> list[list[str]]:
    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)
    rows = []
    for r in comparison.levels:
        if not r.available:
            rows.append([r.level, "-", "-", "-", "-", "-", r.reason or "unavailable"])
            continue
        rows.append([r.level, fmt(r.bits_per_weight, ".3f"), fmt(r.flux_dev_gb, ".2f"), fmt(r.weight_rel_rmse, ".3e"),
                     fmt(r.block_rel_error, ".3e"), fmt(r.block_cosine, ".6f"), fmt(r.dequant_melem_s, ".0f")])
    return rows


# --------------------------------------------------------------------------------------------------------- jobs

def jobs_html(runner: jobs.JobRunner, kind: str | None = None) -> str:
    """Progress bars of the jobs (of one kind), newest first."""
    shown = [j for j in runner.jobs() if kind is None or j.kind == kind]
    if not shown:
        return '<div class="fluxq-small">no jobs yet</div>'
    items = []
    for job in shown[:6]:
        fraction = job.fraction
        bar = (f'<progress max="1" value="{fraction:.4f}"></progress> {fraction * 100:.0f}%' if fraction is not None
               else '<progress></progress>')
        text = job.result if not job.active and job.result else job.text
        state = "cancelling" if job.active and job.cancel.is_set() else job.state
        items.append(f'<div class="fluxq-job fluxq-job-{job.state}" data-job="{job.id}" data-state="{job.state}">'
                     f'<b>#{job.id} {html.escape(job.title)}</b> <span class="fluxq-state">{state}</span> '
                     f'{bar} <span class="fluxq-jobtext">{html.escape(text or "")}</span> '
                     f'<span class="fluxq-small">{job.elapsed():.1f} s</span></div>')
    return "".join(items)


def any_active(runner: jobs.JobRunner, kind: str | None = None) -> bool:
    return any(j.active for j in runner.jobs() if kind is None or j.kind == kind)
