"""The model and input checks that every entry point shares (training, evaluation, analysis):
building the network from command-line arguments, and checking the data folder and input size
before any work starts."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .config import ConfigError

__all__ = ["ARCHITECTURE_ARGS", "architecture_args", "build_model", "saved_architecture",
           "check_data_dir", "check_input_size"]

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
        if k in overrides:
            overrides[k] = tuple(overrides[k]) if len(overrides[k]) > 1 else overrides[k][0]
    model = timm.create_model(args.model, T=args.T, num_classes=num_classes,
                              img_size=args.input_size, legacy_ssa=args.legacy_ssa,
                              fast_path=getattr(args, "fast_path", True), **overrides)
    model.set_grad_checkpointing(getattr(args, "grad_checkpointing", False))
    return model


def saved_architecture(ckpt: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """``(timm name, timm.create_model keyword arguments)`` of the network a checkpoint was
    trained as, from the arguments this package's training stores in it (``T``, input size,
    widths, depths, heads, attention types, SSA form; the class count from the head). ``(None,
    {})`` for a file that records none (a released or foreign checkpoint)."""
    from . import variants
    from .checkpoint import extract_state_dict

    saved = ckpt.get("args") if isinstance(ckpt, dict) else None
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})
    name = saved.get("model")
    if not isinstance(name, str) or name.lower() not in variants.VARIANTS:
        return None, {}
    kwargs: Dict[str, Any] = {}
    if saved.get("T") or saved.get("time_step"):
        kwargs["T"] = int(saved.get("T") or saved.get("time_step"))
    if saved.get("input_size"):
        kwargs["img_size"] = int(saved["input_size"])
    if saved.get("legacy_ssa") is not None:
        kwargs["legacy_ssa"] = bool(saved["legacy_ssa"])
    for k in ARCHITECTURE_ARGS:
        v = saved.get(k)
        if v is not None:
            kwargs[k] = (tuple(v) if len(v) > 1 else v[0]) if isinstance(v, (list, tuple)) else v
    try:
        head = extract_state_dict(ckpt).get("head.bias")
    except ValueError:
        head = None
    if head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    return name.lower(), kwargs


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
