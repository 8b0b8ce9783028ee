"""The CPU kernels of the fast path: built once per machine, cached, called through ctypes.

``fused_kernels.cpp``: BatchNorm + [max-pool] + LIF in one pass each way, and the packing of
spikes and counts. Torch has no fused BatchNorm + LIF: as a chain of tensor ops the neuron and
the normalisation cost more than the convolutions around them on a CPU.
``sparse_kernels.cpp``: convolutions and projections computed from the non-zeros of their input
(spikes and small counts), which dense GEMM libraries cannot skip.

The source is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``,
``c++`` or ``clang++``) for this CPU (``-march=native``) into a cache folder
(``$QKFORMER_CACHE_DIR``, else ``$XDG_CACHE_HOME/qkformer`` or ``~/.cache/qkformer``), under a
name that hashes the source, the flags, the compiler and the CPU, so a cache shared between
machines never hands one machine another's build. Without a compiler (or with
``QKFORMER_CPU_KERNELS=0``) :func:`library` returns None and the fast path runs the same
algorithm in torch ops instead; :func:`unavailable_reason` says why.

Work is split into row ranges, one Python thread per intra-op thread (``torch.get_num_threads``):
ctypes releases the GIL during the call. The ranges are fixed by the problem size alone, so
results do not depend on the number of threads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["library", "unavailable_reason", "kernel", "supports", "for_ranges", "SUFFIX"]

_SOURCES = tuple(Path(__file__).with_name(n) for n in ("fused_kernels.cpp", "sparse_kernels.cpp"))
# -fno-trapping-math: no FP exception flags to keep, so clamps and conversions vectorise (the
# values are the same: contraction, reassociation and the rest of fast-math stay off)
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd",
          "-std=c++17", "-shared", "-fPIC")
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_F = ctypes.c_float
# Argument types per kernel; "A" is the arithmetic type (double for f64, float otherwise).
_SIGNATURES = {
    "colstats": ([_P, _I, _I, _I, _P, _P, _P], None),
    "bn_lif_fwd": ([_P, _P, _I, _I, _I, _I, _I, _I, _P, _P, "A", "A"], None),
    "bn_lif_bwd": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _P, _P, "A", "A", "A",
                    ctypes.c_int, _P], None),
    "bn_bwd_apply": ([_P, _P, _P, _I, _I, _I, _P, _P, _P, _P], None),
    "bn_pool_lif_fwd": ([_P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, "A", "A"],
                        None),
    "bn_pool_lif_bwd": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, "A", "A",
                         "A", ctypes.c_int, _P], None),
    "to_u8": ([_P, _P, _I, _I], _I),
    "from_u8": ([_P, _P, _I, _I], None),
    "to_bits": ([_P, _P, _I, _I, _I], _I),
    "from_bits": ([_P, _P, _I, _I, _I], None),
    "csr_count": ([_P, _I, _I, _I, _P], None),
    "csr_fill": ([_P, _I, _I, _I, _P, _P, _P], None),
    "csr_fill_u8": ([_P, _I, _I, _I, _P, _P, _P], None),
    "csr_fill_bits": ([_P, _I, _I, _I, _P, _P, _P], None),
    "spconv_fwd": ([_P, _P, _P, _P, _P, _P, _P, _I, _I], None),
    "spconv_dw": ([_P, _P, _P, _P, _P, _P, _I, _I], ctypes.c_int),
}
# dtype-free kernels: name -> signature
_PLAIN = {
    "csr_prefix": ([_P, _I, _P], None),
    "csr_count_u8": ([_P, _I, _I, _I, _P], None),
    "csr_count_bits": ([_P, _I, _I, _I, _P], None),
}

_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_probed = False
_functions: dict = {}
_pool: Optional[ThreadPoolExecutor] = None


def _forget_pool() -> None:  # a forked child (DataLoader worker) has none of the parent's threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _cache_dir() -> Path:
    if os.environ.get("QKFORMER_CACHE_DIR"):
        return Path(os.environ["QKFORMER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "qkformer"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    flags += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return platform.machine() + platform.processor() + flags


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([*(f.read_text() for f in _SOURCES), " ".join(_FLAGS), version,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"fused_kernels-{key}.so"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fused_kernels-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *_FLAGS, *map(str, _SOURCES), "-o", tmp],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cxx).name} failed on the CPU kernels: "
                                   f"{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
            os.replace(tmp, target)  # atomic: concurrent ranks never load a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None when they cannot be built here (see :func:`unavailable_reason`)."""
    global _lib, _reason, _probed
    if not _probed:
        _probed = True
        if os.environ.get("QKFORMER_CPU_KERNELS", "1") == "0":
            _reason = "disabled by QKFORMER_CPU_KERNELS=0"
        else:
            try:
                _lib = _build()
            except Exception as e:  # no compiler, a failed build, an unloadable file
                _reason = f"{type(e).__name__}: {e}"
    return _lib


def unavailable_reason() -> Optional[str]:
    library()
    return _reason


def supports(t: torch.Tensor) -> bool:
    """Whether the kernels handle this tensor (CPU, a supported dtype) on this machine."""
    return t.device.type == "cpu" and t.dtype in SUFFIX and library() is not None


def kernel(name: str, dtype: Optional[torch.dtype] = None) -> Callable:
    """The ctypes function ``qk_<name>_<suffix>`` (``qk_<name>`` for the dtype-free ones) with
    its argument types set."""
    fn = _functions.get((name, dtype))
    if fn is None:
        if dtype is None:
            fn = getattr(library(), f"qk_{name}")
            fn.argtypes, fn.restype = _PLAIN[name]
            _functions[(name, dtype)] = fn
            return fn
        fn = getattr(library(), f"qk_{name}_{SUFFIX[dtype]}")
        arith = _D if dtype == torch.float64 else _F
        argtypes, restype = _SIGNATURES[name]
        fn.argtypes = [arith if a == "A" else a for a in argtypes]
        fn.restype = restype
        _functions[(name, dtype)] = fn
    return fn


def _reset() -> None:
    """Forget the build and the loaded functions (tests)."""
    global _lib, _reason, _probed
    _lib, _reason, _probed = None, None, False
    _functions.clear()


MAX_RANGES = 64  # a problem is cut into at most this many row ranges ...
MIN_WORK = 1 << 18  # ... of at least this many elements each: a call costs some microseconds


def ranges(n: int, grain: int = 1, work: int = 1) -> list:
    """``[(a, b), ...]`` covering ``range(n)`` for items of ``work`` elements each: at most
    :data:`MAX_RANGES` ranges of at least :data:`MIN_WORK` elements, each a multiple of
    ``grain`` items long (but the last). Depends on the sizes only, not on the threads."""
    if n <= 0:
        return []
    step = max(-(-n // MAX_RANGES), -(-MIN_WORK // max(work, 1)))
    step = -(-step // grain) * grain
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def for_ranges(parts: list, body: Callable[[int, int, int], object]) -> list:
    """``body(i, a, b)`` for every range ``parts[i] = (a, b)``, shared out over the intra-op
    threads; returns the results in range order."""
    global _pool
    workers = min(torch.get_num_threads(), len(parts))
    if workers <= 1:
        return [body(i, a, b) for i, (a, b) in enumerate(parts)]
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="qkformer-cpu")
    out = [None] * len(parts)

    def run(w: int) -> None:
        for i in range(w, len(parts), workers):
            out[i] = body(i, *parts[i])

    for f in [_pool.submit(run, w) for w in range(workers)]:
        f.result()
    return out
