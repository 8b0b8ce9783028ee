"""GPU benchmark of the multistep LIF neuron: forward + backward time and peak CUDA memory.

Compares, in one run on one device, the fused CuPy kernel (qkformer/cuda), this package's torch
backend, and the neuron QKFormer was trained with, spikingjelly 0.0.0.0.14
``clock_driven.neuron.MultiStepLIFNode(tau=2., detach_reset=True, backend='torch')`` (one autograd
graph per time step). Shapes are QKFormer-10-384 activations at batch 64: [T, B, C, H, W].

    python benchmarks/lif_gpu.py [--iters 20]

Prints "no CUDA device: GPU LIF benchmark skipped" and exits 0 on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import sys

import torch


SHAPES = [(4, 64, 384, 8, 8), (4, 64, 96, 32, 32)]
DTYPES = [torch.float32, torch.float16]


def _candidates():
    from qkformer import cuda as lif_cuda
    from qkformer.neuron import lif_multistep

    out = {}
    if lif_cuda.is_available():
        out["cupy kernel"] = lambda x: lif_multistep(x, backend="cupy")
    else:
        print(f"cupy kernel skipped: {lif_cuda.unavailable_reason()}")
    out["qkformer torch"] = lambda x: lif_multistep(x, backend="torch")
    try:
        from spikingjelly.clock_driven.neuron import MultiStepLIFNode

        node = MultiStepLIFNode(tau=2.0, detach_reset=True, backend="torch")

        def sj(x):
            node.reset()  # stateful: every batch starts from V = 0, as reset_net did
            return node(x)

        out["spikingjelly torch"] = sj
    except ImportError as e:
        print(f"spikingjelly skipped: {e}")
    return out


def _measure(fn, x, grad, iters):
    """Mean ms of forward+backward, and peak memory above the inputs (MiB), for one candidate."""

    def step():
        xi = x.detach().requires_grad_()
        fn(xi).backward(grad)
        return xi

    for _ in range(3):  # warm-up: kernel compile, allocator
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU LIF benchmark skipped")
        return 0
    cands = _candidates()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  iters {args.iters}")
    for shape in SHAPES:
        for dtype in DTYPES:
            torch.manual_seed(0)
            x = (torch.randn(shape, device="cuda") * 1.5 + 0.6).to(dtype)
            grad = torch.randn(shape, device="cuda").to(dtype)
            print(f"\n[{', '.join(map(str, shape))}] {str(dtype).replace('torch.', '')}  "
                  f"({x.numel() * x.element_size() / 2**20:.0f} MiB per tensor)")
            results, spikes = {}, {}
            for name, fn in cands.items():
                with torch.no_grad():
                    spikes[name] = fn(x)
                results[name] = _measure(fn, x, grad, args.iters)
                torch.cuda.empty_cache()
            ref = "cupy kernel" if "cupy kernel" in results else "qkformer torch"
            ref_ms, ref_mib = results[ref]
            for name, (ms, mib) in results.items():
                differ = (spikes[name] != spikes[ref]).float().mean().item()
                print(f"  {name:<20} {ms:8.3f} ms {mib:8.1f} MiB peak | {ms / ref_ms:6.2f}x time "
                      f"{mib / ref_mib:6.2f}x memory of {ref} | spikes differing {differ:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
