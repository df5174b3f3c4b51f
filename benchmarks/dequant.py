"""NF4 dequantization throughput: lorakit (reference, Triton, fused CPU, AVX-512) vs bitsandbytes vs a plain copy.

    python benchmarks/dequant.py                       # CUDA: 14336x4096 bf16; CPU: smaller sizes
    python benchmarks/dequant.py --device cpu --sizes 4096x4096 --iters 10
    python benchmarks/dequant.py --tiny                # a couple of seconds (CI smoke test)

Bytes moved per element: read 0.5 (packed) + absmax bytes, write the output dtype's size. The copy
row is `out.copy_(src)` of the same output size (read + write), the device's practical ceiling.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorakit.quant.nf4 import dequantize_4bit_reference, quantize_4bit

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, device: str, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bnb_runner(w: torch.Tensor, blocksize: int, double_quant: bool):
    """A callable running bitsandbytes' dequantize_4bit on its own quantization of w, or None."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # bitsandbytes is optional here; any import failure means "not available"
        return None
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)

    def run():
        # bnb's CPU fallback path is wrapped in torch.compile; time the kernels, not the compiler.
        with torch.compiler.set_stance("force_eager"):
            return bnbF.dequantize_4bit(packed, state)

    return run


def kernel_runner(name: str, packed: torch.Tensor, state):
    """A callable running one of lorakit's dequantization kernels, or None where the dispatch would not use it."""
    from lorakit.kernels import dequant_4bit
    from lorakit.kernels.dispatch import TABLE, why_not

    kernel = next(k for k in TABLE[dequant_4bit.OP] if k.name == name)
    if why_not(kernel, dequant_4bit.OP, packed, state, state.dtype) is not None:
        return None
    return lambda: kernel.fn(packed, state, state.dtype)


def bench_size(rows: int, cols: int, dtype: torch.dtype, device: str, iters: int, blocksize: int,
               double_quant: bool) -> list[tuple]:
    """Rows of (size, method, ms, GB/s, % of copy, vs bnb) for one weight shape."""
    torch.manual_seed(0)
    w = (torch.randn(rows, cols, device=device) * 0.02).to(dtype)
    packed, state = quantize_4bit(w, blocksize, "nf4", double_quant)
    n = w.numel()
    absmax_bytes = state.absmax.numel() * state.absmax.element_size()
    moved = n * 0.5 + absmax_bytes + n * w.element_size()
    src, out = torch.empty_like(w), torch.empty_like(w)
    copy_ms = time_ms(lambda: out.copy_(src), device, iters)
    copy_gbps = 2 * n * w.element_size() / copy_ms / 1e6
    methods = {
        "lorakit reference": lambda: dequantize_4bit_reference(packed, state),
        "lorakit triton": kernel_runner("triton", packed, state),
        "lorakit fused CPU": kernel_runner("compiled_loop", packed, state),
        "lorakit AVX-512": kernel_runner("avx512", packed, state),
        "bitsandbytes": bnb_runner(w, blocksize, double_quant),
    }
    timings = {name: time_ms(fn, device, iters) for name, fn in methods.items() if fn is not None}
    size = f"{rows}x{cols}"
    table = [(size, "copy (read+write)", copy_ms, copy_gbps, 100.0, "")]
    for name, ms in timings.items():
        gbps = moved / ms / 1e6
        ratio = f"{timings['bitsandbytes'] / ms:.2f}x" if "bitsandbytes" in timings and name != "bitsandbytes" else ""
        table.append((size, name, ms, gbps, 100 * gbps / copy_gbps, ratio))
    return table


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'14336x4096,4096x4096' -> [(14336, 4096), (4096, 4096)]."""
    sizes = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        sizes.append((int(rows), int(cols)))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="ROWSxCOLS[,...]; default 14336x4096 (CUDA) or smaller (CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per method (median)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true", help="plain fp32 absmax instead of nested")
    parser.add_argument("--tiny", action="store_true", help="one small size, few iterations (smoke test)")
    args = parser.parse_args()

    on_cuda = args.device.startswith("cuda")
    default_sizes = "14336x4096" if on_cuda else "4096x4096,1024x4096"
    sizes = parse_sizes("256x512" if args.tiny else (args.sizes or default_sizes))
    iters = 3 if args.tiny else (args.iters or (50 if on_cuda else 5))
    device = "cuda" if on_cuda else "cpu"
    rows = []
    for r, c in sizes:
        rows += bench_size(r, c, DTYPES[args.dtype], device, iters, args.blocksize, not args.no_double_quant)

    name = torch.cuda.get_device_name() if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    nested = "nested absmax" if not args.no_double_quant else "fp32 absmax"
    print(f"\nNF4 dequant -> {args.dtype}, blocksize {args.blocksize}, {nested}, {name}, median of {iters}")
    header = f"{'size':>11}  {'method':<18} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'vs bnb':>7}"
    print(header)
    print("-" * len(header))
    for size, method, ms, gbps, pct, ratio in rows:
        print(f"{size:>11}  {method:<18} {ms:9.3f} {gbps:8.2f} {pct:6.0f}% {ratio:>7}")


if __name__ == "__main__":
    main()
