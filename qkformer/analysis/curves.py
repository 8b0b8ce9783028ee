"""Learning curve of a run against the authors' reference milestones (docs/original.md §7).

The run's log is JSON lines, one object per epoch with at least ``epoch`` and ``test_acc1``
(optionally ``train_loss``); lines without ``test_acc1`` are ignored for the accuracy plot. The
reference milestones are package data (``reference_curves.json``), read from the authors'
training logs; epochs are 0-based in both.

CLI::

    python -m qkformer.analysis.curves --log run/log.jsonl --dataset cifar10 --out curves/
    # writes curves/curves.png and curves/curves.csv (run vs reference at each milestone)
"""
from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Dict, List

from qkformer.config import run_cli

from ._common import add_out_arg, output_folder, save_figure, write_csv

__all__ = ["REFERENCE_FILE", "reference_names", "load_reference", "read_log", "compare_to_reference",
           "plot_curves"]

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
    return refs[key]


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


def plot_curves(records: List[dict], reference: dict, path, label: str = "this run") -> Path:
    """Top-1 (and train loss, when either side has it) of the run vs the reference milestones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [(r["epoch"], r["test_acc1"]) for r in records if r.get("test_acc1") is not None]
    loss = [(r["epoch"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    with_loss = bool(loss or reference.get("train_loss"))
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(11 if with_loss else 6, 4),
                             squeeze=False)
    ax = axes[0, 0]
    ref_e, ref_a = zip(*reference["test_acc1"])
    ax.plot(ref_e, ref_a, "o--", color="gray", label=f"reference: {reference['label']}")
    best = reference.get("best")
    if best:
        ax.plot([best["epoch"]], [best["acc1"]], "*", ms=12, color="gold", mec="k",
                label=f"reference best {best['acc1']:.2f} (epoch {best['epoch']})")
    if acc:
        ax.plot(*zip(*acc), "-", color="tab:blue", label=f"{label} (best {max(a for _, a in acc):.2f})")
    ax.set(xlabel="epoch (0-based)", ylabel="test top-1 (%)", title="accuracy")
    ax.legend(fontsize=8, loc="lower right")
    if with_loss:
        ax = axes[0, 1]
        if reference.get("train_loss"):
            ax.plot(*zip(*reference["train_loss"]), "o--", color="gray", label="reference")
        if loss:
            ax.plot(*zip(*loss), "-", color="tab:blue", label=label)
        ax.set(xlabel="epoch (0-based)", ylabel="train loss", title="train loss")
        ax.legend(fontsize=8)
    for a in axes[0]:
        a.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.curves",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--log", required=True, help="JSON-lines log of the run")
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(reference_names())}")
    p.add_argument("--label", default="this run")
    add_out_arg(p, "curves")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    records, reference = read_log(args.log), load_reference(args.dataset)
    rows = compare_to_reference(records, reference)
    for row in rows:
        print(f"epoch {row['epoch']:4d}  reference {row['reference']:7.3f}  run {row['run']:7.3f}  "
              f"delta {row['delta']:+7.3f}")
    written = {"csv": write_csv(out / "curves.csv", rows, ("epoch", "reference", "run", "delta")),
               "png": plot_curves(records, reference, out / "curves.png", args.label)}
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
