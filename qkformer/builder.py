"""The model and input checks that every entry point shares (training, evaluation, analysis):
building the network from command-line arguments, and checking the data folder and input size
before any work starts."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .config import ConfigError

__all__ = ["ARCHITECTURE_ARGS", "architecture_args", "build_model", "check_data_dir",
           "check_input_size"]

# The command-line arguments that shape the network (besides --model, --T, --input-size and
# --legacy-ssa), with their defaults: None keeps the variant's own value.
ARCHITECTURE_ARGS = {"embed_dims": None, "depths": None, "num_heads": None, "mlp_ratio": None,
                     "attn_types": None}


def architecture_args(**values) -> argparse.Namespace:
    """A namespace with every argument :func:`build_model` reads, defaults filled in."""
    args = dict(ARCHITECTURE_ARGS, model=None, T=4, input_size=None, legacy_ssa=True,
                fast_path=True, grad_checkpointing=False)
    args.update(values)
    return argparse.Namespace(**args)


def build_model(args, num_classes: int):
    """The timm model the arguments describe (per-stage lists of one value mean all stages)."""
    import timm

    overrides = {k: getattr(args, k) for k in ARCHITECTURE_ARGS if getattr(args, k, None) is not None}
    for k in ("embed_dims", "depths", "num_heads", "attn_types"):
        if isinstance(overrides.get(k), list):  # the command line's; a checkpoint's are timm's
            overrides[k] = tuple(overrides[k]) if len(overrides[k]) > 1 else overrides[k][0]
    model = timm.create_model(args.model, T=args.T, num_classes=num_classes,
                              img_size=args.input_size, legacy_ssa=args.legacy_ssa,
                              fast_path=getattr(args, "fast_path", True), **overrides)
    model.set_grad_checkpointing(getattr(args, "grad_checkpointing", False))
    return model


def check_data_dir(data_dir) -> None:
    if data_dir is not None and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file; it must be the dataset's folder "
                          f"(see the README for the layouts)")


def check_input_size(model, size: int) -> None:
    """``--input-size`` against the model's own input check, on a shape-only (meta) tensor."""
    c = model.in_chans
    shape = (1, 1, c, size, size) if model.layout.events else (1, c, size, size)
    try:
        model.encode(torch.empty(shape, device="meta"))
    except ValueError as e:
        raise ConfigError(f"--input-size {size}: {e}") from e
