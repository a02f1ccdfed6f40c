"""One GPU run, a few minutes: exactness, dequantization bandwidth and a full-width Flux block step per type.

Run on a machine with an NVIDIA GPU from the repo root:
``python bench/gpu.py [--types Q8_0,Q4_K] [--repeat 10] [--out bench/results/gpu.md]``.

1. Exactness on this GPU: for every type, fluxq's torch kernels and its Triton kernels (compiled here, no FMA
   contraction) against ggml's C ``to_float`` bit for bit (float32, NaN payloads aside), and half outputs against
   that value rounded once.
2. Dequantization bandwidth: packed bytes in + fp16 / bf16 out per second for a 3072 x 12288 weight, torch path and
   Triton path, against a device-to-device copy of the same number of bytes (the card's practical bandwidth).
3. A full-width FLUX.1 double block + single block at 1024 x 1024 (4096 image + 512 text tokens, bf16): step time per
   weight type (GGUF types through fluxq's QuantLinear with the path ``dequantize`` picks; NF4 through
   bitsandbytes' ``Linear4bit`` when installed, else fluxq's NF4 dequantizer) against the same blocks with plain
   bf16 weights (goal: <= 1.15x bf16), and peak VRAM against the weights' own bytes.
Prints markdown tables and writes them to ``--out``. Nothing here is a test: figures only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from torch import nn

from lib_fluxq.flux import FLUX_DEV
from lib_fluxq.flux_model import DoubleStreamBlock, SingleStreamBlock, deterministic_inputs
from lib_fluxq.ops import QuantLinear, release_weight_buffers
from lib_fluxq.quant import FORMATS, dequantize, get_format, quantize, triton_dequant

GGUF_TYPES = [q.name for q in FORMATS if q.name not in ("F32", "F16", "BF16")]
DEVICE = torch.device("cuda")
SIZES = {"weight": (3072, 12288), "image": 1024, "text": 512, "rows": 64,   # --smoke shrinks them (CPU check)
         "hidden": FLUX_DEV.hidden, "heads": FLUX_DEV.heads}


def cuda_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    if DEVICE.type != "cuda":   # --smoke on CPU: wall time
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


# --- 1. exactness -------------------------------------------------------------------------------------------------

def exactness(types: list[str]) -> list[str]:
    from tests import ggml_ref

    rows = ["| type | torch fp32 == ggml | Triton fp32 == ggml | Triton fp16/bf16 == fp32 rounded once |",
            "|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for name in types:
        fmt = get_format(name)
        rows_ = SIZES["rows"]
        x = (rng.standard_normal((rows_, 3072)) * 10.0 ** rng.uniform(-6, 6, (rows_, 1))).astype(np.float32)
        x[:4] *= 1e30   # fp16 scale overflow: inf / NaN handling too
        packed = ggml_ref.quantize(x, fmt.qtype)
        reference = torch.from_numpy(ggml_ref.dequantize(packed.reshape(-1), fmt.qtype, x.size)).view(x.shape)
        blocks = torch.from_numpy(packed.copy()).to(DEVICE).reshape(-1, fmt.type_size)

        def same(values: torch.Tensor) -> bool:
            values = values.float().cpu().view(x.shape)
            nan = reference.isnan()
            return bool(torch.equal(values.isnan(), nan) and torch.equal(values[~nan].view(torch.int32),
                                                                          reference[~nan].view(torch.int32)))

        torch_out = torch.empty(blocks.shape[0], fmt.block_size, device=DEVICE)
        fmt.dequantize_blocks(blocks, torch_out)
        cells = [str(same(torch_out))]
        if triton_dequant.available() and name in triton_dequant.SUPPORTED and (
                DEVICE.type == "cuda" or triton_dequant._interpreting()):
            out = torch.empty_like(torch_out)
            triton_dequant.dequantize_blocks(name, blocks, out)
            halves = []
            for dtype in (torch.float16, torch.bfloat16):
                half = torch.empty(out.shape, dtype=dtype, device=DEVICE)
                triton_dequant.dequantize_blocks(name, blocks, half)
                rounded = reference.to(dtype)
                nan = rounded.isnan()
                got = half.cpu().view(x.shape)
                halves.append(torch.equal(got.isnan(), nan)
                              and torch.equal(got[~nan].view(torch.int16), rounded[~nan].view(torch.int16)))
            cells += [str(same(out)), str(all(halves))]
        else:
            cells += ["no kernel", "no kernel"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


# --- 2. bandwidth -------------------------------------------------------------------------------------------------

def bandwidth(types: list[str], repeat: int) -> list[str]:
    shape = SIZES["weight"]
    n = shape[0] * shape[1]
    copy_src = torch.empty(n * 3, dtype=torch.uint8, device=DEVICE)
    copy_dst = torch.empty_like(copy_src)
    copy_gbps = 2 * copy_src.numel() / cuda_seconds(lambda: copy_dst.copy_(copy_src), repeat) / 1e9
    rows = [f"Device-to-device copy: {copy_gbps:,.0f} GB/s (read + write), the practical memory bandwidth.", "",
            "| type | torch fp16 GB/s | Triton fp16 GB/s | Triton bf16 GB/s | best / copy | chosen by dequantize |",
            "|---|---:|---:|---:|---:|---|"]
    values = torch.randn(shape, device=DEVICE) * 0.02
    for name in types:
        fmt = get_format(name)
        packed = quantize(values, name).reshape(-1)
        blocks = packed.view(-1, fmt.type_size)
        moved = packed.numel() + n * 2
        out16 = torch.empty(shape, dtype=torch.float16, device=DEVICE)
        outb = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
        torch_gbps = moved / cuda_seconds(lambda: fmt.dequantize_blocks(blocks, out16.view(-1, fmt.block_size)),
                                          repeat) / 1e9
        triton16 = tritonb = float("nan")
        if triton_dequant.available() and name in triton_dequant.SUPPORTED and DEVICE.type == "cuda":
            triton16 = moved / cuda_seconds(lambda: triton_dequant.dequantize_blocks(
                name, blocks, out16.view(-1, fmt.block_size)), repeat) / 1e9
            tritonb = moved / cuda_seconds(lambda: triton_dequant.dequantize_blocks(
                name, blocks, outb.view(-1, fmt.block_size)), repeat) / 1e9
        dequantize(packed, name, shape, torch.float16, out=out16)   # makes the choice for this GPU
        chosen = "Triton" if triton_dequant._choice.get((blocks.device, name, torch.float16)) else "torch"

        best = np.nanmax([torch_gbps, triton16])
        rows.append(f"| {name} | {torch_gbps:,.0f} | {triton16:,.0f} | {tritonb:,.0f} | {best / copy_gbps:.2f} | "
                    f"{chosen} |")
    return rows


# --- 3. Flux blocks -----------------------------------------------------------------------------------------------

def _swap(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))


class _NF4Linear(nn.Module):
    """NF4 weight dequantized per call by fluxq (used when bitsandbytes' CUDA kernels are not installed)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from lib_fluxq.formats.nf4 import quantize_nf4
        self.weight = quantize_nf4(linear.weight.detach().float())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lib_fluxq.formats.nf4 import dequantize_nf4
        w = self.weight
        weight = dequantize_nf4(w.packed, w.absmax, w.shape, w.blocksize, dtype=x.dtype)
        return nn.functional.linear(x, weight, self.bias)


def _nf4_maker() -> tuple[Callable[[nn.Linear], nn.Module], str]:
    try:
        import bitsandbytes as bnb

        def make(linear: nn.Linear) -> nn.Module:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach().cpu(), requires_grad=False)
            return layer.to(DEVICE)
        return make, "bitsandbytes Linear4bit"
    except Exception:
        return _NF4Linear, "fluxq NF4 dequantize"


