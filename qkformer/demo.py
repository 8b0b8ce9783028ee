"""The main-job demo: train a small QKFormer on CPU and evaluate it, with no download.

    python -m qkformer.demo [--epochs 12] [--output-dir output/demo] [--data-dir data/digits32]

Data: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upsampled to 32x32 and
written as an ImageFolder (``data/digits32``, relative to the working directory). About 3 minutes on
2 CPU cores, ~98-99% top-1. Training goes through the real CIFAR-10 path (``cifar10/train.py``'s
recipe, the bundled ``--config cifar10``, with a smaller model and a short schedule given as
overrides: 12 epochs, the first a warm-up from a tenth of the peak learning rate); evaluation
through the real checkpoint path (``imagenet/test.py``). The checkpoint and the training log are
written to ``--output-dir``; the last lines printed say where.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import evaluate, train
from .config import run_cli
from .data.synthetic_images import write_digits_image_folder
from .threads import fit_for_command_line


LR = 5e-3
# The recipe's warm-up starts at 1e-5, which on an epoch-stepped schedule means the whole first
# epoch at 1e-5: a twelfth of the demo learning nothing. A tenth of the peak still eases Adam in.
WARMUP_LR = LR / 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="data/digits32",
                   help="where the digits ImageFolder is written (reused when already there)")
    p.add_argument("--output-dir", default="output/demo",
                   help="checkpoint, log.jsonl, TensorBoard events and args.yaml")
    p.add_argument("--epochs", type=int, default=12, help="training epochs")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars")
    return p


def training_args(data, output_dir, epochs: int = 12, workers: int = 2,
                  progress: bool = True) -> list:
    """The demo's training command line (``qkformer.train`` with the ``cifar10`` config), also
    timed by ``benchmarks/shared_cpu.py``."""
    return [
        "--data-dir", str(data), "--output-dir", str(output_dir),
        # a small member of the CIFAR family (widths 32/64/128, one block per stage, T = 2) at
        # 16x16 input (the 32x32 images carry 8x8 worth of detail): 3 stages, 16/8/4 token grids
        "--input-size", "16", "--embed-dims", "32", "64", "128", "--depths", "1", "1", "1",
        "--num-heads", "2", "--T", "2", "--batch-size", "16", "--lr", str(LR),
        "--epochs", str(epochs), "--warmup-epochs", "1" if epochs > 1 else "0",
        "--warmup-lr", str(WARMUP_LR), "--cooldown-epochs", "0",
        # digits are not mirror-symmetric and the run is short: no flips, mixup or erasing
        "--hflip", "0", "--mixup", "0", "--aa", "", "--reprob", "0",
        # bf16 autocast is emulated (slow) on CPUs without AVX512-BF16/AMX
        "--no-amp", "--workers", str(workers), "--progress" if progress else "--no-progress",
    ]


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs {args.epochs}: at least 1 epoch is needed")
    fit_for_command_line(argv is None)
    return run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> dict:
    start = time.perf_counter()
    data = write_digits_image_folder(args.data_dir, size=32)
    progress = "--progress" if args.progress else "--no-progress"
    train.main(training_args(data, args.output_dir, args.epochs, args.workers, args.progress),
               default_config="cifar10")
    trained = time.perf_counter() - start
    out = Path(args.output_dir)
    checkpoint = out / "checkpoint-last.pth"
    stats = evaluate.main(["--checkpoint", str(checkpoint),
                           "--data-dir", str(data), "--batch-size", "64", "--no-amp",
                           "--workers", str(args.workers), progress])
    total = time.perf_counter() - start
    print(f"demo: top-1 {stats['acc1']:.1f}% (chance 10%) on {stats['images']} held-out digits; "
          f"training {trained / 60:.1f} min, total {total / 60:.1f} min")
    out = out.resolve()
    print(f"demo: checkpoint {out / checkpoint.name}\n"
          f"demo: training log {out / 'log.jsonl'} (TensorBoard events: {out / 'tb'})\n"
          f"demo: data {Path(data).resolve()}")
    return stats


if __name__ == "__main__":
    main()
