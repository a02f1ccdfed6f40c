"""Flux-sized Linear forward on quantized weights: fluxq's QuantLinear vs a plain bf16 Linear vs ComfyUI-GGUF-style and
Forge-style torch dequantization (bench/peers.py), at 64 and 1024 tokens, on both Flux Linear shapes.

Run from the repo root: ``.venv-test/bin/python bench/forward.py [--types Q8_0,Q4_0,Q4_K] [--repeat 5]``.
CPU, one torch thread, per-thread CPU time (robust on a shared machine), best of ``--repeat``; every row's ratios
are within one run. Also prints how far each method's bf16 weight is from ggml's exact value rounded once to bf16
(fluxq's is that value: 0 differing weights). Writes the tables to bench/results/forward.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F

from bench import peers
from lib_fluxq.ops import QuantLinear, release_weight_buffers
from tests import ggml_ref

SHAPES = ((3072, 3072), (12288, 3072), (3072, 12288))   # (out, in): attention / mlp up / mlp down
TOKENS = (64, 1024)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def weights(out_features: int, in_features: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((out_features, in_features), dtype=np.float32) / np.sqrt(in_features))
    x[:, rng.integers(0, in_features, 16)] *= 20.0   # outlier columns, as in trained transformers
    return x


def run(types: list[str], repeat: int) -> tuple[list[dict], list[dict]]:
    timing, accuracy = [], []
    dtype = torch.bfloat16
    for out_features, in_features in SHAPES:
        values = weights(out_features, in_features)
        plain = torch.from_numpy(values).to(dtype)
        for qtype in types:
            packed = ggml_ref.quantize(values, _qtype(qtype))
            packed_t = torch.from_numpy(packed).reshape(-1)
            layer = QuantLinear(in_features, out_features, qtype, packed_t)
            shape = (out_features, in_features)
            comfy = peers.comfy_style(qtype, packed_t, shape, dtype)
            forge = peers.forge_style(qtype, packed_t, shape, dtype)
            if (out_features, in_features) == SHAPES[0]:
                exact = torch.from_numpy(ggml_ref.dequantize(packed.reshape(-1), _qtype(qtype), values.size))
                exact = exact.view(shape)
                rounded = exact.to(dtype)
                row = {"type": qtype}
                with torch.no_grad():
                    for name, weight in (("fluxq", layer.dequantized_weight(dtype)), ("comfy", comfy(None)),
                                         ("forge", forge(None))):
                        differs = (weight.view(torch.int16) != rounded.view(torch.int16)).float().mean().item()
                        error = ((weight.float() - exact).abs().max() / exact.abs().max()).item()
                        row[name] = (differs, error)
                accuracy.append(row)
            for tokens in TOKENS:
                x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
                with torch.no_grad():
                    row = {"shape": f"{out_features}x{in_features}", "tokens": tokens, "type": qtype,
                           "bf16": best_seconds(lambda: F.linear(x, plain), repeat),
                           "fluxq": best_seconds(lambda: layer(x), repeat),
                           "comfy": best_seconds(lambda: F.linear(x, comfy(x)), repeat),
                           "forge": best_seconds(lambda: F.linear(x, forge(x)), repeat)}
                timing.append(row)
                print(_timing_line(row), flush=True)
            release_weight_buffers()
    return timing, accuracy


def _qtype(name: str) -> int:
    from gguf import GGMLQuantizationType
    return int(GGMLQuantizationType[name])


def _timing_line(row: dict) -> str:
    base = row["bf16"]
    return (f"| {row['shape']} | {row['tokens']} | {row['type']} | {base * 1e3:,.1f} | "
            f"{row['fluxq'] * 1e3:,.1f} ({row['fluxq'] / base:.2f}x) | {row['comfy'] * 1e3:,.1f} "
            f"({row['comfy'] / base:.2f}x) | {row['forge'] * 1e3:,.1f} ({row['forge'] / base:.2f}x) |")


def render(timing: list[dict], accuracy: list[dict], repeat: int) -> str:
    lines = [f"`bench/forward.py`, {date.today()}, {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, 1 thread, per-thread CPU time, best of {repeat}. ms per forward (ratio to the "
             "plain bf16 Linear of the same shape and tokens; lower is better). Weight bf16, input bf16.", "",
             "| weight (out x in) | tokens | type | bf16 Linear | fluxq QuantLinear | ComfyUI-GGUF style | "
             "Forge style (baked) |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [_timing_line(row) for row in timing]
    lines += ["", "Accuracy of the bf16 weight each path hands to the matmul, against ggml's exact float32 value "
              "(3072 x 3072): share of weights that differ from that value rounded once to bf16, and the largest "
              "error relative to the largest weight.", "",
              "| type | fluxq differing / max error | ComfyUI-GGUF style | Forge style |", "|---|---:|---:|---:|"]
    for row in accuracy:
        cells = [f"{row[k][0] * 100:.2f}% / {row[k][1]:.2e}" for k in ("fluxq", "comfy", "forge")]
        lines.append(f"| {row['type']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_K")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "forward.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    timing, accuracy = run(args.types.split(","), args.repeat)
    report = render(timing, accuracy, args.repeat)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
