"""Evaluate a checkpoint on an ImageFolder ``val`` split (behind ``imagenet/test.py``).

    python imagenet/test.py --checkpoint checkpoint-191.pth --model qkformer_10_768 \
        --data-dir /data/imagenet --batch-size 24     # or: python -m qkformer.evaluate ...
    torchrun --nproc_per_node=8 imagenet/test.py ...   # exact: every image counted once

Reads released checkpoints (MAE layout with ``args``), this package's own (``.pth`` or
``.safetensors``) and Hub folders (``local-dir:FOLDER``, the folder's path, ``hf-hub:ORG/NAME``);
the model is the one the file or folder describes (``--model``, ``--T``, ``--input-size`` change
it, with a warning line each), else the variant its weights fit. Only ``<data-dir>/val`` is needed. With the legacy SSA (default, as the
released numbers were measured) predictions depend on the eval batch, which is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import DataLoader

from . import fused, variants  # noqa: F401  (variants: timm registration)
from .checkpoint import (extract_state_dict, is_hub_source, load_checkpoint, match_variant,
                         read_source, saved_architecture)
from .config import ConfigError, run_cli
from .cpu import memory
from .distributed import ShardSampler, gather_objects, init_distributed, is_main
from .engine import evaluate
from .training_checkpoint import read_checkpoint_file
from .threads import fit_for_command_line
from .precision import resolve_amp
from .neuron import describe_backend
from .builder import (ARCHITECTURE_ARGS, architecture_args, build_model, check_data_dir,
                      check_input_size)

__all__ = ["build_parser", "main"]


def default_workers(cap: int = 4) -> int:
    """Loader workers: ``cap``, or fewer where fewer cores are available to this process (more
    workers than cores makes the DataLoader warn, once per loader, and cannot help)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, min(cap, cores))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a QKFormer checkpoint",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--checkpoint", required=True,
      help=".pth/.pth.tar/.safetensors, or a Hub folder: local-dir:FOLDER (or the folder's "
           "path), hf-hub:ORG/NAME")
    a("--data-dir", dest="data_dir", required=True, help="folder holding val/<class>/*")
    a("--model", default=None, help="variant; default: the one the checkpoint holds")
    a("--T", type=int, default=None, help="time steps (default: checkpoint's, else 4)")
    a("--input-size", dest="input_size", type=int, default=None)
    a("--batch-size", dest="batch_size", type=int, default=32)
    a("--transform", choices=("auto", "imagenet", "cifar"), default="auto",
      help="eval preprocessing; auto: CIFAR-style for checkpoints trained on CIFAR data")
    ssa = p.add_mutually_exclusive_group()
    ssa.add_argument("--legacy-ssa", dest="legacy_ssa", action="store_true", default=None,
                     help="original batch-coupled SSA proj_lif (matches released accuracies; "
                          "default: the checkpoint's form, else this)")
    ssa.add_argument("--fixed-ssa", dest="legacy_ssa", action="store_false",
                     help="per-sample SSA proj_lif (batch-independent predictions)")
    a("--fast-path", dest="fast_path", action=argparse.BooleanOptionalAction, default=True,
      help="fused token-major fast path; --no-fast-path runs the reference path")
    a("--amp", action=argparse.BooleanOptionalAction, default=None,
      help="force mixed precision on/off; default auto: fp16 on CUDA, bf16 on CPUs with native "
           "bf16, else fp32")
    a("--device", default="auto")
    a("--workers", type=int, default=default_workers(),
      help="data loader processes (at most 4, and at most the cores available)")
    a("--max-iters", dest="max_iters", type=int, default=None)
    a("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _warn(text: str) -> None:
    if is_main():
        print(f"warning: {text}", file=sys.stderr)


def _model_from_checkpoint(args, ckpt, num_classes: int):
    """The network the checkpoint holds (:func:`~qkformer.checkpoint.saved_architecture`), the
    flags changing what it says (one warning line per contradiction); for a file that names
    none, the variant its weights fit."""
    name, saved = saved_architecture(ckpt)
    if name not in variants.VARIANTS:
        name, saved = None, {}
    if args.model and name and args.model != name:
        _warn(f"--model {args.model} but the checkpoint was trained as {name}")
    model = args.model or name
    if model is None:
        fit = match_variant(extract_state_dict(ckpt))
        if fit is None:
            raise ValueError("cannot tell which variant the checkpoint is for; pass --model")
        model = fit.split(" ")[0]
    for flag, value, key in (("--T", args.T, "T"), ("--input-size", args.input_size, "img_size")):
        if value is not None and saved.get(key, value) != value:
            _warn(f"{flag} {value} but the checkpoint was trained with {key}={saved[key]}")
    margs = architecture_args(**{k: saved[k] for k in ARCHITECTURE_ARGS if k in saved})
    margs.model = model
    margs.T = args.T or saved.get("T") or 4
    margs.input_size = args.input_size or saved.get("img_size") or variants.VARIANTS[model]["img_size"]
    margs.legacy_ssa = saved.get("legacy_ssa", True) if args.legacy_ssa is None else args.legacy_ssa
    margs.fast_path, margs.grad_checkpointing = args.fast_path, False
    return build_model(margs, num_classes), margs


def is_source_folder(source: str) -> bool:
    """A Hub folder (``local-dir:``, ``hf-hub:`` or a folder's path), not a checkpoint file."""
    return is_hub_source(source) or Path(source).is_dir()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run(args, from_command_line=argv is None),
                   from_command_line=argv is None)


