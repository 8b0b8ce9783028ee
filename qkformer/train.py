"""Training driver behind every ``<dataset>/train.py``: recipe -> data, model, optimizer -> engine.

    torchrun --nproc_per_node=8 imagenet/train.py --data-dir /data/imagenet --model qkformer_10_768
    python cifar10/train.py --data-dir ./data/cifar10           # recipe: --config cifar10
    python -m qkformer.train --config cifar10 --data-dir ./data/cifar10

Recipes (docs/original.md §6) are package data, ``qkformer/configs/*.yml``; ``--config`` also takes
the path of your own YAML file, and every option can be overridden on the command line.

Long runs (step checkpoints with the exact data position, ``--resume auto``, preemption signals
and exit status 75, torchrun restarts, one run per output folder): docs/long_runs.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import signal
import warnings

import numpy as np
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.layers import trunc_normal_
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from . import fused, variants  # noqa: F401  (variants: timm registration)
from .checkpoint import extract_state_dict, load_checkpoint
from .builder import build_model, check_data_dir, check_input_size
from .cpu import memory
from .threads import fit_for_command_line
from .config import ConfigError, OneLineErrorParser, parse_with_config, run_cli
from .distributed import (ShardSampler, all_reduce_sum, any_rank, gather_objects,
                          init_distributed, is_main)
from .engine import NonFiniteLossError, evaluate, train_one_epoch
from .precision import resolve_amp
from .training_checkpoint import (check_training_checkpoint, read_checkpoint_file,
                                  restore_training_state, rng_state, save_checkpoint)
from .run_state import (EXIT_PREEMPTED, Preemption, RunLock, SeededSamples, check_output_dir,
                        prune_steps, remove_partial_files, resume_candidates, step_checkpoint_path)
from .neuron import describe_backend

# torchdata calls a deprecated torch function on every new iterator; the warning says nothing
# about this run.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

__all__ = ["build_parser", "main", "check_args", "build_model", "build_datasets"]

DATASETS = ("imagenet", "cifar10", "cifar100", "cifar10_dvs", "dvs128_gesture")


def build_parser(description: str = "Train QKFormer") -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # data
    a("--dataset", choices=DATASETS, default="imagenet")
    a("--data-dir", dest="data_dir", default=None, help="dataset root (see README for layouts)")
    a("--download", action="store_true", help="let torchvision download CIFAR (needs internet)")
    a("--input-size", dest="input_size", type=int, default=224)
    a("--workers", type=int, default=4)
    a("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment string ('' disables)")
    a("--reprob", type=float, default=0.25, help="random erasing probability")
    a("--remode", default="pixel")
    a("--hflip", type=float, default=0.5, help="horizontal flip probability (CIFAR-style data)")
    a("--recount", type=int, default=1)
    # model
    a("--model", default="qkformer_10_384")
    a("--T", type=int, default=4, help="time steps (static images)")
    a("--num-classes", dest="num_classes", type=int, default=None, help="default: from the data")
    a("--embed-dims", dest="embed_dims", type=int, nargs="+", default=None)
    a("--depths", type=int, nargs="+", default=None)
    a("--num-heads", dest="num_heads", type=int, nargs="+", default=None)
    a("--mlp-ratio", dest="mlp_ratio", type=float, default=None)
    a("--attn-types", dest="attn_types", nargs="+", default=None, choices=("qkta", "qkca", "ssa"))
    a("--legacy-ssa", dest="legacy_ssa", action=argparse.BooleanOptionalAction, default=True,
      help="reproduce the original SSA proj_lif batch coupling (docs/original.md §2.5)")
    a("--finetune", default="", help="initialise from a checkpoint (head dropped if mis-shaped)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--fast-path", dest="fast_path", action=argparse.BooleanOptionalAction, default=True,
      help="fused token-major fast path; --no-fast-path runs the layer-by-layer reference path")
    a("--grad-checkpointing", dest="grad_checkpointing", action="store_true",
      help="keep only each block's input (as bytes) and recompute the block in backward: "
           "far less activation memory for one more forward pass")
    # optimisation
    a("--epochs", type=int, default=200)
    a("--cooldown-epochs", dest="cooldown_epochs", type=int, default=0)
    a("--warmup-epochs", dest="warmup_epochs", type=int, default=5)
    a("--batch-size", dest="batch_size", type=int, default=64, help="per process")
    a("--val-batch-size", dest="val_batch_size", type=int, default=None)
    a("--accum-iter", dest="accum_iter", type=int, default=1)
    a("--lr", type=float, default=None, help="absolute lr; default blr * effective batch / 256")
    a("--blr", type=float, default=6e-4)
    a("--min-lr", dest="min_lr", type=float, default=1e-6)
    a("--warmup-lr", dest="warmup_lr", type=float, default=0.0)
    a("--sched-on", dest="sched_on", choices=("step", "epoch"), default="step",
      help="per-iteration (ImageNet/MAE) or per-epoch (timm CIFAR/DVS) cosine schedule")
    a("--weight-decay", dest="weight_decay", type=float, default=0.05)
    a("--layer-decay", dest="layer_decay", type=float, default=None)
    a("--opt", default="adamw")
    a("--clip-grad", dest="clip_grad", type=float, default=None)
    a("--smoothing", type=float, default=0.1)
    a("--mixup", type=float, default=0.0)
    a("--cutmix", type=float, default=0.0)
    a("--mixup-prob", dest="mixup_prob", type=float, default=1.0)
    a("--mixup-switch-prob", dest="mixup_switch_prob", type=float, default=0.5)
    a("--mixup-off-epoch", dest="mixup_off_epoch", type=int, default=None)
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="force mixed precision on/off (fp16 on CUDA, bf16 on CPU); default auto: on for CUDA, "
           "on CPU only where bf16 is native")
    a("--amp-eval", dest="amp_eval", action=argparse.BooleanOptionalAction, default=None,
      help="mixed precision in evaluation (default: same as --amp)")
    # run
    a("--seed", type=int, default=0)
    a("--device", default="auto")
    a("--output-dir", dest="output_dir", default="output/run")
    a("--resume", default="", help="checkpoint to resume from, or 'auto': the output folder's "
                                   "newest complete checkpoint (epoch or step)")
    a("--overwrite", action="store_true",
      help="start over in an output folder that holds an earlier run's checkpoints (deletes them)")
    a("--save-every", dest="save_every", type=int, default=0,
      help="write a step checkpoint every N optimizer updates (0: off)")
    a("--save-every-min", dest="save_every_min", type=float, default=30.0,
      help="write a step checkpoint when this many minutes passed since the last one (0: off)")
    a("--keep-last", dest="keep_last", type=int, default=2, help="step checkpoints to keep")
    a("--preempt-signals", dest="preempt_signals", nargs="+", default=["SIGTERM", "SIGUSR1"],
      help="signals that stop the run after the current update with a step checkpoint and exit "
           f"status {EXIT_PREEMPTED} ('none': no handler)")
    a("--eval-only", dest="eval_only", action="store_true")
    a("--max-iters", dest="max_iters", type=int, default=None,
      help="cap iterations per epoch (quick runs and tests)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _at_least_1(v) -> bool:
    return v >= 1


# (option, test, requirement) of every number a user can get wrong; checked up front so that a
# mistake is named instead of surfacing later as an assertion deep inside timm or a DataLoader.
_CHECKS = (
    ("epochs", _at_least_1, "at least 1"),
    ("cooldown_epochs", lambda v: v >= 0, "0 or more"),
    ("warmup_epochs", lambda v: v >= 0, "0 or more"),
    ("batch_size", _at_least_1, "at least 1"),
    ("val_batch_size", _at_least_1, "at least 1"),
    ("accum_iter", _at_least_1, "at least 1"),
    ("T", _at_least_1, "at least 1"),
    ("input_size", _at_least_1, "at least 1"),
    ("num_classes", _at_least_1, "at least 1"),
    ("workers", lambda v: v >= 0, "0 or more"),
    ("max_iters", _at_least_1, "at least 1"),
    ("mixup_off_epoch", lambda v: v >= 0, "0 or more"),
    ("recount", _at_least_1, "at least 1"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "positive and finite"),
    ("blr", lambda v: math.isfinite(v) and v > 0, "positive and finite"),
    ("min_lr", lambda v: math.isfinite(v) and v >= 0, "0 or more and finite"),
    ("warmup_lr", lambda v: math.isfinite(v) and v >= 0, "0 or more and finite"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "0 or more and finite"),
    ("save_every", lambda v: v >= 0, "0 or more"),
    ("save_every_min", lambda v: math.isfinite(v) and v >= 0, "0 or more minutes"),
    ("keep_last", _at_least_1, "at least 1"),
    ("layer_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("clip_grad", lambda v: math.isfinite(v) and v > 0, "positive and finite"),
    ("smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("mixup", lambda v: v >= 0, "0 or more"),
    ("cutmix", lambda v: v >= 0, "0 or more"),
    ("mixup_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("mixup_switch_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("reprob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("hflip", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("embed_dims", _at_least_1, "at least 1"),
    ("depths", lambda v: v >= 0, "0 or more"),
    ("num_heads", _at_least_1, "at least 1"),
    ("mlp_ratio", lambda v: math.isfinite(v) and v > 0, "positive and finite"),
)

# More workers than this per process cannot help and exhausts processes and shared memory.
MAX_WORKERS = 64


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_args(args) -> None:
    """Reject an unknown model, nonsensical numbers and an input size the model cannot take,
    before any data is read (:class:`ConfigError`, a one-line message on the command line)."""
    from .variants import VARIANTS

    name = str(args.model).lower()  # the authors' names are capitalised (QKFormer_10_384)
    if name not in VARIANTS:
        raise ConfigError(f"unknown --model {args.model!r}; the qkformer models are "
                          f"{', '.join(VARIANTS)}")
    args.model = name
    for dest, ok, want in _CHECKS:
        value = getattr(args, dest, None)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and not ok(v):
                raise ConfigError(f"{_flag(dest)} {v} is invalid: it must be {want}")
    if args.workers > MAX_WORKERS:
        raise ConfigError(f"--workers {args.workers} is invalid: at most {MAX_WORKERS} loader "
                          f"processes per training process (this machine has "
                          f"{os.cpu_count()} CPUs)")
    for name in args.preempt_signals:
        if name.lower() != "none" and not isinstance(getattr(signal, name.upper(), None),
                                                     signal.Signals):
            raise ConfigError(f"--preempt-signals: {name} is not a signal name here "
                              f"(e.g. SIGTERM SIGUSR1, or none)")
    # The step schedule runs warmup first, then a cosine over the remaining epochs.
    if args.sched_on == "step" and args.warmup_epochs >= args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} must be smaller than --epochs "
                          f"{args.epochs}")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} is longer than the run "
                          f"(--epochs {args.epochs})")
    check_data_dir(args.data_dir)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    for flag, path in (("--resume", args.resume), ("--finetune", args.finetune)):
        if path and path != "auto" and Path(path).is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give a checkpoint file "
                              f"(e.g. {Path(path) / 'checkpoint-last.pth'})")
    # A shape-only model on the meta device: architecture arguments and --input-size are checked
    # by the model itself, at no cost, before the data are loaded.
    try:
        with torch.device("meta"):
            model = build_model(args, args.num_classes or 2)
    except ValueError as e:
        raise ConfigError(f"cannot build {args.model} with these architecture options: {e}") from e
    check_input_size(model, args.input_size)


def build_datasets(args):
    from .data import images

    if args.data_dir is None:
        raise ConfigError(f"--data-dir is required for dataset {args.dataset}")
    if args.dataset == "imagenet":
        train = images.build_image_folder(args.data_dir, "train", images.imagenet_transforms(
            args.input_size, True, args.aa or None, args.reprob, args.remode, args.recount))
        val = images.build_image_folder(args.data_dir, "val",
                                        images.imagenet_transforms(args.input_size, False),
                                        classes=train.classes)
    elif args.dataset in ("cifar10", "cifar100"):
        train = images.build_cifar(args.dataset, args.data_dir, "train", images.cifar_transforms(
            args.input_size, True, aa=args.aa or None, reprob=args.reprob, remode=args.remode,
            hflip=args.hflip),
            download=args.download)
        val = images.build_cifar(args.dataset, args.data_dir, "val",
                                 images.cifar_transforms(args.input_size, False),
                                 download=args.download, classes=getattr(train, "classes", None))
    else:
        from .data.dvs import DVSTrainTransform, build_dvs_datasets

        train, val = build_dvs_datasets(args.dataset, args.data_dir, frames=args.T,
                                        train_transform=DVSTrainTransform())
    return train, val


def _loaders(args, train, val, dist):
    """The training loader is a StatefulDataLoader: its ``state_dict()`` is the position in the
    epoch, saved in step checkpoints. The order is DistributedSampler's (a permutation from
    ``--seed`` and the epoch, also for one process), augmentation is seeded per sample
    (:class:`~qkformer.run_state.SeededSamples`): both are functions of the position only."""
    g = torch.Generator()
    train = SeededSamples(train, args.seed)
    sampler = DistributedSampler(train, dist.world_size, dist.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    train_loader = StatefulDataLoader(train, batch_size=args.batch_size, sampler=sampler,
                                      num_workers=args.workers, drop_last=True, generator=g,
                                      pin_memory=dist.device.type == "cuda",
                                      persistent_workers=False)
    val_loader = DataLoader(val, batch_size=args.val_batch_size or args.batch_size,
                            sampler=ShardSampler(len(val), dist.rank, dist.world_size),
                            num_workers=args.workers, pin_memory=dist.device.type == "cuda")
    return train_loader, val_loader, g


def check_readable(dataset, what: str) -> None:
    """Every image file of an image-folder data set can be opened, and one image per class
    decodes, before the first step (an unreadable file would otherwise stop the run mid-epoch)."""
    samples = getattr(dataset, "samples", None)
    if not samples:
        return
    from concurrent.futures import ThreadPoolExecutor

    def unreadable(path):
        try:
            with open(path, "rb") as f:
                return None if f.read(1) else f"{path} is empty"
        except OSError as e:
            return f"{path}: {e.strerror or e}"

    with ThreadPoolExecutor(16) as pool:
        bad = [m for m in pool.map(unreadable, (p for p, _ in samples), chunksize=256) if m]
    if bad:
        raise ValueError(f"{len(bad)} unreadable {what} image file(s), e.g. {bad[0]}")
    first = {}
    for i, (_, target) in enumerate(samples):
        first.setdefault(target, i)
    loader = getattr(dataset, "loader", None)
    for i in first.values():
        if loader is not None:
            loader(samples[i][0])  # raises CorruptImageError naming the file


def _loss_and_mixup(args, num_classes: int):
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, mode="batch",
                      label_smoothing=args.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(args.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def _finetune(model, path):
    ckpt = load_checkpoint(model, read_checkpoint_file(path), strict=False)
    # whatever the layout ("model", "state_dict", a bare or DDP-prefixed state_dict)
    head = extract_state_dict(ckpt).get("head.weight")
    if head is None or head.shape != model.head.weight.shape:
        # no head loaded (absent, or another class count): fresh small init (docs/original.md Q12)
        trunc_normal_(model.head.weight, std=2e-5)


class _Logger:
    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = out / "log.jsonl"
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))

    def __call__(self, record: dict):
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["epoch"])
        self.tb.flush()


def main(argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None,
         description: str = "Train QKFormer") -> dict:
    return run_cli(lambda: _run(parse_with_config(build_parser(description), argv, default_config),
                                from_command_line=argv is None),
                   from_command_line=argv is None)


def _run(args, from_command_line: bool = False) -> dict:
    check_args(args)
    fit_for_command_line(from_command_line)  # after the checks: a bad flag stays one line
    dist = init_distributed(args.device)
    out = Path(args.output_dir)
    lock = None
    if not args.eval_only and is_main():
        # before anything is written: one run per folder, and no silent overwrite of another's
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
    names = [n.upper() for n in args.preempt_signals if n.lower() != "none"]
    preempt = Preemption(tuple(names)) if not args.eval_only else None
    try:
        if lock is not None:
            check_output_dir(out, args.resume, args.overwrite)
            for p in remove_partial_files(out):
                print(f"removed {p.name}: the partial file of an interrupted checkpoint write")
        return _train(args, dist, out, preempt)
    finally:
        if preempt is not None:
            preempt.restore()
        if lock is not None:
            lock.release()


def _pick_resume(args, out: Path):
    """``(checkpoint dict, path)`` to continue from, or ``(None, None)`` for a fresh start.
    ``--resume auto`` takes the newest complete checkpoint; one that cannot be read (truncated,
    foreign) is reported and the previous one is taken; existing but unusable work is an error,
    never a silent restart from scratch."""
    if not args.resume:
        return None, None
    if args.resume != "auto":
        if not Path(args.resume).is_file():
            raise FileNotFoundError(f"--resume checkpoint not found: {args.resume}")
        return check_training_checkpoint(read_checkpoint_file(args.resume), args.resume), \
            Path(args.resume)
    skipped = []
    for path in resume_candidates(out):
        try:
            ckpt = check_training_checkpoint(read_checkpoint_file(path), path)
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
            if is_main():
                print(f"warning: cannot resume from {path}: {e}; trying the previous checkpoint")
            continue
        return ckpt, path
    if skipped:
        raise ValueError(f"--resume auto: no usable checkpoint in {out} ({'; '.join(skipped)}); "
                         f"refusing to start over on top of them (--overwrite does)")
    return None, None


class _Preempted(Exception):
    pass


def _train(args, dist, out: Path, preempt) -> dict:
    allocator = memory.setup_for(dist.device)
    # rank 0's choice on every rank (on a CPU it rests on a timing, which ranks may read apart)
    args.amp, precision = gather_objects(resolve_amp(dist.device, args.amp))[0]
    seed = args.seed + dist.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    train, val = build_datasets(args)
    from .data.images import dataset_num_classes

    num_classes = args.num_classes or dataset_num_classes(train)
    if num_classes != dataset_num_classes(train):
        raise ValueError(f"--num-classes {num_classes} but the training data has "
                         f"{dataset_num_classes(train)} classes")
    args.num_classes = num_classes
    if not args.eval_only:
        check_readable(train, "training")
    check_readable(val, "validation")
    train_loader, val_loader, generator = _loaders(args, train, val, dist)
    model = build_model(args, num_classes).to(dist.device)
    if args.finetune:
        _finetune(model, args.finetune)

    eff_batch = args.batch_size * args.accum_iter * dist.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    n_iters = len(train_loader) if args.max_iters is None else min(len(train_loader), args.max_iters)
    if n_iters == 0:
        raise ValueError(f"training set of {len(train)} images is smaller than one batch of "
                         f"{args.batch_size}")
    updates_per_epoch = -(-n_iters // args.accum_iter)
    optimizer = create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay)
    prefix = args.sched_on == "step"
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, "cosine", num_epochs=args.epochs - (args.warmup_epochs if prefix else 0),
        cooldown_epochs=args.cooldown_epochs, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, warmup_prefix=prefix, step_on_epochs=not prefix,
        updates_per_epoch=updates_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if args.amp and dist.device.type == "cuda" else None
    loss_fn, mixup_fn = _loss_and_mixup(args, num_classes)
    amp_eval = args.amp if args.amp_eval is None else args.amp_eval

    start_epoch, start_iter, sums, best, loader_state = 0, 0, None, 0.0, None
    ckpt, resumed = _pick_resume(args, out)
    if ckpt is not None:
        step = ckpt.get("step") or None
        ranks = (step or {}).get("ranks") or ckpt.get("ranks")
        if step is not None and ranks is not None and len(ranks) != dist.world_size:
            raise ValueError(f"{resumed} is a step checkpoint of {len(ranks)} processes; resume "
                             f"it with {len(ranks)} (or resume from an epoch checkpoint)")
        if step is not None and (ranks is None or step.get("iters", n_iters) != n_iters
                                 or step.get("accum_iter", args.accum_iter) != args.accum_iter):
            # the saved position counts batches of the saved run's size
            raise ValueError(f"{resumed} is a step checkpoint of a run with other batches "
                             f"({step.get('iters')} per epoch, --accum-iter "
                             f"{step.get('accum_iter')}; now {n_iters}, {args.accum_iter}): "
                             f"resume it with the same --batch-size, --max-iters and "
                             f"--accum-iter, or resume from an epoch checkpoint")
        mine = ranks[dist.rank] if ranks is not None and len(ranks) == dist.world_size else None
        restore_training_state(ckpt, model, optimizer, scaler, scheduler,
                               rng=mine["rng"] if mine else None)
        best = ckpt.get("best_acc1", 0.0)
        if step is not None:
            start_epoch, start_iter, sums = ckpt["epoch"], step["batches"], tuple(step["sums"])
            loader_state = mine["loader"] if mine else None
            where = f"epoch {start_epoch}, batch {start_iter} of {n_iters}"
        else:
            start_epoch = ckpt["epoch"] + 1
            where = f"epoch {start_epoch}"
        if is_main():
            print(f"resumed from {resumed} at {where}")

    if is_main():
        print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"T={args.T}, legacy SSA={args.legacy_ssa}")
        print(f"data: {len(train)} train / {len(val)} val images, {num_classes} classes")
        print(f"effective batch {eff_batch} = {args.batch_size} per process x {args.accum_iter} "
              f"accumulation x {dist.world_size} processes; lr {args.lr:.3g}; "
              f"eval batch {args.val_batch_size or args.batch_size}; {num_epochs} epochs")
        print(precision)
        print(describe_backend(dist.device))
        if allocator:
            print(allocator)
        print(fused.describe(model, dist.device))
        if not args.eval_only:
            (out / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True))
    net = torch.compile(model) if args.compile else model
    if dist.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if args.eval_only:
        stats = evaluate(net, val_loader, dist.device, amp_eval, args.progress)
        if is_main():
            print(json.dumps(stats))
        return stats

    log = _Logger(out, is_main())
    last = out / "checkpoint-last.pth"
    stats = {}
    last_save = time.monotonic()
    epoch = start_epoch

    def save_step(done: int, run_sums: tuple) -> Path:
        """A step checkpoint after ``done`` batches of ``epoch``: rank 0 writes every rank's
        RNG and loader position."""
        update = epoch * updates_per_epoch + -(-done // args.accum_iter)
        ranks = gather_objects({"rng": rng_state(), "loader": train_loader.state_dict()})
        path = step_checkpoint_path(out, update)
        save_checkpoint(path, net, optimizer, epoch, args, scaler, scheduler, best_acc1=best,
                        step={"update": update, "batches": done, "sums": list(run_sums),
                              "iters": n_iters, "accum_iter": args.accum_iter, "ranks": ranks})
        if is_main():
            prune_steps(out, args.keep_last)
        return path

    def on_update(done: int, run_sums: tuple) -> None:
        nonlocal last_save
        update = epoch * updates_per_epoch + -(-done // args.accum_iter)
        due = bool(args.save_every) and update % args.save_every == 0
        due = due or (args.save_every_min > 0
                      and time.monotonic() - last_save >= args.save_every_min * 60)
        stop = preempt is not None and preempt.requested is not None
        if dist.distributed:  # every rank saves and stops at the same update (one all-reduce)
            due, stop = (bool(v > 0) for v in all_reduce_sum([float(due), float(stop)],
                                                             dist.device).tolist())
        if (due and done < n_iters) or stop:  # at the epoch's end the epoch checkpoint follows
            path = save_step(done, run_sums)
            last_save = time.monotonic()
            if stop:
                raise _Preempted(f"stopped on {preempt.requested or 'a signal on another rank'} "
                                 f"at epoch {epoch}, batch {done}: step checkpoint {path} "
                                 f"written; continue with --resume auto")

    try:
        for epoch in range(start_epoch, num_epochs):
            generator.manual_seed(args.seed * 100_003 + epoch)  # the loader's base seed
            train_loader.sampler.set_epoch(epoch)
            train_loader.dataset.epoch = epoch  # per-sample augmentation seeds
            if mixup_fn is not None and args.mixup_off_epoch is not None:
                mixup_fn.mixup_enabled = epoch < args.mixup_off_epoch  # targets stay smoothed
            first = start_iter if epoch == start_epoch else 0
            if first and loader_state is not None and first < n_iters:
                train_loader.load_state_dict(loader_state)  # the next iter() continues there
            t0 = time.perf_counter()
            try:
                tr = train_one_epoch(net, train_loader, optimizer, loss_fn, dist.device, epoch,
                                     scheduler=scheduler, scaler=scaler, amp=args.amp,
                                     accum_iter=args.accum_iter, mixup_fn=mixup_fn,
                                     max_iters=n_iters, clip_grad=args.clip_grad,
                                     progress=args.progress, start_iter=first,
                                     sums=sums if first else None, on_update=on_update)
            except NonFiniteLossError as e:
                kept = f"; the last good checkpoint is kept at {last}" if last.exists() else ""
                raise SystemExit(f"error: {e}: stopping{kept}") from None
            scheduler.step(epoch + 1)
            ev = evaluate(net, val_loader, dist.device, amp_eval, args.progress)
            best = max(best, ev["acc1"])
            stats = {"epoch": epoch, **tr, **{f"test_{k}": v for k, v in ev.items()},
                     "best_acc1": best, "epoch_time_s": time.perf_counter() - t0}
            # the checkpoint first: on a full disk it is what must not be lost, and its error
            # names the bytes needed
            save_checkpoint(last, net, optimizer, epoch, args, scaler, scheduler, best_acc1=best)
            log(stats)
            if is_main():
                print(f"epoch {epoch}: loss {tr['train_loss']:.4f} lr {tr['lr']:.3g} | "
                      f"acc1 {ev['acc1']:.2f} acc5 {ev['acc5']:.2f} (best {best:.2f}) "
                      f"{stats['epoch_time_s']:.1f}s")
            last_save = time.monotonic()
            if ev["acc1"] >= best and is_main():
                save_checkpoint(out / "checkpoint-best.pth", net, optimizer, epoch, args, scaler,
                                scheduler, best_acc1=best)
            stop = preempt is not None and preempt.requested is not None
            if any_rank(stop, dist.device) and epoch + 1 < num_epochs:
                raise _Preempted(f"stopped on a signal after epoch {epoch}: {last} written; "
                                 f"continue with --resume auto")
    except _Preempted as e:
        if is_main():
            print(str(e), flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None
    return stats


if __name__ == "__main__":
    main()
