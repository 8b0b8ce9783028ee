"""The CPU thread count of the command lines: the cores that are free when the run starts.

OpenMP teams (torch's and the compiled kernels') wait for every thread at each barrier; a core
held by another process stalls the whole team until the scheduler hands it back, so on a shared
machine two threads ran the demo 4x slower than one (docs/performance.md). A run started while
other processes keep cores busy therefore uses only the free ones, and says so in one line.
``OMP_NUM_THREADS`` (the user's choice) is always kept.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

__all__ = ["free_cores", "fit_threads_to_free_cores"]


def _cpu_times() -> Optional[tuple]:
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def free_cores(interval: float = 0.2) -> Optional[float]:
    """Cores left idle by every process during ``interval`` seconds (Linux ``/proc/stat``);
    None where that cannot be read."""
    first = _cpu_times()
    time.sleep(interval)
    second = _cpu_times()
    if first is None or second is None or second[0] <= first[0]:
        return None
    idle_share = (second[1] - first[1]) / (second[0] - first[0])
    return idle_share * (os.cpu_count() or 1)


def fit_threads_to_free_cores(interval: float = 0.2) -> Optional[int]:
    """Lower ``torch.set_num_threads`` to the free cores (at least 1) unless ``OMP_NUM_THREADS``
    is set; returns the new count, or None when nothing changed."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = torch.get_num_threads()
    free = free_cores(interval)
    if free is None or threads <= 1:
        return None
    fit = max(1, min(threads, int(free + 0.5)))
    if fit >= threads:
        return None
    torch.set_num_threads(fit)
    cpus = os.cpu_count() or 1
    print(f"threads: {fit} instead of {threads}: other processes kept {cpus - free:.1f} of {cpus} "
          f"cores busy at start (OMP_NUM_THREADS={threads} takes them all)", file=sys.stderr,
          flush=True)
    return fit


def fit_for_command_line(from_command_line: bool) -> Optional[int]:
    """:func:`fit_threads_to_free_cores` for a run started from the command line as one process
    (called from Python, the caller's thread setting is left alone)."""
    if not from_command_line or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return fit_threads_to_free_cores()
