"""Quantization speed: our torch kernels vs ggml's C ``ggml_quantize_chunk`` (single thread) vs gguf-py's numpy
``gguf.quants.quantize`` (where it supports the type), on the same input in one run.

    python bench/quantize.py [--types Q4_K,Q8_0] [--mb 8] [--repeat 3]

Prints a Markdown table (and writes it to bench/results/quantize.md): M elements/s per implementation, the ratio
ours/ggml, whether our bytes equal ggml's, and the projected time to quantize the whole Flux-dev transformer to Q4_K.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import gguf.quants  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402

from lib_fluxq.flux import parameter_count  # noqa: E402
from lib_fluxq.quant import quantize  # noqa: E402
from tests import ggml_ref  # noqa: E402

DEFAULT_TYPES = "Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K,IQ4_NL,IQ4_XS"
ROW = 3072  # Flux hidden size: every block size divides it


def _median_seconds(run: Callable[[], object], repeat: int) -> float:
    run()  # warm-up (allocator, ggml's quantize_init, torch's thread pool)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _gguf_py_supports(qtype: GGMLQuantizationType) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated GGML types")
    parser.add_argument("--mb", type=float, default=8.0, help="input size in MB of float32")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per implementation (median kept)")
    args = parser.parse_args()

    rows = max(1, int(args.mb * 2**20 / 4 / ROW))
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((rows, ROW)) * 0.02).astype(np.float32)
    data[:, rng.integers(0, ROW, size=ROW // 128)] *= 8.0  # outlier columns, as in real Flux weights
    tensor = torch.from_numpy(data)
    n = data.size

    lines = [
        f"Quantization speed, {n / 1e6:.1f} M elements ({rows} x {ROW} float32), median of {args.repeat}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, ggml C single thread, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}). M el/s = million elements per second.",
        "",
        "| type | ours (torch) M el/s | ours, 1 thread | ggml C M el/s | gguf-py M el/s | ours / ggml | "
        "ours 1 thread / ggml | bytes == ggml |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    ours_rate: dict[str, float] = {}
    ggml_rate: dict[str, float] = {}
    for name in [t.strip().upper() for t in args.types.split(",") if t.strip()]:
        qtype = GGMLQuantizationType[name]
        ours_s = _median_seconds(lambda qtype=qtype: quantize(tensor, qtype), args.repeat)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        ours_1t_s = _median_seconds(lambda qtype=qtype: quantize(tensor, qtype), args.repeat)
        torch.set_num_threads(threads)
        ggml_s = _median_seconds(lambda qtype=qtype: ggml_ref.quantize(data, qtype), args.repeat)
        gguf_cell = "n/a"
        if _gguf_py_supports(qtype):
            gguf_s = _median_seconds(lambda qtype=qtype: gguf.quants.quantize(data, qtype), args.repeat)
            gguf_cell = f"{n / gguf_s / 1e6:.1f}"
        identical = np.array_equal(quantize(tensor, qtype).numpy(), ggml_ref.quantize(data, qtype))
        ours_rate[name] = n / ours_s
        ggml_rate[name] = n / ggml_s
        lines.append(f"| {name} | {n / ours_s / 1e6:.1f} | {n / ours_1t_s / 1e6:.1f} | {n / ggml_s / 1e6:.1f} | "
                     f"{gguf_cell} | {ggml_s / ours_s:.2f} | {ggml_s / ours_1t_s:.2f} | "
                     f"{'yes' if identical else 'NO'} |")
        print(lines[-1], flush=True)

    if "Q4_K" in ours_rate:
        total = parameter_count()
        lines += ["", f"Projected time to quantize all {total / 1e9:.1f} B Flux-dev transformer parameters to Q4_K "
                      f"on this machine: ours ({torch.get_num_threads()} threads) "
                      f"{total / ours_rate['Q4_K'] / 60:.1f} min, "
                      f"ggml C single thread {total / ggml_rate['Q4_K'] / 60:.1f} min."]
    table = "\n".join(lines)
    print()
    print(table)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quantize.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
