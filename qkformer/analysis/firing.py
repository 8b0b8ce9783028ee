"""Firing rate of every spiking layer (every :class:`~qkformer.neuron.MultiStepLIF`).

rate = spikes emitted / (T x images x neurons), accumulated over all batches, so it is the mean of
the layer's binary output over time steps, samples and neurons. Neurons are found by type, so
every neuron is covered whatever its attribute name (``proj_lif``, ``mlp1_lif``, ``attn_lif``, ...).

CLI::

    python -m qkformer.analysis.firing --model qkformer_cifar10 --checkpoint ck.pth \
        --data-dir data/cifar10 --batches 20 --out firing/
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from qkformer.neuron import MultiStepLIF
from qkformer.config import run_cli

from ._common import (add_data_args, add_model_args, batches_from_args, data_label, is_event_model,
                      iter_inputs, max_batches, layer_stage, model_from_args, run_title,
                      save_figure, write_csv, write_json, add_out_arg, output_folder,
                      reference_path)

__all__ = ["LayerRate", "FiringRateMeter", "firing_rates", "plot_firing_rates", "save_firing_rates"]


@dataclass
class LayerRate:
    name: str
    stage: int
    threshold: float
    rate: float       # mean spike probability per neuron and time step
    neurons: int      # neurons of the layer per sample (per time step)


class FiringRateMeter:
    """Context manager: while open, every forward of ``model`` adds to per-neuron-layer spike counts.

    >>> with FiringRateMeter(model) as meter:
    ...     model(x)
    >>> meter.rates()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiStepLIF)}
        self._spikes: Dict[str, float] = {n: 0.0 for n in self.layers}
        self._elements: Dict[str, int] = {n: 0 for n in self.layers}
        self._neurons: Dict[str, int] = {}
        self._samples = 0  # images in the forward being run
        self._steps = 1
        self._handles = []

    def _on_input(self, module, args):
        x = args[0]
        self._samples = x.shape[0]
        # Static input is repeated model.T times; event input [B, T, ...] carries its own T.
        self._steps = x.shape[1] if is_event_model(module) else getattr(module, "T", 1)

    def _hook(self, name):
        def hook(module, args, out):
            self._spikes[name] += float(out.detach().sum(dtype=torch.float64))
            self._elements[name] += out.numel()
            # The SSA proj_lif of the legacy layout sees [T*B, C*N]; numel/(T*B) covers both layouts.
            self._neurons[name] = out.numel() // (self._steps * self._samples)
        return hook

    def __enter__(self):
        self._path = reference_path(self.model)
        self._path.__enter__()
        self._handles.append(self.model.register_forward_pre_hook(self._on_input))
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._path.__exit__(*exc)

    def rates(self) -> List[LayerRate]:
        return [LayerRate(n, layer_stage(n), m.v_threshold,
                          self._spikes[n] / self._elements[n], self._neurons[n])
                for n, m in self.layers.items() if self._elements[n]]


@torch.no_grad()
def firing_rates(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None,
                 device=None) -> List[LayerRate]:
    """Run ``model`` (eval mode) over ``batches`` (a DataLoader of ``(x, y)`` or tensors) and
    return the firing rate of every LIF layer in module order."""
    model.eval()
    device = device or next(model.parameters()).device
    with FiringRateMeter(model) as meter:
        for x, _ in iter_inputs(batches, max_batches):
            model(x.to(device))
    return meter.rates()


def plot_firing_rates(rates: List[LayerRate], path, title: Optional[str] = None) -> Path:
    """One horizontal bar chart per stage (stage 0 = layers outside the stages); ``title`` names
    the run (model, data, T: see :func:`~qkformer.analysis._common.run_title`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r.stage for r in rates})
    heights = [sum(r.stage == s for r in rates) for s in stages]
    fig, axes = plt.subplots(len(stages), 1, squeeze=False, height_ratios=heights,
                             figsize=(8, 1.5 + 0.22 * len(rates) + 0.6 * len(stages)))
    for ax, s in zip(axes[:, 0], stages):
        rs = [r for r in rates if r.stage == s]
        ax.barh(range(len(rs)), [r.rate for r in rs],
                color=["tab:orange" if r.threshold != 1.0 else "tab:blue" for r in rs])
        ax.set_yticks(range(len(rs)), [r.name for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1e-3, max(r.rate for r in rates)) * 1.1)
        ax.set_title(f"stage {s}" if s else "other", fontsize=9)
    axes[-1, 0].set_xlabel("firing rate (orange: V_th != 1, the attention neurons)")
    if title:
        fig.suptitle(f"firing rates: {title}", fontsize=10)
    return save_figure(fig, path)


def save_firing_rates(rates: List[LayerRate], out_dir,
                      title: Optional[str] = None) -> Dict[str, Path]:
    """Write ``firing_rates.json``, ``firing_rates.csv`` and ``firing_rates.png`` to ``out_dir``."""
    out = Path(out_dir)
    rows = [asdict(r) for r in rates]
    return {"json": write_json(out / "firing_rates.json", rows),
            "csv": write_csv(out / "firing_rates.csv", rows),
            "png": plot_firing_rates(rates, out / "firing_rates.png", title)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.firing",
                                description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_data_args(p)
    add_out_arg(p, "firing")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    model = model_from_args(args)
    rates = firing_rates(model, batches_from_args(args, model), max_batches(args))
    for r in rates:
        print(f"{r.name:45s} stage {r.stage}  V_th {r.threshold:.1f}  rate {r.rate:.4f}  n {r.neurons}")
    title = run_title(args.model, data_label(args), model.T)
    for kind, path in save_firing_rates(rates, out, title).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
