"""Where one fp32 train step of the fast path spends its time, by kind of work, on this CPU.

One warm-up step, then ``--steps`` steps under torch.profiler; self CPU time is summed per
category: the GEMMs and convolutions (dense libraries), the spike-driven products, the fused
BN+LIF passes and the packing (this package's kernels), and the rest. Run it twice, once plainly
and once with the libraries held to AVX2, to put an AVX-512 and an AVX2 profile side by side:

    python benchmarks/profile_step.py --models cifar
    QKFORMER_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/profile_step.py --models cifar

Firing is calibrated as in train_step.py (15 % by default).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from _common import MODELS, batch, build, calibrate_firing
from train_step import cpu_isa_line

# (category, substrings of the profiler's op names), first match wins. This package's kernels run
# inside its custom ops (ctypes calls, no profiler events of their own): the spike-driven products
# are marked by record_function scopes (qkformer.sparse), and what remains as the custom ops' own
# time is the fused BN + LIF passes, the statistics and the packing.
CATEGORIES = (
    ("spike-driven products (ours)", ("qkformer.sparse",)),
    ("fused units' own passes (ours)", ("qkformer",)),  # the ops and their autograd nodes
    ("GEMM / convolution (dense libraries)", ("mm", "convolution", "conv2d", "mkldnn",
                                             "linear")),
    ("optimizer (AdamW)", ("adamw", "_foreach", "optimizer", "sqrt", "lerp")),
    ("loss", ("softmax", "nll_loss", "cross_entropy")),
    ("copies, casts, elementwise", ("copy_", "to", "contiguous", "cat", "mul", "add", "sum",
                                    "clone", "empty", "zero", "fill", "permute", "view")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--firing", type=float, default=0.15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_isa_line())
    for key in args.models:
        model = build(key, "fast")
        x, y = batch(key, model, MODELS[key][3])
        calibrate_firing(model, x, args.firing)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with record_function("step"):
                    step()
        wall = (time.perf_counter() - t0) / args.steps
        totals = defaultdict(float)
        for ev in prof.key_averages():
            if ev.key == "step":
                continue
            totals[_category(ev.key)] += ev.self_cpu_time_total / 1e6 / args.steps
        print(f"\n{key}: {MODELS[key][0]}, batch {MODELS[key][3]}, fp32 train step "
              f"{wall:.2f} s (profiled)")
        whole = sum(totals.values())
        for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
            print(f"  {cat:<40s} {t:7.3f} s  {t / whole:5.1%}")


if __name__ == "__main__":
    main()
