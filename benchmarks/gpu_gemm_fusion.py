"""Do GEMMs that take part in the unit beat cuBLAS plus a separate pass? Measured on CUDA.

The Triton route leaves the projections to cuBLAS and reads their outputs again: a statistics
pass over the conv output (forward), an unpacking of the spike bits for the weight gradient
(backward). ``triton_units.linear_stats`` and ``triton_units.weight_grad_packed`` do the
same work inside a Triton GEMM (statistics in the epilogue; spikes and counts read as compact storage keeps them: bits,
bytes). By the
count (benchmarks/gpu_cost.py) that saves bytes; whether it saves time depends on how close a
Triton GEMM comes to cuBLAS at these shapes, which only a GPU can say.

    python benchmarks/gpu_gemm_fusion.py [--model hst384] [--batch 32] [--dtype float16]

For every distinct 1x1 projection of one training step (shapes recorded from one forward of
the model; rows scaled to ``--batch``), CUDA-event times (median of ``--reps``) of

    forward    cuBLAS GEMM + statistics pass   against   linear_stats
    backward   input unpacked + cuBLAS GEMM    against   weight_grad_packed

and the totals over the step, weighted by how often each shape occurs. A ratio below 1 means
the fused form is faster. Without CUDA it prints "no CUDA device: GEMM fusion benchmark
skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter

import torch

from _common import MODELS, batch, build


def projection_shapes(key: str, size: int) -> Counter:
    """(rows, in, out, bias, how the input is kept) of every 1x1 projection in one forward of
    one image, rows scaled to ``size`` images, counted (analog inputs are not kept packed and
    are left out)."""
    from qkformer import fused

    model = build(key, "fast").eval()
    x, _ = batch(key, model, 1)
    seen: Counter = Counter()
    gemm = fused._gemm

    def record(x, weight, bias, kernel_size, stride, x_kind=fused.ANALOG):
        if kernel_size == 0 and x_kind != fused.ANALOG:
            rows = x.numel() // x.shape[-1]
            fmt = "bits" if x_kind == fused.SPIKES else "u8"
            seen[(rows * size, x.shape[-1], weight.shape[0], bias is not None, fmt)] += 1
        return gemm(x, weight, bias, kernel_size, stride, x_kind)

    fused._gemm = record
    try:
        with torch.no_grad():
            model(x)
    finally:
        fused._gemm = gemm
    return seen


def _ms(fn, reps: int) -> float:
    fn()  # compile / warm
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="hst384")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GEMM fusion benchmark skipped")
        return 0
    from qkformer import triton_units

    dtype = getattr(torch, args.dtype)
    shapes = projection_shapes(args.model, args.batch)
    print(f"{args.model}, batch {args.batch}, {args.dtype}: {sum(shapes.values())} projections, "
          f"{len(shapes)} shapes; ms (median of {args.reps})")
    print(f"{'rows':>8} {'in':>5} {'out':>5} {'kept':>4} {'n':>3}  {'fwd cuBLAS+stats':>16} "
          f"{'fused':>7}  {'wgrad unpack+cuBLAS':>19} {'fused':>7}")
    totals = [0.0] * 4
    g = torch.Generator(device="cuda").manual_seed(0)
    for (M, K, N, has_bias, fmt), n in sorted(shapes.items()):
        x = (torch.rand(M, K, device="cuda", generator=g) < 0.15).to(dtype)
        if fmt == "u8":  # counts: a residual sum of a few spike maps
            x = x + (torch.rand(M, K, device="cuda", generator=g) < 0.15).to(dtype)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
        b = torch.randn(N, device="cuda", generator=g).to(dtype) if has_bias else None
        grad = torch.randn(M, N, device="cuda", generator=g).to(dtype)
        kept = triton_units.pack(x, fmt).data
        ref = torch.zeros(N, device="cuda", dtype=dtype)

        def fwd_cublas():
            y = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            triton_units.colstats(y)

        def wgrad_cublas():
            xs = triton_units.unpack(kept, fmt, M * K, dtype).view(M, K)
            return grad.t() @ xs

        y_fused, _ = triton_units.linear_stats(x, w, b, ref)
        y_ref = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
        gw_fused = triton_units.weight_grad_packed(grad, kept, fmt, K)
        for what, a, c in (("forward", y_fused, y_ref), ("weight gradient", gw_fused,
                                                        wgrad_cublas())):
            err = ((a.float() - c.float()).abs().max() / c.float().abs().max().clamp_min(1e-30))
            if err.item() > 2e-2:
                print(f"{what} of {M}x{K}x{N} differs from cuBLAS by {err.item():.3g} (relative)")
                return 1
        row = [_ms(fwd_cublas, args.reps),
               _ms(lambda: triton_units.linear_stats(x, w, b, ref), args.reps),
               _ms(wgrad_cublas, args.reps),
               _ms(lambda: triton_units.weight_grad_packed(grad, kept, fmt, K), args.reps)]
        totals = [t + n * r for t, r in zip(totals, row)]
        print(f"{M:>8} {K:>5} {N:>5} {fmt:>4} {n:>3}  {row[0]:>16.3f} {row[1]:>7.3f}  {row[2]:>19.3f} "
              f"{row[3]:>7.3f}")
        del x, w, b, grad, kept, y_fused, y_ref, gw_fused
        torch.cuda.empty_cache()
    print(f"per step: forward {totals[0]:.2f} ms cuBLAS+stats, {totals[1]:.2f} ms fused "
          f"({totals[1] / totals[0]:.2f}x); weight gradients {totals[2]:.2f} ms unpack+cuBLAS, "
          f"{totals[3]:.2f} ms fused ({totals[3] / totals[2]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
