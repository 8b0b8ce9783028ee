"""Shared plumbing of the analysis tools: model building, input batches, CLI arguments, output files."""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["build_model", "iter_inputs", "synthetic_batches", "image_folder_loader", "eval_transform",
           "layer_stage", "add_model_args", "add_data_args", "model_from_args", "batches_from_args",
           "max_batches", "reference_path",
           "write_json", "write_csv", "is_event_model", "add_out_arg", "output_folder",
           "data_label", "run_title"]

_STAGE_RE = re.compile(r"^(?:patch_embed|stage)(\d+)\b")


def layer_stage(name: str) -> int:
    """Stage index of a module name: ``patch_embed2.*`` and ``stage2.*`` are stage 2; else 0
    (the head, or modules of a model that is not a QKFormer)."""
    m = _STAGE_RE.match(name)
    return int(m.group(1)) if m else 0


def reference_path(model: nn.Module):
    """The analysis hooks watch modules one by one: run QKFormer layer by layer while they do
    (a model without a fast path runs as it is)."""
    import contextlib

    return model.reference_path() if hasattr(model, "reference_path") else contextlib.nullcontext()


def is_event_model(model: nn.Module) -> bool:
    layout = getattr(model, "layout", None)
    return bool(getattr(layout, "events", False))


def build_model(name: Optional[str], checkpoint: Optional[str] = None,
                model_kwargs: Optional[Mapping] = None, device="cpu") -> nn.Module:
    """``timm.create_model(name, **model_kwargs)``, weights from ``checkpoint`` (strict), eval mode.

    ``checkpoint`` is a checkpoint file or a Hub folder (``local-dir:FOLDER``, the folder's path,
    ``hf-hub:ORG/NAME``); a ``name`` with one of those prefixes is taken as the checkpoint. A
    checkpoint written by this package's training (or a Hub folder) records the network it holds
    (its name, T, input size, widths, ...): that description is the default, so ``name`` may be
    None and ``model_kwargs`` only changes what it says (one warning line per contradiction)."""
    import warnings

    import timm

    import qkformer  # noqa: F401  (registers the variants with timm)
    from qkformer.checkpoint import is_hub_source, load_checkpoint, read_source, saved_architecture

    if is_hub_source(name):
        if checkpoint:
            raise ValueError(f"--model {name} is a source of weights, and so is --checkpoint "
                             f"{checkpoint}: give one")
        name, checkpoint = None, name
    ckpt = read_source(checkpoint) if checkpoint else None
    saved_name, saved = saved_architecture(ckpt) if ckpt is not None else (None, {})
    kwargs = dict(model_kwargs or {})
    if name is None and saved_name is None:
        raise ValueError("--model is needed: the checkpoint does not say which network it holds"
                         if checkpoint else "--model is needed (or a --checkpoint that names it)")
    if name is not None and saved_name is not None and name != saved_name:
        warnings.warn(f"--model {name} but the checkpoint was trained as {saved_name}",
                      stacklevel=2)
    name = name or saved_name
    for k, v in kwargs.items():
        if k in saved and saved[k] != v:
            warnings.warn(f"--model-kwargs {k}={v!r} but the checkpoint was trained with "
                          f"{k}={saved[k]!r}", stacklevel=2)
    if not timm.is_model(name):
        raise ValueError(f"unknown --model {name!r}; the qkformer models are "
                         f"{', '.join(qkformer.VARIANTS)}")
    model = timm.create_model(name, **{**saved, **kwargs})
    if ckpt is not None:
        load_checkpoint(model, ckpt, strict=True)
    return model.to(device).eval()


def iter_inputs(batches: Iterable, max_batches: Optional[int] = None) -> Iterator:
    """Inputs (and targets, or None) from a DataLoader of ``(x, y)`` or an iterable of tensors."""
    for i, item in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def synthetic_batches(model: nn.Module, batches: int = 2, batch_size: int = 4, seed: int = 0,
                      img_size: Optional[int] = None) -> List[torch.Tensor]:
    """Random inputs of the model's kind: normalised-looking images ``[B, C, S, S]``, or Poisson
    event counts ``[B, T, C, S, S]`` for event models (T = ``model.T``)."""
    g = torch.Generator().manual_seed(seed)
    size = img_size or getattr(model, "img_size", 32)
    chans = getattr(model, "in_chans", 3)
    if is_event_model(model):
        shape = (batch_size, model.T, chans, size, size)
        return [torch.poisson(torch.full(shape, 0.3), generator=g) for _ in range(batches)]
    return [torch.randn(batch_size, chans, size, size, generator=g) for _ in range(batches)]