def _check_args(args) -> None:
    if args.model is not None:
        if args.model.lower() not in variants.VARIANTS:
            raise ConfigError(f"unknown --model {args.model!r}; the qkformer models are "
                              f"{', '.join(variants.VARIANTS)}")
        args.model = args.model.lower()
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--T", args.T, 1),
                               ("--input-size", args.input_size, 1), ("--workers", args.workers, 0),
                               ("--max-iters", args.max_iters, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value} is invalid: it must be "
                              f"{'at least 1' if least else '0 or more'}")
    check_data_dir(args.data_dir)
    if Path(args.checkpoint).is_dir() and not (Path(args.checkpoint) / "config.json").is_file():
        raise ConfigError(f"--checkpoint {args.checkpoint} is a folder without config.json; give "
                          f"a checkpoint file (e.g. {Path(args.checkpoint) / 'checkpoint-best.pth'}) "
                          f"or a folder export-hub wrote")


def _run(args, from_command_line: bool = False) -> dict:
    from .data.images import build_image_folder, cifar_transforms, imagenet_transforms

    _check_args(args)
    fit_for_command_line(from_command_line)  # after the checks: a bad flag stays one line
    dist = init_distributed(args.device)
    allocator = memory.setup_for(dist.device)
    ckpt = read_source(args.checkpoint) if is_source_folder(args.checkpoint) else \
        read_checkpoint_file(args.checkpoint)
    head = extract_state_dict(ckpt).get("head.bias")
    num_classes = int(head.shape[0]) if head is not None else 1000
    model, margs = _model_from_checkpoint(args, ckpt, num_classes)
    size = margs.input_size
    check_input_size(model, size)
    load_checkpoint(model, ckpt, strict=True)
    style = args.transform
    if style == "auto":  # the training data's, else the family's (a Hub folder names no data)
        saved = ckpt.get("args") if isinstance(ckpt, dict) else None
        dataset = getattr(saved, "dataset", None) or model.layout.name
        style = "cifar" if str(dataset).startswith("cifar") else "imagenet"
    tf = cifar_transforms(size, False) if style == "cifar" else imagenet_transforms(size, False)
    val = build_image_folder(args.data_dir, "val", tf)
    if len(val.classes) != num_classes:
        raise ValueError(f"{args.data_dir}/val has {len(val.classes)} classes but the checkpoint's "
                         f"head has {num_classes} outputs")
    loader = DataLoader(val, batch_size=args.batch_size, num_workers=args.workers,
                        sampler=ShardSampler(len(val), dist.rank, dist.world_size),
                        pin_memory=dist.device.type == "cuda")
    model.to(dist.device)
    if is_main():
        print(f"model {margs.model} (T={margs.T}, input {size}, {style} preprocessing, "
              f"{'legacy' if margs.legacy_ssa else 'fixed'} SSA); eval batch size "
              f"{args.batch_size} per process x {dist.world_size}")
    amp, precision = gather_objects(resolve_amp(dist.device, args.amp, training=False))[0]
    if is_main():
        print(precision)
        print(describe_backend(dist.device))
        if allocator:
            print(allocator)
        print(fused.describe(model, dist.device))
    stats = evaluate(model, loader, dist.device, amp, args.progress, args.max_iters)
    if is_main():
        print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
              f"on {stats['images']} images ({stats['images_per_s']:.1f} images/s per process)")
        print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
