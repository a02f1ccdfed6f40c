"""``python -m lib_fluxq advise``: the advisor's own arguments and their checks."""

from __future__ import annotations

import argparse
import os
import re

from lib_fluxq.advisor.calibration import HOSTS
from lib_fluxq.advisor.gpus import GPU_PROFILES, find_gpu_profile
from lib_fluxq.advisor.model import planned_families
from lib_fluxq.advisor.plan import advise, scan_models
from lib_fluxq.advisor.render import render_json, render_text
from lib_fluxq.errors import FluxqError
from lib_fluxq.hardware import detect, with_overrides


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT (e.g. 1024x1024)")
    return int(match.group(1)), int(match.group(2))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of GB") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vram", type=_number, metavar="GB", help="plan for a card with this much VRAM (GiB)")
    parser.add_argument("--ram", type=_number, metavar="GB", help="plan for this much system RAM (GiB)")
    parser.add_argument("--gpu", metavar="NAME", help="plan for this card, e.g. 'RTX 3060' (speed table lookup)")
    parser.add_argument("--models", metavar="DIR", help="also rank the model files in this folder")
    parser.add_argument("--size", type=_size, default=(1024, 1024), metavar="WxH",
                        help="target image size (default 1024x1024)")
    parser.add_argument("--model", default="dev", metavar="FAMILY",
                        help="model family: " + ", ".join(f.key for f in planned_families())
                             + " (dev / schnell / klein-4b / klein-9b are short names; default dev)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps for time per image")
    parser.add_argument("--host", choices=HOSTS, default="forge",
                        help="WebUI to plan for: its RAM figures, the families and formats it runs "
                             "(SVDQuant: neo only; default forge)")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")


def run(args: argparse.Namespace) -> int:
    models_dir = getattr(args, "models", None)
    if models_dir is not None and not os.path.isdir(models_dir):
        raise FluxqError(f"{models_dir}: no such folder (give the folder holding your .gguf/.safetensors files)")
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise FluxqError(f"--steps {args.steps} is not plausible (use 1..1000)")
    if args.gpu is not None and args.gpu.strip() and args.vram is None and find_gpu_profile(args.gpu) is None:
        known = ", ".join(p.name for p in GPU_PROFILES if p.name != "Apple M-series (generic)")
        raise FluxqError(f"--gpu '{args.gpu.strip()}' is not a card the advisor knows, so its VRAM is unknown: add "
                         f"--vram GB (e.g. --vram 12), or name one of: {known}")
    hardware = with_overrides(detect(models_dir), vram_gb=args.vram, ram_gb=args.ram, gpu_name=args.gpu)
    files = scan_models(models_dir) if models_dir is not None else None
    width, height = args.size
    advice = advise(hardware, width, height, model=args.model, files=files, steps=args.steps, host=args.host)
    print(render_json(advice) if args.json else render_text(advice))
    return 0
