"""Accuracy and energy of one checkpoint evaluated at T = 1..6 time steps.

The model is trained at one T (4 for ImageNet/CIFAR), and ``model.T`` only sets how many times the
static image is presented, so any T can be evaluated without retraining (the paper's time-step
ablation retrains per T; this measures the trained model's sensitivity). Energy per image comes
from :mod:`qkformer.analysis.energy`, measured in the same pass. Static-image models only: event
models take T from their data.

CLI::

    python -m qkformer.analysis.timesteps --model qkformer_cifar10 --checkpoint ck.pth \
        --data-dir data/cifar10 --out timesteps/
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from qkformer.config import run_cli

from ._common import (add_data_args, add_model_args, batches_from_args, data_label, is_event_model,
                      iter_inputs, max_batches, model_from_args, run_title, save_figure, write_json,
                      add_out_arg, output_folder)
from .energy import E_AC_PJ, E_MAC_PJ, EnergyMeter

__all__ = ["TimestepResult", "evaluate_timesteps", "plot_timesteps", "save_timesteps"]


@dataclass
class TimestepResult:
    T: int
    images: int
    acc1: Optional[float]  # % (None without labels)
    acc5: Optional[float]
    energy_mj: float       # per image
    sops: float
    mac_ops: float


@torch.no_grad()
def evaluate_timesteps(model: nn.Module, batches: Iterable, ts: Iterable[int] = range(1, 7),
                       max_batches: Optional[int] = None, e_mac_pj: float = E_MAC_PJ,
                       e_ac_pj: float = E_AC_PJ, device=None) -> List[TimestepResult]:
    """Evaluate ``model`` (eval mode) on ``batches`` at each T in ``ts``; restores ``model.T``."""
    if is_event_model(model):
        raise ValueError("event (DVS) models take T from the data; "
                         "this tool needs a static-image model")
    model.eval()
    device = device or next(model.parameters()).device
    original_T, results = model.T, []
    try:
        for T in ts:
            model.T = T
            hits1 = hits5 = labelled = 0
            with EnergyMeter(model, e_mac_pj, e_ac_pj) as meter:
                for x, y in iter_inputs(batches, max_batches):
                    logits = model(x.to(device))
                    if y is not None:
                        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
                        hits1 += int((top[:, 0] == y).sum())
                        hits5 += int((top == y[:, None]).any(1).sum())
                        labelled += len(y)
            e = meter.report()
            acc = (lambda h: 100.0 * h / labelled) if labelled else (lambda h: None)
            results.append(TimestepResult(T, e.images, acc(hits1), acc(hits5), e.total_mj, e.sops,
                                          e.mac_ops))
    finally:
        model.T = original_T
    return results


def plot_timesteps(results: List[TimestepResult], path, title: Optional[str] = None) -> Path:
    """Accuracy and energy per image against T; ``title`` names the model and data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [r.T for r in results]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if any(r.acc1 is not None for r in results):
        a1.plot(ts, [r.acc1 for r in results], "o-", label="top-1")
        a1.plot(ts, [r.acc5 for r in results], "s--", label="top-5")
        a1.legend()
    a1.set(xlabel="time steps T", ylabel="accuracy (%)", title="accuracy")
    a2.plot(ts, [r.energy_mj for r in results], "o-", color="tab:red")
    a2.set(xlabel="time steps T", ylabel="energy per image (mJ)", title="energy")
    for a in (a1, a2):
        a.set_xticks(ts)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_timesteps(results: List[TimestepResult], out_dir,
                   title: Optional[str] = None) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"json": write_json(out / "timesteps.json", [asdict(r) for r in results]),
            "png": plot_timesteps(results, out / "timesteps.png", title)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.timesteps",
                                description=__doc__.split("\n\n")[0])
    add_model_args(p)
    add_data_args(p, batches=None)
    p.add_argument("--ts", type=int, nargs="+", default=list(range(1, 7)), help="values of T")
    add_out_arg(p, "timesteps")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    model = model_from_args(args)
    results = evaluate_timesteps(model, batches_from_args(args, model), args.ts, max_batches(args))
    for r in results:
        acc = f"top-1 {r.acc1:6.2f}%  top-5 {r.acc5:6.2f}%" if r.acc1 is not None else "no labels"
        print(f"T={r.T}  {acc}  energy {r.energy_mj:.4f} mJ/image  ({r.images} images)")
    # the model's own T (its training T, unless --model-kwargs set one) next to the T evaluated
    ts = ", ".join(str(r.T) for r in results)
    title = run_title(args.model, data_label(args), f"{ts} (model: T={model.T})")
    for kind, path in save_timesteps(results, out, title).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
