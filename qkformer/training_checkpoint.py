"""Training checkpoints: what a run writes to continue exactly, and how it reads it back.

The released layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` plus ``scheduler``,
``rng`` (python/numpy/torch states) and ``best_acc1``, written atomically, so every tool in the
package reads every checkpoint and ``--resume`` continues exactly.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_save, load_checkpoint, read_checkpoint
from .distributed import is_main

__all__ = ["save_checkpoint", "resume_checkpoint", "read_checkpoint_file", "rng_state",
           "set_rng_state", "check_training_checkpoint", "restore_training_state"]


def rng_state() -> dict:
    """RNG states as tensors and plain Python values, so the checkpoint loads with
    ``weights_only=True`` (no numpy objects in the pickle)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, model, optimizer, epoch: int, args, scaler=None, scheduler=None,
                    **extra) -> None:
    """Rank 0 writes the released layout (plus resume state) atomically; a full disk or a
    read-only folder is a :class:`~qkformer.run_state.CheckpointWriteError` naming the folder and
    the bytes needed, with the previous file left in place."""
    if not is_main():
        return
    from .run_state import write_or_explain

    state = {
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "args": args,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        **extra,
    }
    write_or_explain(lambda: atomic_save(state, path), Path(path), state)
    mask = os.umask(0)  # the temporary file is private: give the result the umask's permissions
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_checkpoint_file(path):
    """:func:`qkformer.checkpoint.read_checkpoint`, with every failure of a file that is not a
    checkpoint at all reported as a ValueError naming it."""
    try:
        return read_checkpoint(path)
    except (ValueError, OSError):
        raise
    except Exception as e:  # the unpickler fails in many ways (KeyError, IndexError, ...) on junk
        raise ValueError(f"{path} is not a checkpoint file ({type(e).__name__}: {e})") from e


def check_training_checkpoint(ckpt, path) -> dict:
    """``ckpt`` if it is a training checkpoint (has 'epoch' and the weights), else a ValueError."""
    if not (isinstance(ckpt, dict) and "epoch" in ckpt and ({"model", "state_dict"} & set(ckpt))):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a training checkpoint (no 'epoch' and 'model' entries; "
                         f"found {found}): --resume continues a run, --finetune starts from "
                         f"weights")
    return ckpt


def restore_training_state(ckpt: dict, model, optimizer=None, scaler=None, scheduler=None,
                           rng: Optional[dict] = None) -> dict:
    """Load what :func:`save_checkpoint` wrote into the objects of a run; ``rng``: this rank's
    RNG states when they differ from rank 0's (``ckpt['rng']``)."""
    load_checkpoint(_unwrap(model), ckpt, strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if rng or ckpt.get("rng"):
        set_rng_state(rng or ckpt["rng"])
    return ckpt


def resume_checkpoint(path, model, optimizer=None, scaler=None, scheduler=None) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns the checkpoint dict."""
    ckpt = check_training_checkpoint(read_checkpoint_file(path), path)
    return restore_training_state(ckpt, model, optimizer, scaler, scheduler)
