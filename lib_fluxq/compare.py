"""``python -m lib_fluxq compare``: what each quantization level costs in accuracy, measured on real Flux blocks.

A few double- and single-stream blocks are taken from a full-precision Flux transformer (or, with no file given, a
synthetic slice at Flux's real width), every 2-D block weight is quantized with each level and dequantized again, and
the same deterministic inputs go through the reference block and the quantized one. Per level the table shows bits
per weight, the projected size of the whole Flux-dev transformer, the weight error, the error of what the block adds
to the residual stream, and dequantization speed here.

Only the sampled blocks' tensors are read (safetensors ``safe_open`` / memory-mapped GGUF), never the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib_fluxq.errors import FluxqError

GB = 1e9  # published Flux file sizes are decimal gigabytes
PIXELS_PER_TOKEN = 16  # Flux: 8x VAE downscale, then 2x2 patches

# Defaults: a real file gets Forge's usual portrait size and T5's full 512 tokens; the embedded synthetic slice
# gets fewer tokens so the demo finishes in about a minute on two idle CPU cores.
FILE_DEFAULTS = {"blocks": 3, "res": "512x768", "text_tokens": 512}
SYNTHETIC_DEFAULTS = {"blocks": 1, "res": "256x256", "text_tokens": 64}
# VRAM is quoted for Flux's native image size, whatever --res the error measurement uses.
VRAM_RESOLUTION = (1024, 1024)


def __getattr__(name: str) -> Any:
    """The measuring half (levels, sources, run_comparison, ...) lives in compare_engine and is imported with torch
    on first use, so ``compare --help`` and argument or file errors never wait for torch."""
    if name.startswith("__"):
        raise AttributeError(name)
    from lib_fluxq import compare_engine

    try:
        return getattr(compare_engine, name)
    except AttributeError:
        raise AttributeError(f"module 'lib_fluxq.compare' has no attribute '{name}'") from None


# ============================================================================================ results


@dataclass
class BlockResult:
    block: str
    update_rel_error: float    # ||Δq - Δref|| / ||Δref||, Δ = what the block adds to the residual stream
    update_cosine: float
    output_rel_error: float    # ||yq - yref|| / ||yref||, residual included


@dataclass
class LevelResult:
    level: str
    description: str
    available: bool
    family: str = "gguf"                  # "gguf" | "nf4" | "fp8"
    reason: str | None = None
    bits_per_weight: float | None = None
    flux_dev_gb: float | None = None
    vram_gb: float | None = None
    vram_by_family: dict[str, float | None] = field(default_factory=dict)   # family key -> GiB, same model
    weight_rel_rmse: float | None = None
    block_rel_error: float | None = None
    block_cosine: float | None = None
    output_rel_error: float | None = None
    dequant_melem_s: float | None = None
    quant_seconds: float | None = None
    per_block: list[BlockResult] = field(default_factory=list)
    # running sums over every weight of every sampled block
    _err_sq: float = 0.0
    _ref_sq: float = 0.0
    _bytes: int = 0
    _elements: int = 0
    _dequant_s: float = 0.0
    _dequant_elements: int = 0


@dataclass
class Comparison:
    source: str
    synthetic: bool
    resolution: str
    image_tokens: int
    text_tokens: int
    double_blocks: list[int]
    single_blocks: list[int]
    levels: list[LevelResult]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        def level_json(r: LevelResult) -> dict[str, Any]:
            data = {k: v for k, v in asdict(r).items() if not k.startswith("_")}
            return data
        return {"source": self.source, "synthetic": self.synthetic, "resolution": self.resolution,
                "image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                "double_blocks": self.double_blocks, "single_blocks": self.single_blocks,
                "seconds": round(self.seconds, 2), "levels": [level_json(r) for r in self.levels]}


def parse_resolution(text: str) -> tuple[int, int]:
    """``"512x768"`` (width x height, as the WebUI writes it) -> (width, height) on Flux's 16-pixel grid."""
    try:
        width, height = (int(part) for part in text.lower().replace("*", "x").split("x"))
        if width <= 0 or height <= 0 or width % PIXELS_PER_TOKEN or height % PIXELS_PER_TOKEN:
            raise ValueError
    except ValueError:
        raise FluxqError(f"--res '{text}': give WIDTHxHEIGHT in pixels, each a positive multiple of 16 "
                         f"(e.g. 512x768)") from None
    return width, height


