"""What a long run needs to lose minutes, not hours: the output folder's lock, the choice of the
checkpoint to resume from, step checkpoints that keep the last K, a clear error when a checkpoint
cannot be written, reproducible augmentation, and preemption signals.

Checkpoints in an output folder:

- ``checkpoint-last.pth``: written after each epoch (training, scheduler step, evaluation);
- ``checkpoint-step-<update>.pth``: written every ``--save-every`` optimizer updates and/or
  ``--save-every-min`` minutes and on a preemption signal, at an update boundary, with the
  data loader's position (see docs/long_runs.md);
- ``checkpoint-best.pth``: the best evaluation so far (never resumed from).
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["EXIT_PREEMPTED", "EXIT_INTERRUPTED", "RunLockedError", "RunLock", "check_output_dir",
           "remove_partial_files", "step_checkpoint_path", "resume_candidates", "prune_steps",
           "CheckpointWriteError", "write_or_explain", "SeededSamples", "Preemption"]

# Exit codes a job script can tell apart (docs/long_runs.md): 0 done, 1 a user error,
# EXIT_PREEMPTED a step checkpoint was written on a signal (requeue), 130 Ctrl-C.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later"
EXIT_INTERRUPTED = 130

LOCK_NAME = ".qkformer-run.lock"
LAST = "checkpoint-last.pth"
BEST = "checkpoint-best.pth"
_STEP_RE = re.compile(r"^checkpoint-step-(\d+)\.pth$")


class RunLockedError(ValueError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """An exclusive lock on an output folder: a file holding the owner's pid and host, created
    with O_EXCL. A lock whose pid is dead on this host is stale (a killed run) and is taken over;
    one from another host cannot be checked from here and is refused with the way out."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"]
                                     and not _pid_alive(int(owner.get("pid", -1)))):
                    # unreadable (killed while writing it) or its process is gone: stale
                    self.path.unlink(missing_ok=True)
                    continue
                where = ("this host" if owner.get("host") == me["host"]
                         else f"host {owner.get('host')}")
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run (pid {owner.get('pid')} on "
                    f"{where}); give another --output-dir, or delete {self.path} if that run is "
                    f"gone") from None
            except OSError as e:  # read-only file system, no permission, ...
                raise OSError(e.errno, f"cannot write into --output-dir {self.path.parent}: "
                                       f"{e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"cannot take the lock {self.path}: it keeps reappearing")

    def _owner(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and "pid" in data else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


def _checkpoints(folder: Path) -> List[Path]:
    return sorted(p for p in folder.glob("checkpoint-*.pth") if p.is_file())


def check_output_dir(folder: Path, resume: str, overwrite: bool) -> None:
    """A new run must not write over another run's checkpoints: refuse unless told to continue
    (``--resume``) or to start over (``--overwrite``, which removes what the old run wrote)."""
    found = _checkpoints(folder)
    if not found or resume:
        return
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"--output-dir {folder} holds the checkpoints of an earlier run ({names}); "
                         f"continue it with --resume auto, or start over with --overwrite "
                         f"(deletes them)")
    for p in found:
        p.unlink()
    for name in ("log.jsonl", "args.yaml"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "tb", ignore_errors=True)


def remove_partial_files(folder: Path) -> List[Path]:
    """Temporary files of checkpoint writes that a killed run left behind (the lock is held, so
    no other writer is using them)."""
    gone = []
    for p in folder.glob(".checkpoint-*.tmp"):
        p.unlink(missing_ok=True)
        gone.append(p)
    return gone


def step_checkpoint_path(folder: Path, update: int) -> Path:
    return Path(folder) / f"checkpoint-step-{update:09d}.pth"


def resume_candidates(folder: Path) -> List[Path]:
    """Checkpoints to resume from, newest first. A run writes its checkpoints in the order of its
    progress, so the newest file holds the furthest position (epoch or step); the best-accuracy
    copy is never resumed from."""
    found = [p for p in Path(folder).glob("checkpoint-*.pth")
             if p.is_file() and (p.name == LAST or _STEP_RE.match(p.name))]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == LAST), reverse=True)


def prune_steps(folder: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in Path(folder).glob("checkpoint-step-*.pth")
                   if (m := _STEP_RE.match(p.name)))
    for _, p in steps[:max(len(steps) - keep, 0)]:
        p.unlink(missing_ok=True)


class CheckpointWriteError(OSError):
    pass


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_or_explain(write: Callable[[], None], path: Path, state) -> None:
    """Run ``write`` (an atomic save of ``state`` to ``path``); a full disk or a read-only folder
    becomes one message naming the folder and the bytes needed. The atomic write leaves the
    previous file in place."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        folder = Path(path).parent
        need = _nbytes(state)
        try:
            left = shutil.disk_usage(folder).free
            free = f", {left:,} free"
        except OSError:
            left, free = None, ""
        if isinstance(e, OSError) and e.strerror:
            why = e.strerror
        elif left is not None and left < need:  # torch's serializer says only "unexpected pos"
            why = os.strerror(errno.ENOSPC)
        else:
            why = " ".join(str(e).split())[:200] or type(e).__name__
        kept = f"; the previous {path.name} is intact" if Path(path).exists() else ""
        raise CheckpointWriteError(f"cannot write checkpoint {path.name} into {folder}: about "
                                   f"{need:,} bytes needed{free} ({why}){kept}") from e


class SeededSamples(Dataset):
    """A data set whose random augmentation of sample ``i`` in epoch ``e`` depends only on
    ``(seed, e, i)``: it does not depend on the number of workers, on which worker fetched it, or
    on what that worker did before, so a run resumed mid-epoch (fresh workers) augments exactly
    as the uninterrupted one. The global RNGs of the calling process are left untouched."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # classes, targets, ... of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i)
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class Preemption:
    """SIGTERM / SIGUSR1 (``--preempt-signals``) ask the run to stop at the next optimizer update
    boundary after writing a step checkpoint; a second signal ends the process at once."""

    def __init__(self, names: Tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.requested: Optional[str] = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ValueError(f"--preempt-signals: {name} is not a signal on this system")
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            os.write(2, f"error: second {name}: stopping now, without a checkpoint\n".encode())
            os._exit(128 + signum)  # the shell's status of a process killed by that signal
        self.requested = name
        os.write(2, f"{name} received: stopping after the current optimizer update, with a step "
                    f"checkpoint\n".encode())

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
