"""Per-call latency of the multistep LIF neuron on small tensors, where the fixed cost of a call
(Python, autograd, dispatcher, kernel launch) is most of its time.

For each size: microseconds per forward (no grad) and per forward + backward, for
* ``eager``: ``lif_multistep`` as models call it (a plain autograd Function);
* ``custom op``: the same through ``torch.ops.qkformer.lif_forward`` and its registered autograd
  formula (what a ``torch.compile``d graph runs), i.e. the dispatch overhead of the custom op;
each with the torch backend and, on CUDA when the kernel works, the CuPy kernel.

    python benchmarks/lif_latency.py [--device cpu|cuda] [--iters 200] [--repeats 5]

The figure is the best of ``--repeats`` interleaved rounds of ``--iters`` calls (CUDA:
synchronised around each round).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZES = [(4, 256), (4, 16, 96, 16, 16), (4, 16, 384, 8, 8)]


def _paths(backend: str):
    from qkformer.neuron import lif_multistep

    def eager(x):
        return lif_multistep(x, backend=backend)

    def op(x):
        save_h = torch.is_grad_enabled() and x.requires_grad
        return torch.ops.qkformer.lif_forward(x, 2.0, 1.0, 4.0, True, save_h, backend)[0]

    return {"eager": eager, "custom op": op}


def _once(fn, x, grad):
    if grad is None:
        with torch.no_grad():
            fn(x)
    else:
        fn(x).backward(grad)


def _measure(cases, device, iters, repeats):
    """Best seconds per call of each (fn, x, grad) case. All cases are warmed up first and the
    rounds interleave them, so that neither the allocator's first growth nor a burst of load
    from another process lands on one case only."""
    for fn, x, grad in cases:
        for _ in range(5):
            _once(fn, x, grad)
    best = [float("inf")] * len(cases)
    for _ in range(repeats):
        for i, (fn, x, grad) in enumerate(cases):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                _once(fn, x, grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], (time.perf_counter() - t0) / iters)
    return [b * 1e6 for b in best]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: LIF latency benchmark skipped")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from qkformer import cuda as lif_cuda

    backends = ["torch"]
    if device.type == "cuda":
        if lif_cuda.is_available():
            backends.append("cupy")
        else:
            print(f"cupy kernel skipped: {lif_cuda.unavailable_reason()}")
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats} x {args.iters} calls, microseconds per call")
    print(f"{'shape':<22} {'backend':<7} {'path':<10} {'forward':>10} {'fwd+bwd':>10}")
    for shape in SIZES:
        x = torch.randn(shape, device=device) + 0.6
        grad = torch.randn(shape, device=device)
        xg = x.clone().requires_grad_()
        rows = [(backend, name, fn) for backend in backends for name, fn in _paths(backend).items()]
        cases = [c for _, _, fn in rows for c in ((fn, x, None), (fn, xg, grad))]
        times = _measure(cases, device, args.iters, args.repeats)
        for i, (backend, name, _) in enumerate(rows):
            fwd, both = times[2 * i], times[2 * i + 1]
            print(f"{str(list(shape)):<22} {backend:<7} {name:<10} {fwd:10.1f} {both:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