# ============================================================================================ output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(comparison: Comparison) -> str:
    lines = []
    if comparison.synthetic:
        lines += ["NOTE: the weights are SYNTHETIC (no model file given). The ladder and the sizes are real; the "
                  "error values",
                  "      are those of Gaussian weights with outlier columns, not of trained Flux weights. For real",
                  "      figures run:  python -m lib_fluxq compare /path/to/flux1-dev.safetensors  (or a F16/BF16 "
                  "GGUF)", ""]
    lines.append(f"source: {comparison.source}")
    lines.append(f"blocks: double {comparison.double_blocks}, single {comparison.single_blocks}; inputs: "
                 f"{comparison.resolution} ({comparison.image_tokens} image tokens) + {comparison.text_tokens} text "
                 f"tokens, fixed seed")
    lines.append("")
    header = (f"{'level':<11} {'bits/w':>6} {'Flux-dev GB':>11} {'VRAM GiB':>8} {'weight rRMSE':>12} "
              f"{'block rel.err':>13} {'block cos':>9} {'dequant M/s':>11}")
    lines += [header, "-" * len(header)]
    for r in comparison.levels:
        if not r.available:
            lines.append(f"{r.level:<11} {r.reason}")
            continue
        lines.append(f"{r.level:<11} {_fmt(r.bits_per_weight, '6.3f')} {_fmt(r.flux_dev_gb, '11.2f')} "
                     f"{_fmt(r.vram_gb, '8.1f')} {_fmt(r.weight_rel_rmse, '12.3e')} "
                     f"{_fmt(r.block_rel_error, '13.3e')} {_fmt(r.block_cosine, '9.6f')} "
                     f"{_fmt(r.dequant_melem_s, '11.0f')}")
    lines += ["",
              "bits/w: measured packed bytes incl. scales. Flux-dev GB: whole 11.9 B-parameter transformer, block "
              "weights at this level,",
              "  the rest F16/F32 (city96 recipe). VRAM GiB: the advisor's need to sample 1024x1024 with the "
              "transformer fully resident",
              "  (weights + activations + dequant scratch + CUDA context). weight rRMSE: ||W_q - W|| / ||W|| over all",
              "  sampled block weights.",
              "  block rel.err / cos: error of what each block adds to the residual stream (output - input) vs the "
              "full-precision",
              "  block, mean over the sampled blocks. dequant M/s: million weights/s to float32 on one CPU thread "
              "(best of several runs",
              "  of that thread's CPU time): INDICATIVE ONLY, it moves by up to ~1.7x between runs on a busy machine "
              "and says",
              "  little about a GPU; the other columns are repeatable.",
              f"  {comparison.seconds:.0f} s in all."]
    lines += _family_vram_table(comparison)
    return "\n".join(lines)


def _family_vram_table(comparison: Comparison) -> list[str]:
    """VRAM GiB per family of the family table (rows) at each level (columns): the VRAM column's advisor figure for
    that family's transformer. One row per family, so level rows above stay the only lines that start with a level."""
    levels = [r for r in comparison.levels if r.available and r.vram_by_family]
    if not levels:
        return []
    widths = [max(len(r.level), 5) for r in levels]
    header = f"{'family':<15}" + "".join(f" {r.level:>{w}}" for r, w in zip(levels, widths, strict=True))
    lines = ["", f"VRAM GiB per family at {VRAM_RESOLUTION[0]}x{VRAM_RESOLUTION[1]}: the advisor's need with that "
                 "family's transformer fully resident,", "  block weights at the measured bits/w (families from "
                 "lib_fluxq/families.py):", header, "-" * len(header)]
    for key in levels[0].vram_by_family:
        lines.append(f"{key:<15}" + "".join(f" {_fmt(r.vram_by_family.get(key), f'{w}.1f')}"
                                            for r, w in zip(levels, widths, strict=True)))
    return lines


_FAMILY_STYLE = {"gguf": ("tab:blue", "o", "GGUF"), "nf4": ("tab:red", "s", "bitsandbytes NF4"),
                 "fp8": ("tab:green", "^", "FP8 e4m3fn")}
_PLOT_DPI = 110
_LABEL_POINTS = 9
_MARKER_AREA = 40  # points^2


def _marker_px() -> float:
    """Marker diameter in pixels (scatter sizes are areas in points^2)."""
    return _MARKER_AREA ** 0.5 * _PLOT_DPI / 72


