"""The advice as text (the CLI) or JSON; the tab renders its own HTML from the same ``Advice``."""

from __future__ import annotations

from lib_fluxq.advisor.model import LEVELS
from lib_fluxq.advisor.plan import Advice


def render_text(advice: Advice) -> str:
    lines: list[str] = []
    hw = advice.hardware
    gpu = advice.gpu or "no GPU"
    vram = f"{advice.vram_gb:g} GB" if advice.vram_gb else "-"
    lines.append(f"Machine: {advice.backend.upper()} · {gpu} · VRAM {vram} · "
                 f"RAM {advice.ram_gb or 0:g} GB" + (f" · {advice.disk_free_gb:g} GB free on disk"
                                                     if advice.disk_free_gb is not None else ""))
    if advice.profile_assumed and advice.gpu_profile:
        lines.append(f"  (speeds assume a {advice.gpu_profile}-class card)")
    for note in hw.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append("")
    if advice.recommended.value is None:
        lines.append(advice.recommended.reason)
    else:
        lines.append(f"Plan for {advice.model_title or advice.model}: {advice.summary}")
        lines.append("")
        rows = [("Quant level", advice.recommended), ("Faster alternative", advice.faster),
                ("Resolution", advice.resolution), ("GPU Weights (MB)", advice.gpu_weights_mb),
                ("Swap method", advice.swap_method), ("Swap location", advice.swap_location),
                ("Text encoders", advice.text_encoder), ("VAE decode", advice.vae), ("Refine", advice.refine)]
        for label, choice in rows:
            if choice is None:
                lines.append(f"  {label:<19} none faster at similar fidelity")
                continue
            value = choice.value
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "x".join(str(v) for v in value)
            lines.append(f"  {label:<19} {value}")
            lines.append(f"  {'':<19} └ {choice.reason}")
    if advice.levels and not advice.cpu_only:
        lines.append("")
        lines.append(f"All levels at {advice.width}x{advice.height} (budget {advice.budget_gb} GB):")
        lines.append(f"  {'level':<10}{'weights':>9}{'needs':>8}  {'fit':<14}{'s/it':>7}")
        for e in advice.levels:
            if not LEVELS[e.level].candidate:
                continue
            step = "-" if e.step_s is None else f"{e.step_s:g}"
            lines.append(f"  {e.level:<10}{e.weights_gb:>8.2f}G{e.need_gb:>7.2f}G  {e.fit:<14}{step:>7}")
    if advice.alternative is not None:
        lines.append("")
        lines.append(f"Better on this card: {advice.alternative.value} — {advice.alternative.reason}")
    if advice.families:
        lines.append("")
        lines.append("Each family's best plan here (time per image at its default steps):")
        lines.append(f"  {'family':<22}{'level':<10}{'fit':<15}{'s/it':>7}{'steps':>6}{'s/image':>9}")
        for row in advice.families:
            step = "-" if row["step_s"] is None else f"{row['step_s']:g}"
            image = "-" if row["image_s"] is None else f"{row['image_s']:g}"
            fit = row["fit"] if row["runs_here"] else "host can't run"
            lines.append(f"  {row['family']:<22}{row['level'] or '-':<10}{fit:<15}{step:>7}{row['steps']:>6}"
                         f"{image:>9}")
    if advice.files:
        lines.append("")
        lines.append("Your files:")
        for f in advice.files:
            step = f" ~{f.step_s:g} s/it" if f.step_s is not None else ""
            lines.append(f"  {f.verdict:<10} {f.name} ({f.level or '?'}, {f.size_gb:g} GB){step} — {f.reason}")
    for warning in advice.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)



def render_json(advice: Advice) -> str:
    return advice.to_json()
