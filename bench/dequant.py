"""Dequantization throughput: fluxq (torch) vs ggml's C ``to_float`` (single thread) vs gguf-py (numpy).

Run from the repo root: ``.venv-test/bin/python bench/dequant.py [--melems 8] [--types Q8_0,Q4_K] [--clock cpu]``.
Prints a markdown table (M elements/s, best of N) and writes it to bench/results/dequant.md. Ours is timed both
allocating its output (what a forward pass does) and into a reused buffer (what ggml's ``to_float`` does: it writes
into the caller's buffer), so the ratio ours/ggml compares like with like. With CUDA, also GB/s of packed-in +
fp16-out against a device-to-device copy of the same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

from lib_fluxq.quant import FORMATS, dequantize, get_format
from tests import ggml_ref

CLOCK = time.perf_counter  # --clock cpu switches to per-thread CPU time (robust when other processes load the CPU)


def best_seconds(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        sync()
        times.append(CLOCK() - start)
    return min(times)


def weights(n_elements: int, row: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_elements // row, row)).astype(np.float32) * 0.02
    x[:, rng.integers(0, row, 16)] *= 20.0  # outlier columns, as in trained transformers
    return x


def cpu_rows(types: list[T], n_elements: int, repeat: int) -> list[dict]:
    x = weights(n_elements)
    rows = []
    for qtype in types:
        packed = np.ascontiguousarray(x).view(np.uint8) if qtype == T.F32 else ggml_ref.quantize(x, qtype)
        packed_t = torch.from_numpy(packed.copy())
        out32 = torch.empty(x.shape)
        out16 = torch.empty(x.shape, dtype=torch.bfloat16)
        row = {"type": qtype.name, "bpw": get_format(qtype).bits_per_weight}
        row["ours_fp32"] = best_seconds(lambda: dequantize(packed_t, qtype, x.shape), repeat)
        row["ours_fp32_buf"] = best_seconds(lambda: dequantize(packed_t, qtype, x.shape, out=out32), repeat)
        row["ours_bf16_buf"] = best_seconds(
            lambda: dequantize(packed_t, qtype, x.shape, torch.bfloat16, out=out16), repeat)
        if qtype != T.F32:
            to_float = ggml_ref.to_float_fn(qtype)
            out_np = np.empty(x.size, np.float32)
            row["ggml"] = best_seconds(lambda: to_float(packed.ctypes.data, out_np.ctypes.data, x.size), repeat)
        with contextlib.suppress(NotImplementedError):  # gguf-py lacks some types
            row["gguf_py"] = best_seconds(lambda: gguf_quants.dequantize(packed, qtype), max(1, repeat // 3))
        rows.append(row)
    return rows


def gpu_rows(types: list[T], n_elements: int, repeat: int) -> list[dict]:
    device = torch.device("cuda")
    x = weights(n_elements)
    sync = torch.cuda.synchronize
    rows = []
    for qtype in types:
        packed = np.ascontiguousarray(x).view(np.uint8) if qtype == T.F32 else ggml_ref.quantize(x, qtype)
        packed_t = torch.from_numpy(packed.copy()).to(device)
        out16 = torch.empty(x.shape, dtype=torch.float16, device=device)
        ours = best_seconds(lambda: dequantize(packed_t, qtype, x.shape, torch.float16, out=out16), repeat, sync)
        # same bytes moved by a plain copy: packed in + fp16 out
        src = torch.empty(packed.nbytes + out16.numel() * 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy = best_seconds(lambda: dst.copy_(src), repeat, sync)
        moved = packed.nbytes + out16.numel() * 2
        rows.append({"type": qtype.name, "ours_gbps": moved / ours / 1e9, "copy_gbps": 2 * moved / copy / 1e9,
                     "melems": x.size / ours / 1e6})
    return rows


def render_cpu(rows: list[dict], n_elements: int) -> str:
    def m(row: dict, key: str) -> str:
        return f"{n_elements / row[key] / 1e6:,.0f}" if key in row else "n/a"

    lines = [
        f"CPU: {n_elements / 1e6:.1f} M elements per call, best of runs, torch threads {torch.get_num_threads()}, "
        f"ggml to_float single thread, clock: {CLOCK.__name__}. M elements/s (higher is better).",
        "",
        "| type | bpw | ours fp32 (alloc) | ours fp32 (buffer) | ours bf16 (buffer) | ggml C | gguf-py | "
        "ours/ggml (buffer) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"{row['ggml'] / row['ours_fp32_buf']:.2f}x" if "ggml" in row else "n/a"
        lines.append(f"| {row['type']} | {row['bpw']:.2f} | {m(row, 'ours_fp32')} | {m(row, 'ours_fp32_buf')} | "
                     f"{m(row, 'ours_bf16_buf')} | {m(row, 'ggml')} | {m(row, 'gguf_py')} | {ratio} |")
    return "\n".join(lines)


def render_gpu(rows: list[dict]) -> str:
    name = torch.cuda.get_device_name(0)
    lines = [f"GPU ({name}): packed-in + fp16-out bandwidth vs a device-to-device copy of the same bytes.", "",
             "| type | ours GB/s | copy GB/s | ours/copy | ours M elem/s |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['type']} | {row['ours_gbps']:,.0f} | {row['copy_gbps']:,.0f} | "
                     f"{row['ours_gbps'] / row['copy_gbps']:.2f} | {row['melems']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--melems", type=float, default=8.0, help="million elements per call (CPU)")
    parser.add_argument("--gpu-melems", type=float, default=256.0, help="million elements per call (GPU)")
    parser.add_argument("--types", default=",".join(t.name for t in FORMATS))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: wall-clock, torch's default threads; cpu: single-thread CPU time (shared machines)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dequant.md"))
    args = parser.parse_args()
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)
    types = [get_format(name).qtype for name in args.types.split(",")]
    n_elements = int(args.melems * 1e6) // 4096 * 4096
    report = render_cpu(cpu_rows(types, n_elements, args.repeat), n_elements)
    if torch.cuda.is_available():
        gpu_elements = int(args.gpu_melems * 1e6) // 4096 * 4096
        report += "\n\n" + render_gpu(gpu_rows(types, gpu_elements, args.repeat))
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
