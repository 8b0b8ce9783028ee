"""Training and evaluation loops shared by every entry point, and checkpoint save/resume.

Checkpoints use the released layout ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}`` plus
``scheduler``, ``rng`` (python/numpy/torch states) and ``best_acc1``, written atomically, so
every tool in the package reads every checkpoint and ``--resume`` continues exactly.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import atomic_save, load_checkpoint, read_checkpoint
from .distributed import all_reduce_sum, is_main
from .precision import autocast_for, cpu_bf16_native, resolve_amp  # noqa: F401  (re-exported)

__all__ = ["NonFiniteLossError", "NonFiniteWeightsError", "train_one_epoch", "evaluate", "save_checkpoint", "resume_checkpoint",
           "read_checkpoint_file", "rng_state", "set_rng_state", "check_training_checkpoint",
           "restore_training_state"]


class NonFiniteLossError(RuntimeError):
    """A loss (training or evaluation) that is NaN or infinite."""


class NonFiniteWeightsError(ValueError):
    """Weights or buffers that are NaN or infinite (a diverged run's checkpoint)."""


def _non_finite(model: nn.Module) -> str:
    """'' if every floating-point weight and buffer is finite, else what is not."""
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in _unwrap(model).state_dict().items()
           if t.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if not bad:
        return ""
    first = next(iter(bad))
    return (f"{sum(bad.values()):,} of the model's weights are not finite (NaN or inf), in "
            f"{len(bad)} tensor(s), first {first}")


def _fault(kind: str, step: int) -> bool:
    """Fault injection for the tests (``QKFORMER_FAULT=kill@7``, ``nan@3`` or ``slow@1``, which
    creates the file ``QKFORMER_FAULT_MARK`` and waits, a minute at most, until it is deleted):
    real failures at a chosen global step (epoch x batches per epoch + batch), on every rank or
    on one (``kill@7:rank1``), so recovery paths are exercised end to end."""
    spec = os.environ.get("QKFORMER_FAULT", "")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False  # a fault strikes the first attempt of an elastic job, not its restarts
    rank = os.environ.get("RANK", "0")
    return any(f in (f"{kind}@{step}", f"{kind}@{step}:rank{rank}") for f in spec.split(","))


def _progress(iterable, total: int, desc: str, enabled: bool):
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False,
                disable=not (enabled and is_main() and sys.stderr.isatty()))


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    device: torch.device, epoch: int, *, scheduler=None, scaler=None,
                    amp: bool = False, accum_iter: int = 1, mixup_fn=None,
                    max_iters: Optional[int] = None, clip_grad: Optional[float] = None,
                    progress: bool = True, start_iter: int = 0,
                    sums: Optional[tuple] = None,
                    on_update: Optional[Callable[[int, tuple], None]] = None) -> Dict[str, float]:
    """One epoch. The lr is set per optimizer update (``scheduler.step_update``) for per-iteration
    schedules; per-epoch schedules are stepped by the caller. With DDP, gradient all-reduce is
    skipped (``no_sync``) on accumulation steps that do not update.

    A resumed epoch starts at batch ``start_iter`` (an update boundary; ``loader`` already
    positioned there) with the running loss ``sums`` of the batches before it.
    ``on_update(batches_done, sums)`` is called after every optimizer update (step checkpoints,
    preemption)."""
    model.train()
    n_iters = len(loader) if max_iters is None else min(len(loader), max_iters)
    updates_per_epoch = math.ceil(n_iters / accum_iter)
    loss_sum, n_seen = torch.zeros((), dtype=torch.float64), 0
    if sums is not None:
        loss_sum, n_seen = torch.tensor(sums[0], dtype=torch.float64), int(sums[1])
    bar = _progress(loader, n_iters - start_iter, f"epoch {epoch}", progress)
    optimizer.zero_grad(set_to_none=True)
    for it, (images, targets) in enumerate(bar if start_iter < n_iters else (), start=start_iter):
        if it >= n_iters:
            break
        step = epoch * n_iters + it
        if _fault("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if _fault("slow", step):  # a long step, for whatever a test does to the running process
            mark = os.environ.get("QKFORMER_FAULT_MARK")
            if mark:
                open(mark, "w").close()
            end = time.monotonic() + 60
            while time.monotonic() < end and (not mark or os.path.exists(mark)):
                time.sleep(0.05)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        update = (it + 1) % accum_iter == 0 or it + 1 == n_iters
        sync = model.no_sync() if (hasattr(model, "no_sync") and not update) else nullcontext()
        with sync:
            with autocast_for(device, amp):
                loss = loss_fn(model(images), targets)
            if _fault("nan", step):
                loss = loss * float("nan")
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at epoch {epoch}, iteration {it}")
            scaled = loss / accum_iter
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step_update(num_updates=epoch * updates_per_epoch + (it // accum_iter) + 1)
        loss_sum += loss_value * images.shape[0]
        n_seen += images.shape[0]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if update and on_update is not None:
            on_update(it + 1, (loss_sum.item(), n_seen))
    total = all_reduce_sum([loss_sum.item(), n_seen], device)
    return {"train_loss": (total[0] / max(total[1], 1)).item(),
            "lr": optimizer.param_groups[0]["lr"], "train_images": int(total[1])}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False,
             progress: bool = True, max_iters: Optional[int] = None) -> Dict[str, float]:
    """Top-1/top-5 accuracy and mean cross-entropy, summed exactly over ranks (each rank sees a
    disjoint shard, see :class:`~qkformer.distributed.ShardSampler`)."""
    # A spiking network maps NaN inputs of its neurons to "no spike": non-finite weights can
    # give finite logits and a plausible accuracy, so they are checked, not only the loss.
    bad = _non_finite(model)
    if bad:
        raise NonFiniteWeightsError(f"cannot evaluate: {bad}")
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    n = 0
    start = time.perf_counter()
    total = len(loader) if max_iters is None else min(len(loader), max_iters)
    for it, (images, targets) in enumerate(_progress(loader, total, "eval", progress)):
        if it >= total:
            break
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += targets.shape[0]
    elapsed = time.perf_counter() - start
    c1, c5, ls, count = all_reduce_sum([correct1, correct5, loss_sum, n], device).tolist()
    count = max(count, 1)
    if not math.isfinite(ls):  # an accuracy of such a model means nothing
        raise NonFiniteLossError(f"evaluation loss is {ls}: the model's outputs are not finite")
    return {"acc1": 100.0 * c1 / count, "acc5": 100.0 * c5 / count, "loss": ls / count,
            "images": int(count), "images_per_s": n / max(elapsed, 1e-9)}


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
    from pathlib import Path

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
