"""LIF neuron: our torch backend vs spikingjelly 0.0.0.0.14 MultiStepLIFNode (torch backend).

Forward + backward on realistic tensors (T=4, 64x384x8x8 and 64x96x32x32, fp32, CPU). Time is the
best of --repeats runs; peak memory is the growth of the process's peak RSS during one
forward+backward, each measurement in a fresh subprocess so earlier runs cannot mask it.

    python benchmarks/lif.py [--repeats 5] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = [(4, 64, 384, 8, 8), (4, 64, 96, 32, 32)]
QUICK_SHAPES = [(4, 8, 16, 8, 8)]
TARGET_SPEEDUP, TARGET_MEMORY = 2.0, 0.5


def _neuron(impl: str):
    if impl == "spikingjelly":
        from spikingjelly.clock_driven.neuron import MultiStepLIFNode

        def run(x):  # a fresh node = the state reset the original did after every batch
            return MultiStepLIFNode(tau=2.0, detach_reset=True, backend="torch")(x)
        return run
    from qkformer.neuron import MultiStepLIF

    return MultiStepLIF(backend="torch")


def _child(impl: str, shape, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 1.5 + 0.5
    up = torch.randn(shape, generator=g)
    neuron = _neuron(impl)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        xx = x.clone().requires_grad_()
        t = time.perf_counter()
        neuron(xx).backward(up)
        times.append(time.perf_counter() - t)
        if len(times) == 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 - x.numel() * 4 // 1024
        del xx
    return {"time_s": min(times), "peak_mib": max(peak, 0) / 1024}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny tensor, 2 repeats (smoke test)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], json.loads(args.child[1]), args.repeats, args.threads)))
        return 0
    shapes, repeats = (QUICK_SHAPES, 2) if args.quick else (SHAPES, args.repeats)
    ok = True
    print(f"LIF forward+backward, fp32 CPU, {args.threads} threads, best of {repeats}")
    for shape in shapes:
        res = {}
        for impl in ("spikingjelly", "qkformer"):
            out = subprocess.run([sys.executable, __file__, "--child", impl, json.dumps(shape),
                                  "--repeats", str(repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        sj, ours = res["spikingjelly"], res["qkformer"]
        speedup = sj["time_s"] / ours["time_s"]
        mem = ours["peak_mib"] / sj["peak_mib"] if sj["peak_mib"] else float("nan")
        passed = speedup >= TARGET_SPEEDUP and mem <= TARGET_MEMORY
        ok &= passed
        print(f"{'x'.join(map(str, shape)):>18}: spikingjelly {sj['time_s'] * 1e3:8.1f} ms "
              f"{sj['peak_mib']:8.0f} MiB | ours {ours['time_s'] * 1e3:8.1f} ms "
              f"{ours['peak_mib']:8.0f} MiB | speed-up x{speedup:.2f} (target >= {TARGET_SPEEDUP}), "
              f"memory x{mem:.2f} (target <= {TARGET_MEMORY}) {'PASS' if passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
