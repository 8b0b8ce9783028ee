"""Learning curve of a run against the authors' reference milestones (docs/original.md §7).

The run's log is JSON lines, one object per epoch with at least ``epoch`` and ``test_acc1``
(optionally ``train_loss``); lines without ``test_acc1`` are ignored for the accuracy plot. The
reference milestones are package data (``reference_curves.json``), read from the authors'
training logs; epochs are 0-based in both.

The run's settings are read from the ``args.yaml`` that training writes beside its log (dataset,
epochs, model, T; a folder written by the demo's digits generator counts as the dataset
``digits``). The x axis spans the run's epochs, and the reference is drawn and compared only when
the run trained on the reference's dataset: a 12-epoch run on digits is not set against 410
epochs of CIFAR-10.

CLI::

    python -m qkformer.analysis.curves --log run/log.jsonl --dataset cifar10 --out curves/
    # writes curves/curves.png and curves/curves.csv (run vs reference at each milestone)
"""
from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

from qkformer.config import run_cli

from ._common import add_out_arg, output_folder, run_title, save_figure, write_csv

__all__ = ["REFERENCE_FILE", "reference_names", "load_reference", "read_log", "read_run_settings",
           "reference_applies", "compare_to_reference", "curves_figure", "plot_curves"]

REFERENCE_FILE = "reference_curves.json"
_ALIASES = {"imagenet": "imagenet_10_384", "cifar10dvs": "cifar10_dvs", "dvs": "cifar10_dvs"}


def _all_references() -> Dict[str, dict]:
    text = resources.files(__package__).joinpath(REFERENCE_FILE).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def reference_names() -> List[str]:
    return list(_all_references())


def load_reference(dataset: str) -> dict:
    """Reference curve of ``dataset`` ('cifar10', 'cifar100', 'cifar10_dvs', 'imagenet_10_384',
    'imagenet_10_512', 'imagenet_10_768', 'imagenet_10_768_384px'; '-' and '_' are equivalent,
    'qkformer_' prefixes are accepted)."""
    key = dataset.lower().replace("-", "_")
    key = key[len("qkformer_"):] if key.startswith("qkformer_") else key
    key = _ALIASES.get(key, key)
    if key.startswith("10_"):  # qkformer_10_384 -> imagenet_10_384
        key = "imagenet_" + key
    refs = _all_references()
    if key not in refs:
        raise KeyError(f"no reference curve for {dataset!r}; known: {', '.join(refs)}")
    # "dataset": what the reference run trained on, in the training driver's --dataset terms
    return {**refs[key], "name": key, "dataset": "imagenet" if key.startswith("imagenet") else key}


def read_run_settings(log_path) -> dict:
    """The run's ``dataset``, ``epochs``, ``model`` and ``T`` from the ``args.yaml`` beside its
    log ({} without one). A data folder written by the digits generator (the demo's) makes the
    dataset ``digits``, whatever recipe trained on it."""
    import yaml

    from qkformer.data.synthetic_images import _MANIFEST as DIGITS_MANIFEST

    path = Path(log_path).with_name("args.yaml")
    if not path.is_file():
        return {}
    saved = yaml.safe_load(path.read_text()) or {}
    run = {k: saved[k] for k in ("dataset", "epochs", "model", "T") if saved.get(k) is not None}
    data_dir = saved.get("data_dir")
    if data_dir and (Path(data_dir) / DIGITS_MANIFEST).is_file():
        run["dataset"] = "digits"
    return run


def reference_applies(reference: dict, run: dict) -> bool:
    """Whether the reference curve belongs next to the run: the same dataset, or an unknown one."""
    return run.get("dataset") is None or run["dataset"] == reference.get("dataset")


def read_log(path) -> List[dict]:
    """Records of a JSON-lines log (blank lines skipped; a malformed line raises with its number)."""
    records = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON object ({e})") from e
        if not isinstance(rec, dict) or "epoch" not in rec:
            raise ValueError(f"{path}:{i}: expected an object with an 'epoch' key, got {line[:80]!r}")
        records.append(rec)
    return records


def compare_to_reference(records: List[dict], reference: dict) -> List[dict]:
    """Run vs reference top-1 at every reference milestone epoch the run has reached."""
    run = {int(r["epoch"]): float(r["test_acc1"]) for r in records if r.get("test_acc1") is not None}
    return [{"epoch": e, "reference": ref, "run": run[e], "delta": run[e] - ref}
            for e, ref in reference["test_acc1"] if e in run]


