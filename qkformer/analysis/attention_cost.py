"""Memory and time of one attention module versus the token count N (paper Figure 3b).

Each module runs forward + backward in train mode on random spikes ``[T, B, C, H, W]`` with
N = H*W tokens. Memory:

* CUDA: ``torch.cuda.max_memory_allocated`` during forward + backward, minus what was allocated
  before (parameters, input), so it includes transient buffers.
* CPU (no allocator statistics): the bytes of every distinct tensor storage autograd saves for
  backward (``torch.autograd.graph.saved_tensors_hooks``) plus the output, excluding parameters and
  the input. This is the activation memory a training step must hold; it is deterministic.

Time: the best of ``repeats`` forward + backward passes after one warm-up. While the median of
the passes is more than ``MAX_SPREAD`` above the best (a busy machine), more passes are run, up to
``3 * repeats``; a point still that noisy is flagged (``time_spread``) and warned about.
The slope of log(memory) vs log(N) tells the growth order: 1 = linear, 2 = quadratic.
Note: this package's SSA computes q·(kᵀ·v) (a d x d intermediate, as in the original code), which
is linear in N; the N x N form (q·kᵀ)·v is provided by ``benchmarks/attention_cost.py``.

CLI::

    python -m qkformer.analysis.attention_cost --out attention_cost/
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import nn

from qkformer.attention import QKChannelAttention, QKTokenAttention, SpikingSelfAttention
from qkformer.config import run_cli

from ._common import add_out_arg, output_folder, run_title, save_figure, write_csv

__all__ = ["DEFAULT_NS", "DEFAULT_MODULES", "MAX_SPREAD", "CostPoint", "Measurement",
           "measure_module", "measure_attention_cost", "fit_slopes", "print_slopes", "cost_title",
           "plot_attention_cost", "save_attention_cost"]

DEFAULT_NS = tuple(2 ** k for k in range(6, 15))  # 64 .. 16,384 tokens
DEFAULT_MODULES: Dict[str, Callable[[int, int], nn.Module]] = {
    "QKTA": QKTokenAttention, "QKCA": QKChannelAttention, "SSA": SpikingSelfAttention}
# Largest accepted (median - best) / best of the timed passes: beyond it a time is not reproducible.
MAX_SPREAD = 0.10
_clock = time.perf_counter  # (replaceable in tests)


@dataclass
class CostPoint:
    module: str
    N: int
    memory_bytes: int
    time_s: float
    method: str
    time_spread: float = math.nan  # (median - best) / best of the timed passes
    timed_runs: int = 0
    dim: int = 0  # the measurement's setting: channels C, heads, time steps, batch
    heads: int = 0
    T: int = 0
    batch: int = 0


class Measurement(NamedTuple):
    memory_bytes: int
    time_s: float       # best pass (NaN when not timed)
    method: str
    time_spread: float  # (median - best) / best (NaN when not timed)
    timed_runs: int


def _spread(times: List[float]) -> float:
    best = min(times)
    return (statistics.median(times) - best) / best if best > 0 else math.inf


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


def measure_module(module: nn.Module, x: torch.Tensor, repeats: int = 3) -> Measurement:
    """Memory, best time and its spread of forward + backward of ``module`` on ``x``: at least
    ``repeats`` timed passes, up to ``3 * repeats`` while their spread exceeds ``MAX_SPREAD``.
    ``repeats=0`` measures memory only (time and spread are NaN)."""
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
    times: List[float] = []
    while len(times) < repeats or (len(times) < 3 * repeats and _spread(times) > MAX_SPREAD):
        if cuda:
            torch.cuda.synchronize()
        t0 = _clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(_clock() - t0)
    if not times:
        return Measurement(int(mem), math.nan, method, math.nan, 0)
    return Measurement(int(mem), min(times), method, _spread(times), len(times))


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
            m = measure_module(module, x, repeats)
            points.append(CostPoint(name, n, m.memory_bytes, m.time_s, m.method, m.time_spread,
                                    m.timed_runs, dim, heads, T, batch))
            if verbose:
                noisy = (f"  (noisy: median {m.time_spread:.0%} above the best of "
                         f"{m.timed_runs})" if m.time_spread > MAX_SPREAD else "")
                print(f"{name:14s} N={n:6d}  memory {m.memory_bytes / 2 ** 20:10.2f} MiB  "
                      f"time {m.time_s * 1e3:9.2f} ms{noisy}", flush=True)
            del module
            x.grad = None
    noisy = [p for p in points if p.time_spread > MAX_SPREAD]
    if noisy:
        worst = max(noisy, key=lambda p: p.time_spread)
        warnings.warn(f"{len(noisy)} of {len(points)} times are not stable: their median is more "
                      f"than {MAX_SPREAD:.0%} above their best after up to {3 * repeats} passes "
                      f"(worst: {worst.module} at N={worst.N}, {worst.time_spread:.0%}); the time "
                      f"slopes are unreliable. A quieter machine, more --repeats or --threads 1 "
                      f"help.", RuntimeWarning, stacklevel=2)
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


def cost_title(points: List[CostPoint]) -> str:
    """The measurement's setting, from its points: input, C, heads, T, batch and device method."""
    if not points:
        return "attention cost"
    p = points[0]
    return run_title(" / ".join(dict.fromkeys(q.module for q in points)), "random spikes",
                     p.T or None, C=p.dim or None, heads=p.heads or None, batch=p.batch or None)


def plot_attention_cost(points: List[CostPoint], path, title: Optional[str] = None) -> Path:
    """Memory and time against N on log-log axes, titled with the setting (``cost_title``);
    points whose time is not stable (see ``MAX_SPREAD``) are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, what, label, scale in ((axes[0], "memory_bytes", "memory (MiB)", 2 ** -20),
                                   (axes[1], "time_s", "forward + backward time (ms)", 1e3)):
        slopes = fit_slopes(points, what)
        for name in dict.fromkeys(p.module for p in points):
            ps = [p for p in points if p.module == name]
            line, = ax.loglog([p.N for p in ps], [getattr(p, what) * scale for p in ps], "o-",
                              label=f"{name} (slope {slopes.get(name, float('nan')):.2f})")
            noisy = [p for p in ps if p.time_spread > MAX_SPREAD]
            if what == "time_s" and noisy:
                ax.plot([p.N for p in noisy], [p.time_s * scale for p in noisy], "o", mfc="white",
                        mec=line.get_color(), zorder=3)
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(f"memory ({points[0].method})" if points else "memory", fontsize=9)
    runs = [p.timed_runs for p in points if p.timed_runs]
    if runs:
        axes[1].set_title(f"time: best of {min(runs)}-{max(runs)} passes"
                          + (" (hollow: not stable)" if any(p.time_spread > MAX_SPREAD
                                                            for p in points) else ""), fontsize=9)
    fig.suptitle(title or cost_title(points), fontsize=10)
    return save_figure(fig, path)


def save_attention_cost(points: List[CostPoint], out_dir,
                        title: Optional[str] = None) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"csv": write_csv(out / "attention_cost.csv", [asdict(p) for p in points]),
            "png": plot_attention_cost(points, out / "attention_cost.png", title)}


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