def eval_transform(model: nn.Module):
    """The family's evaluation transform at the model's training resolution."""
    from qkformer.data.images import cifar_transforms, imagenet_transforms

    family = getattr(getattr(model, "layout", None), "name", "imagenet")
    size = getattr(model, "img_size", 224)
    return cifar_transforms(size) if family == "cifar" else imagenet_transforms(size)


def image_folder_loader(model: nn.Module, data_dir, split: str = "val", batch_size: int = 32,
                        workers: int = 0):
    """DataLoader over ``data_dir/split`` (ImageFolder) with the model's eval transform."""
    if is_event_model(model):
        raise ValueError("--data-dir reads an ImageFolder of static images; event (DVS) models need "
                         "--synthetic or the Python API with an event DataLoader")
    from qkformer.data.images import build_image_folder

    ds = build_image_folder(data_dir, split, eval_transform(model))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)


# -- CLI -----------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="timm name, e.g. qkformer_cifar10 (default: what --checkpoint was trained "
                        "as), or a Hub folder: local-dir:FOLDER, hf-hub:ORG/NAME")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON overrides for timm.create_model, e.g. \'{"T": 2, "embed_dims": 64}\' '
                        "(default: what --checkpoint was trained with)")
    p.add_argument("--checkpoint", default=None,
                   help="weights: .pth/.pth.tar/.safetensors, or a Hub folder (local-dir:FOLDER, "
                        "the folder's path, hf-hub:ORG/NAME)")
    p.add_argument("--device", default="cpu")


def add_data_args(p: argparse.ArgumentParser, batches: Optional[int] = 10) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", help="ImageFolder root; its --split folder is read")
    src.add_argument("--synthetic", action="store_true", help="random inputs (no data needed)")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=None,
                   help=f"number of batches to use (default: {batches or 'all'}; 2 with --synthetic)")
    p.set_defaults(default_batches=batches)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)


def max_batches(args) -> Optional[int]:
    """--batches, else 2 for synthetic input, else the tool's default (None = all)."""
    if args.batches is not None:
        return args.batches
    return 2 if args.synthetic else args.default_batches


def data_label(args) -> str:
    """What the tool's batches come from, for plot titles: the folder and split, or synthetic."""
    if getattr(args, "synthetic", False) or not getattr(args, "data_dir", None):
        return "synthetic input"
    return f"{args.data_dir} ({args.split})"


def run_title(model: str, data: Optional[str] = None, T=None, **more) -> str:
    """A plot title naming what was measured: ``model, data, T=..., key=value ...`` (the parts
    that are None are left out)."""
    parts = [model] + ([data] if data else []) + ([f"T={T}"] if T is not None else [])
    parts += [f"{k}={v}" for k, v in more.items() if v is not None]
    return ", ".join(parts)


def model_from_args(args) -> nn.Module:
    from qkformer.checkpoint import is_hub_source

    model = build_model(args.model, args.checkpoint, args.model_kwargs, args.device)
    if not args.model or is_hub_source(args.model):  # titles name the network
        args.model = model.pretrained_cfg.get("architecture", type(model).__name__)
    return model


def batches_from_args(args, model: nn.Module):
    if args.synthetic:
        return synthetic_batches(model, max_batches(args), args.batch_size)
    return image_folder_loader(model, args.data_dir, args.split, args.batch_size, args.workers)


# -- output files --------------------------------------------------------------------------------
def add_out_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--out", default=default,
                   help="output folder (created if missing); the files written are printed")


def output_folder(path) -> Path:
    """The ``--out`` folder, created if missing; checked before any work is done."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def write_csv(path, rows: Sequence[Mapping], fields: Optional[Sequence[str]] = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(fields or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG (creating the folder) and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