def _dodge(ax: Any, collections: list[tuple[Any, list[int]]], points: list[tuple[str, float, float]]) -> \
        list[tuple[float, float]]:
    """Pixel positions of ``points`` with markers that would cover each other (levels of the same size and nearly
    the same error: Q4_0 and NF4) moved side by side, one marker width apart; the collections are moved to match."""
    pixels = [tuple(ax.transData.transform((x, y))) for _, x, y in points]
    gap = _marker_px() + 2
    placed: list[tuple[float, float]] = []
    for px, py in pixels:
        # step right (then left) until no earlier marker is within one marker width
        for step in range(0, 40):
            candidate = (px + (step + 1) // 2 * gap * (1 if step % 2 else -1), py) if step else (px, py)
            if all((candidate[0] - qx) ** 2 + (candidate[1] - qy) ** 2 >= gap ** 2 for qx, qy in placed):
                break
        placed.append(candidate)
    to_data = ax.transData.inverted().transform
    for collection, indices in collections:
        collection.set_offsets([to_data(placed[i]) for i in indices])
    return placed


def _place_labels(ax: Any, labels: list[str], dots: list[tuple[float, float]]) -> None:
    """Label each marker beside it (real text extents, measured with the renderer): a label never covers another
    label or any marker and stays inside the axes; crowded labels step up or down with a leader line."""
    renderer = ax.figure.canvas.get_renderer()
    px_per_pt = _PLOT_DPI / 72
    radius = _marker_px() / 2 + 1
    inside = ax.get_window_extent(renderer)
    marker_boxes = [(x - radius, x + radius, y - radius, y + radius) for x, y in dots]
    taken: list[tuple[float, float, float, float]] = []

    def free(box: tuple[float, float, float, float]) -> bool:
        x0, x1, y0, y1 = box
        if x0 < inside.x0 or x1 > inside.x1 or y0 < inside.y0 or y1 > inside.y1:
            return False
        return not any(x0 < b[1] and b[0] < x1 and y0 < b[3] and b[2] < y1 for b in taken + marker_boxes)

    for i in sorted(range(len(labels)), key=lambda k: -dots[k][1]):
        px, py = dots[i]
        probe = ax.text(0, 0, labels[i], fontsize=_LABEL_POINTS, transform=None)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width, extent.height + 2
        chosen = None
        for step in range(0, 30):
            for dy in ((0.0,) if step == 0 else (-step * height, step * height)):
                for dx in (radius + 3, -radius - 3 - width):
                    box = (px + dx, px + dx + width, py + dy - height / 2, py + dy + height / 2)
                    if free(box):
                        chosen = (dx, dy, box)
                        break
                if chosen:
                    break
            if chosen:
                break
        if chosen is None:  # nowhere free inside the axes: right of the marker
            chosen = (radius + 3, 0.0, (px + radius + 3, px + radius + 3 + width, py - height / 2, py + height / 2))
        dx, dy, box = chosen
        taken.append(box)
        leader = {"arrowstyle": "-", "color": "0.35", "lw": 0.7, "shrinkA": 0, "shrinkB": radius} if dy else None
        ax.annotate(labels[i], ax.transData.inverted().transform((px, py)), xytext=(dx / px_per_pt, dy / px_per_pt),
                    textcoords="offset points", fontsize=_LABEL_POINTS, va="center", ha="left", arrowprops=leader)


def build_figure(comparison: Comparison) -> Any:
    """The error-vs-size figure: block error and weight error against projected Flux-dev size, one labelled marker
    per level (marker shape and colour by family); no marker or label hides another."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 16-bit levels sit orders of magnitude below the rest: drawing them would squash the quantized ones together.
    rows = [r for r in comparison.levels if r.available and r.block_rel_error and (r.bits_per_weight or 16) < 15]
    lossless = [r.level for r in comparison.levels if r.available and (r.bits_per_weight or 0) >= 15]
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), dpi=_PLOT_DPI, constrained_layout=True)
    panels = ((axes[0], "block_rel_error", "block output error (relative, of the block's update)"),
              (axes[1], "weight_rel_rmse", "weight error (relative RMSE)"))
    drawn: dict[Any, list[tuple[Any, list[int]]]] = {}
    for ax, key, ylabel in panels:
        drawn[ax] = []
        for family, (colour, marker, _) in _FAMILY_STYLE.items():
            indices = [i for i, r in enumerate(rows) if (r.family if r.family in _FAMILY_STYLE else "gguf") == family]
            if indices:
                xs, ys = [rows[i].flux_dev_gb for i in indices], [getattr(rows[i], key) for i in indices]
                collection = ax.scatter(xs, ys, color=colour, marker=marker, s=_MARKER_AREA, zorder=3,
                                        edgecolors="white", linewidths=0.6)
                drawn[ax].append((collection, indices))
        ax.set_yscale("log")
        ax.set_xlabel("projected Flux-dev transformer size (GB)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.15, y=0.15)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color=c, label=name) for c, m, name in _FAMILY_STYLE.values()]
    axes[0].legend(handles=handles, loc="upper right")
    notes = []
    if lossless:
        notes.append(f"not drawn: {', '.join(lossless)} (error ~0, 23.8 GB)")
    title = (f"Flux quantization levels: error vs size — blocks double {comparison.double_blocks}, single "
             f"{comparison.single_blocks}, {comparison.resolution}")
    if comparison.synthetic:
        title += "\nSYNTHETIC weights (no model file given): run compare on your own FLUX file for trained weights"
    fig.suptitle(title, fontsize=11)
    fig.canvas.draw()
    fig.set_layout_engine("none")  # freeze the layout so the positions computed in pixels stay valid
    moved = False
    for ax, key, _ in panels:
        points = [(r.level, r.flux_dev_gb, getattr(r, key)) for r in rows]
        dots = _dodge(ax, drawn[ax], points)
        moved |= any(abs(d[0] - ax.transData.transform((x, y))[0]) > 0.5 for d, (_, x, y) in zip(dots, points,
                                                                                              strict=True))
        _place_labels(ax, [p[0] for p in points], dots)
    if moved:
        notes.append("levels of equal size are drawn side by side")
    if notes:
        axes[1].text(0.99, 0.01, "; ".join(notes), transform=axes[1].transAxes, ha="right", va="bottom", fontsize=8,
                     color="0.35")
    return fig


def write_plot(comparison: Comparison, path: str) -> None:
    """Write ``build_figure(comparison)`` as a PNG to ``path`` (atomically: never a half-written file)."""
    import matplotlib.pyplot as plt

    fig = build_figure(comparison)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = str(target.parent / f".{target.stem}.{os.getpid()}-{secrets.token_hex(4)}.png")
    try:
        # O_EXCL: never reuse someone else's file; mode 0o666 so the umask applies as for any new file (mkstemp's
        # 0o600 would leave the user's plot readable by its owner only)
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fig.savefig(temp, dpi=_PLOT_DPI)
        os.replace(temp, target)
    finally:
        plt.close(fig)
        if os.path.exists(temp):
            os.remove(temp)


# ============================================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="?", default=None,
                        help="full-precision Flux transformer (.safetensors with BFL names, optionally prefixed "
                             "model.diffusion_model., or a F16/BF16 .gguf); omitted: a synthetic slice at real width")
    parser.add_argument("--levels", default=None,
                        help="comma-separated levels (default: all): GGUF types such as Q8_0,Q6_K,Q4_K,Q4_0, "
                             "plus NF4, FP8, FP8_SCALED")
    parser.add_argument("--blocks", type=int, default=None,
                        help=f"double and single blocks to sample each, spread over depth (default "
                             f"{FILE_DEFAULTS['blocks']} for a file, {SYNTHETIC_DEFAULTS['blocks']} synthetic)")
    parser.add_argument("--res", default=None,
                        help=f"WIDTHxHEIGHT whose image tokens feed the blocks (default {FILE_DEFAULTS['res']} for a "
                             f"file, {SYNTHETIC_DEFAULTS['res']} synthetic)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help=f"T5 tokens (default {FILE_DEFAULTS['text_tokens']} for a file, "
                             f"{SYNTHETIC_DEFAULTS['text_tokens']} synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (and synthetic weights)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plot", metavar="FILE", default=None, help="write a PNG of error vs size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    defaults = FILE_DEFAULTS if args.src else SYNTHETIC_DEFAULTS
    width, height = parse_resolution(args.res or defaults["res"])
    if args.src is not None:
        from lib_fluxq.formats import detect

        detect.require_model(args.src)  # a missing or foreign file is named before torch is imported
    from lib_fluxq.compare_engine import open_source, run_comparison, select_levels

    levels = select_levels(args.levels)
    source = open_source(args.src, seed=args.seed)
    try:
        comparison = run_comparison(
            source, levels, blocks=args.blocks if args.blocks is not None else defaults["blocks"], width=width,
            height=height, text_tokens=args.text_tokens if args.text_tokens is not None else defaults["text_tokens"],
            seed=args.seed, progress=not args.no_progress)
    finally:
        source.close()
    if args.plot:
        write_plot(comparison, args.plot)
    if args.json:
        print(json.dumps(comparison.to_json(), indent=2))
    else:
        print(format_table(comparison))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
