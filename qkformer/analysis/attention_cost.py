"""Memory and time of one attention module versus the token count N (paper Figure 3b).

Each module runs forward + backward in train mode on random spikes ``[T, B, C, H, W]`` with
N = H*W tokens. Memory:

* CUDA: ``torch.cuda.max_memory_allocated`` during forward + backward, minus what was allocated
  before (parameters, input), so it includes transient buffers.
* CPU (no allocator statistics): the bytes of every distinct tensor storage autograd saves for
  backward (``torch.autograd.graph.saved_tensors_hooks``) plus the output, excluding parameters and
  the input. This is the activation memory a training step must hold; it is deterministic.

Time: the best of ``repeats`` forward + backward passes after one warm-up.
The slope of log(memory) vs log(N) tells the growth order: 1 = linear, 2 = quadratic.
Note: this package's SSA computes q·(kᵀ·v) (a d x d intermediate, as in the original code), which
is linear in N; the N x N form (q·kᵀ)·v is provided by ``benchmarks/attention_cost.py``.

CLI::

    python -m qkformer.analysis.attention_cost --out attention_cost/
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from qkformer.attention import QKChannelAttention, QKTokenAttention, SpikingSelfAttention
from qkformer.config import run_cli

from ._common import add_out_arg, output_folder, save_figure, write_csv

__all__ = ["DEFAULT_NS", "DEFAULT_MODULES", "CostPoint", "measure_module",
           "measure_attention_cost", "fit_slopes", "print_slopes", "plot_attention_cost",
           "save_attention_cost"]

DEFAULT_NS = tuple(2 ** k for k in range(6, 15))  # 64 .. 16,384 tokens
DEFAULT_MODULES: Dict[str, Callable[[int, int], nn.Module]] = {
    "QKTA": QKTokenAttention, "QKCA": QKChannelAttention, "SSA": SpikingSelfAttention}


@dataclass
class CostPoint:
    module: str
    N: int
    memory_bytes: int
    time_s: float
    method: str


def _grid(n: int) -> Tuple[int, int]:
    """A near-square H x W with H*W = n (the modules only see N = H*W)."""
    h = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return h, n // h


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> Tuple[int, torch.Tensor]:
    """Bytes of distinct storages saved for backward (minus params/input) plus the output."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    seen[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(seen.values()), out


def measure_module(module: nn.Module, x: torch.Tensor, repeats: int = 3) -> Tuple[int, float, str]:
    """(peak bytes, best seconds, method) of forward + backward of ``module`` on ``x``.
    ``repeats=0`` measures memory only (time is NaN)."""
    module.train()
    cuda = x.is_cuda

    def step():
        out = module(x)
        out.sum().backward()

    if cuda:
        step()  # warm-up (kernel selection, allocator caches)
        torch.cuda.synchronize()
        module.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mem, method = torch.cuda.max_memory_allocated() - base, "cuda_max_memory_allocated"
    else:
        mem, out = _saved_bytes(module, x)
        out.sum().backward()  # also the warm-up of the timed runs
        method = "saved_tensors+output"
    best = math.inf if repeats else math.nan
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return int(mem), best, method


def measure_attention_cost(modules: Optional[Mapping[str, Callable[[int, int], nn.Module]]] = None,
                           ns: Iterable[int] = DEFAULT_NS, dim: int = 64, heads: int = 4, T: int = 4,
                           batch: int = 1, rate: float = 0.2, device="cpu", repeats: int = 3,
                           max_n: Optional[Mapping[str, int]] = None, seed: int = 0,
                           verbose: bool = False) -> List[CostPoint]:
    """Measure every ``modules[name](dim, heads)`` at every N (skipping N > ``max_n[name]``).

    The input is Bernoulli(``rate``) spikes with ``requires_grad`` (inside a network the
    attention input carries gradient).
    """
    modules = dict(modules or DEFAULT_MODULES)
    max_n = dict(max_n or {})
    points = []
    for n in ns:
        H, W = _grid(n)
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(T, batch, dim, H, W, generator=g) < rate).float().to(device)
        x.requires_grad_(True)
        for name, factory in modules.items():
            if n > max_n.get(name, math.inf):
                continue
            torch.manual_seed(seed)
            module = factory(dim, heads).to(device)
            mem, sec, method = measure_module(module, x, repeats)
            points.append(CostPoint(name, n, mem, sec, method))
            if verbose:
                print(f"{name:14s} N={n:6d}  memory {mem / 2 ** 20:10.2f} MiB  "
                      f"time {sec * 1e3:9.2f} ms", flush=True)
            del module
            x.grad = None
    return points


def fit_slopes(points: List[CostPoint], what: str = "memory_bytes",
               min_n: int = 0) -> Dict[str, float]:
    """Least-squares slope of log(``what``) vs log(N) per module (points with N >= ``min_n``)."""
    slopes = {}
    for name in dict.fromkeys(p.module for p in points):
        ps = [p for p in points if p.module == name and p.N >= min_n]
        if len(ps) >= 2:
            slopes[name] = float(np.polyfit(np.log([p.N for p in ps]),
                                            np.log([getattr(p, what) for p in ps]), 1)[0])
    return slopes


def plot_attention_cost(points: List[CostPoint], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what, label, scale in ((axes[0], "memory_bytes", "memory (MiB)", 2 ** -20),
                                   (axes[1], "time_s", "forward + backward time (ms)", 1e3)):
        slopes = fit_slopes(points, what)
        for name in dict.fromkeys(p.module for p in points):
            ps = [p for p in points if p.module == name]
            ax.loglog([p.N for p in ps], [getattr(p, what) * scale for p in ps], "o-",
                      label=f"{name} (slope {slopes.get(name, float('nan')):.2f})")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"memory ({points[0].method})" if points else "memory", fontsize=9)
    return save_figure(fig, path)


def save_attention_cost(points: List[CostPoint], out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"csv": write_csv(out / "attention_cost.csv", [asdict(p) for p in points]),
            "png": plot_attention_cost(points, out / "attention_cost.png")}


def print_slopes(points: List[CostPoint]) -> None:
    """Slopes over all N, and between the two largest N (the asymptotic order, once the
    linear terms no longer dominate)."""
    mem, sec = fit_slopes(points), fit_slopes(points, "time_s")
    for name in mem:
        top = sorted((p for p in points if p.module == name), key=lambda p: p.N)[-2:]
        tail = fit_slopes(top)[name]
        print(f"{name:14s} slope log(memory)/log(N) = {mem[name]:.3f} (largest two N: {tail:.3f})"
              f"   log(time)/log(N) = {sec[name]:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.attention_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS), help="token counts")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads); 1 gives steadier times on a busy machine")
    add_out_arg(p, "attention_cost")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    points = measure_attention_cost(ns=args.ns, dim=args.dim, heads=args.heads, T=args.T,
                                    batch=args.batch, device=args.device, repeats=args.repeats,
                                    verbose=True)
    print_slopes(points)
    for kind, path in save_attention_cost(points, out).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