def flux_blocks(types: list[str], repeat: int) -> list[str]:
    torch.manual_seed(0)
    double = DoubleStreamBlock(SIZES["hidden"], SIZES["heads"])
    single = SingleStreamBlock(SIZES["hidden"], SIZES["heads"])
    for module in (double, single):
        for linear in module.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=linear.in_features ** -0.5)
    inputs = deterministic_inputs(SIZES["hidden"], SIZES["image"], SIZES["image"], SIZES["text"])
    img, txt, vec, pe = (t.to(DEVICE) for t in (inputs.img.bfloat16(), inputs.txt.bfloat16(),
                                                 inputs.vec.bfloat16(), inputs.pe))
    reference = [m.to(DEVICE).bfloat16() for m in (double, single)]

    def step(blocks: list[nn.Module]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                out_img, out_txt = blocks[0](img, txt, vec, pe)
                return blocks[1](torch.cat((out_txt, out_img), dim=1), vec, pe)
        return run

    def weight_bytes(blocks: list[nn.Module]) -> int:
        return sum(t.numel() * t.element_size() for b in blocks for t in list(b.parameters()) + list(b.buffers()))

    def measure(blocks: list[nn.Module]) -> tuple[float, int]:
        if DEVICE.type != "cuda":
            return cuda_seconds(step(blocks), repeat), 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        seconds = cuda_seconds(step(blocks), repeat)
        return seconds, torch.cuda.max_memory_allocated()

    base_seconds, base_peak = measure(reference)
    rows = ["| weights | step ms (double + single) | vs bf16 | peak VRAM GiB | weights GiB | peak - weights GiB |",
            "|---|---:|---:|---:|---:|---:|",
            f"| bf16 | {base_seconds * 1e3:.2f} | 1.00x | {base_peak / 2**30:.2f} | "
            f"{weight_bytes(reference) / 2**30:.2f} | {(base_peak - weight_bytes(reference)) / 2**30:.2f} |"]
    cache: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def gguf_maker(name: str) -> Callable[[nn.Linear], nn.Module]:
        def make(linear: nn.Linear) -> nn.Module:
            key = (name, tuple(linear.weight.shape))
            if key not in cache:
                cache[key] = quantize(linear.weight.detach().float(), name).reshape(-1)
            bias = linear.bias.detach() if linear.bias is not None else None
            return QuantLinear(linear.in_features, linear.out_features, name, cache[key], bias)
        return make

    nf4_make, nf4_label = _nf4_maker()
    for name in [*types, "NF4"]:
        quantized = [copy.deepcopy(module) for module in reference]
        for module in quantized:
            _swap(module, nf4_make if name == "NF4" else gguf_maker(name))
        release_weight_buffers()
        seconds, peak = measure(quantized)
        weights = weight_bytes(quantized)
        label = f"NF4 ({nf4_label})" if name == "NF4" else name
        rows.append(f"| {label} | {seconds * 1e3:.2f} | {seconds / base_seconds:.2f}x | {peak / 2**30:.2f} | "
                    f"{weights / 2**30:.2f} | {(peak - weights) / 2**30:.2f} |")
        print(rows[-1], flush=True)
        del quantized
        cache.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default=",".join(GGUF_TYPES))
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.md"))
    parser.add_argument("--smoke", action="store_true",
                        help="check the script itself on CPU with small sizes (figures meaningless; "
                             "TRITON_INTERPRET=1 to include the Triton kernels)")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = torch.device("cpu")
        SIZES.update(weight=(256, 1024), image=128, text=16, rows=8, hidden=256, heads=2)
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); --smoke checks it on CPU")
        return 1
    types = args.types.split(",")
    started = time.time()
    name = torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "CPU smoke run"
    sections = [f"# GPU: {name}, torch {torch.__version__}, Triton "
                f"{'available' if triton_dequant.available() else 'not installed'}", ""]
    for title, rows in (("Exactness", lambda: exactness(types)),
                        ("Dequantization bandwidth (3072 x 12288)", lambda: bandwidth(types, args.repeat)),
                        ("FLUX.1 double + single block, 1024 x 1024 (4096 + 512 tokens), bf16",
                         lambda: flux_blocks(types, args.repeat))):
        print(f"## {title}", flush=True)
        table = rows()
        sections += [f"## {title}", "", *table, ""]
        print("\n".join(table), flush=True)
    sections.append(f"Total time: {time.time() - started:.0f} s")
    report = "\n".join(sections)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
