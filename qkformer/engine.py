"""The training and evaluation loops shared by every entry point (checkpoints:
:mod:`qkformer.training_checkpoint`; precision: :mod:`qkformer.precision`)."""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm import tqdm

from .distributed import all_reduce_sum, is_main
from .precision import autocast_for

__all__ = ["NonFiniteLossError", "NonFiniteWeightsError", "train_one_epoch", "evaluate"]


class NonFiniteLossError(RuntimeError):
    """A loss (training or evaluation) that is NaN or infinite."""


class NonFiniteWeightsError(ValueError):
    """Weights or buffers that are NaN or infinite (a diverged run's checkpoint)."""


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "_orig_mod", model)


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


# Without a terminal (a cluster log, a pipe) a line every this many seconds replaces the bar.
PROGRESS_INTERVAL_S = float(os.environ.get("QKFORMER_PROGRESS_INTERVAL", "30"))


class _LogProgress:
    """The progress bar's stand-in in a log: every ``PROGRESS_INTERVAL_S`` seconds one line with
    the batches done, images/s and the time left of the loop."""

    def __init__(self, iterable, total: int, desc: str):
        self.iterable, self.total, self.desc, self.postfix = iterable, total, desc, {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def __iter__(self):
        start = last = time.monotonic()
        images = 0
        for done, item in enumerate(self.iterable, start=1):
            yield item
            first = item[0] if isinstance(item, (tuple, list)) else item
            images += int(getattr(first, "shape", (1,))[0])
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S and done < self.total:
                last, rate = now, done / max(now - start, 1e-9)
                extra = "; " + ", ".join(f"{k} {v}" for k, v in self.postfix.items()) \
                    if self.postfix else ""
                print(f"{self.desc}: {done}/{self.total} batches, "
                      f"{images / max(now - start, 1e-9):.1f} images/s, "
                      f"{_duration((self.total - done) / rate)} left{extra}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _progress(iterable, total: int, desc: str, enabled: bool):
    if enabled and is_main() and not sys.stderr.isatty():
        return _LogProgress(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False,
                disable=not (enabled and is_main()))


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
