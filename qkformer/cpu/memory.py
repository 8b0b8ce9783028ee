"""Keep freed memory in the process for reuse (glibc), so CPU training steps do not page in
their large tensors afresh every step.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
and returns it to the system on free, so each such tensor costs a page fault per 4 KiB page on
first touch, every step: about 10 ms per 40 MB tensor on the project's machine (2.5x the time of
a fused BatchNorm + LIF pass over it). Torch has no caching allocator for CPU tensors. With
mmap switched off for the heap and no trimming, freed blocks stay in the heap and the next
step's tensors of the same sizes reuse them: no faults after the first step. The cost is that
the process keeps its peak heap mapped (a training process does anyway).

Only for glibc; elsewhere :func:`keep_freed_memory` does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

import torch

__all__ = ["keep_freed_memory", "setup_for", "ENV"]

ENV = "QKFORMER_KEEP_FREED_MEMORY"  # "0": leave the allocator as it is

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NO_TRIM = 2 ** 31 - 1  # free bytes at the heap top before glibc trims (mallopt takes an int)

_done = None


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse (once per process; forked workers inherit it).
    Returns one line for the logs saying what was done. ``QKFORMER_KEEP_FREED_MEMORY=0``
    turns it off."""
    global _done
    if _done is not None:
        return _done
    if os.environ.get(ENV, "1") == "0":
        _done = f"allocator: as it was ({ENV}=0)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _done = "allocator: as it was (not glibc)"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM) == 1
        _done = ("allocator: glibc keeps freed memory for reuse (no mmap, no trim)" if ok
                 else "allocator: as it was (mallopt refused)")
    return _done


def setup_for(device) -> Optional[str]:
    """What a CPU entry point does for ``device``: :func:`keep_freed_memory` on CPU (its log
    line returned), nothing elsewhere (None)."""
    return keep_freed_memory() if torch.device(device).type == "cpu" else None