def curves_figure(records: List[dict], reference: Optional[dict], label: str = "this run",
                  epochs: Optional[int] = None, title: Optional[str] = None):
    """Top-1 (and train loss, when either side has it) of the run, with the reference milestones
    when ``reference`` is given. The x axis spans the run's ``epochs`` (default: up to its last
    logged epoch); reference milestones past it are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(r["epoch"], r["test_acc1"]) for r in records if r.get("test_acc1") is not None]
    loss = [(r["epoch"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    logged = [r["epoch"] for r in records]
    if epochs:
        last = epochs - 1
    elif logged:
        last = max(logged)
    else:  # nothing of the run: the reference's own span
        last = max(e for e, _ in reference["test_acc1"]) if reference else 1

    def within(points):
        return [(e, v) for e, v in points if e <= last]

    ref_acc = within(reference["test_acc1"]) if reference else []
    ref_loss = within(reference.get("train_loss") or []) if reference else []
    with_loss = bool(loss or ref_loss)
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(11 if with_loss else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    if ref_acc:
        ax.plot(*zip(*ref_acc), "o--", color="gray", label=f"reference: {reference['label']}")
    best = reference.get("best") if reference else None
    if best and best["epoch"] <= last:
        ax.plot([best["epoch"]], [best["acc1"]], "*", ms=12, color="gold", mec="k",
                label=f"reference best {best['acc1']:.2f} (epoch {best['epoch']})")
    if acc:
        ax.plot(*zip(*acc), "-", color="tab:blue", label=f"{label} (best {max(a for _, a in acc):.2f})")
    ax.set(xlabel="epoch (0-based)", ylabel="test top-1 (%)", title="accuracy")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    if with_loss:
        ax = axes[0, 1]
        if ref_loss:
            ax.plot(*zip(*ref_loss), "o--", color="gray", label="reference")
        if loss:
            ax.plot(*zip(*loss), "-", color="tab:blue", label=label)
        ax.set(xlabel="epoch (0-based)", ylabel="train loss", title="train loss")
        ax.legend(fontsize=8)
    pad = max(0.5, 0.02 * last)
    for a in axes[0]:
        a.set_xlim(-pad, last + pad)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(records: List[dict], reference: Optional[dict], path, label: str = "this run",
                epochs: Optional[int] = None, title: Optional[str] = None) -> Path:
    """Write :func:`curves_figure` as a PNG to ``path``."""
    return save_figure(curves_figure(records, reference, label, epochs, title), path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.curves",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="JSON-lines log of the run")
    p.add_argument("--dataset", default=None,
                   help=f"reference curve, one of: {', '.join(reference_names())} (default: the "
                        f"run's dataset, from the args.yaml beside --log)")
    p.add_argument("--run-dataset", default=None,
                   help="the dataset the run trained on, when its args.yaml does not say (or "
                        "says wrong); the reference is drawn only when the two match")
    p.add_argument("--label", default="this run")
    add_out_arg(p, "curves")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    records, run = read_log(args.log), read_run_settings(args.log)
    if args.run_dataset:
        run["dataset"] = args.run_dataset
    name = args.dataset or run.get("dataset")
    if name is None:
        raise ValueError("--dataset is needed: the run's dataset is unknown (no args.yaml beside "
                         f"{args.log})")
    try:
        reference = load_reference(name)
    except KeyError:
        if args.dataset:
            raise
        reference = None  # a dataset without a reference curve (e.g. the demo's digits)
    if reference is not None and not reference_applies(reference, run):
        print(f"reference {reference['name']} not drawn: the run trained on {run['dataset']}, "
              f"the reference on {reference['dataset']}")
        reference = None
    rows = compare_to_reference(records, reference) if reference else []
    for row in rows:
        print(f"epoch {row['epoch']:4d}  reference {row['reference']:7.3f}  run {row['run']:7.3f}  "
              f"delta {row['delta']:+7.3f}")
    title = run_title(run.get("model", args.label), run.get("dataset"), run.get("T"))
    written = {"csv": write_csv(out / "curves.csv", rows, ("epoch", "reference", "run", "delta")),
               "png": plot_curves(records, reference, out / "curves.png", args.label,
                                  run.get("epochs"), title)}
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
