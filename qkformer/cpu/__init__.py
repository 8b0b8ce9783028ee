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

Each call cuts its rows into parts fixed by the problem size alone (:class:`Parts`), so results
do not depend on the number of threads, and the kernel shares them out over
``torch.get_num_threads()`` OpenMP threads inside the call (ctypes releases the GIL). With GNU
OpenMP these are torch's own intra-op threads, which spin for a while after each GEMM: threads
of our own would compete with them for the cores (each kernel ran 1.3-2x slower in the model that way).
A compiler without OpenMP (or ``QKFORMER_CPU_OPENMP=0``) builds the kernels single-threaded.

``QKFORMER_CPU_ISA=avx2`` builds for AVX2 without AVX-512 (x86-64-v3) instead of this CPU, in a
cache entry of its own: the kernels of an AVX2-only machine, testable on any newer x86 CPU.
``QKFORMER_REQUIRE_CPU_KERNELS=1`` makes a failed build an error instead of a fallback (CI sets
it, so the suite cannot pass without running the kernels).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["library", "build_file", "unavailable_reason", "threaded", "isa", "required", "kernel",
           "supports", "Parts", "SUFFIX"]

_SOURCES = tuple(Path(__file__).with_name(n) for n in ("fused_kernels.cpp", "sparse_kernels.cpp"))
_HEADERS = (Path(__file__).with_name("parts.h"),)
# -fno-trapping-math: no FP exception flags to keep, so clamps and conversions vectorise (the
# values are the same: contraction, reassociation and the rest of fast-math stay off)
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17",
          "-shared", "-fPIC")
# QKFORMER_CPU_ISA -> the target flags
_ISA_FLAGS = {"native": ("-march=native",), "avx2": ("-march=x86-64-v3", "-mtune=generic")}
_OPENMP = "-fopenmp"  # the parts of a call on threads; without it they run on the calling thread
SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_F = ctypes.c_float
_PARTS = [_P, _I, ctypes.c_int]  # a problem's parts: bounds, count, threads (see Parts)
# Argument types per kernel; "A" is the arithmetic type (double for f64, float otherwise).
_SIGNATURES = {
    "colstats": ([_P, _I, *_PARTS, _P, _P, _P], None),
    "bn_lif_fwd": ([_P, _P, _I, _I, _I, _I, *_PARTS, _P, _P, "A", "A"], None),
    "bn_lif_bwd": ([_P, _P, _P, _I, _I, _I, _I, _I, *_PARTS, _P, _P, "A", "A", "A",
                    ctypes.c_int, _P], None),
    "bn_bwd_apply": ([_P, _P, _P, _I, *_PARTS, _P, _P, _P, _P], None),
    "bn_pool_lif_fwd": ([_P, _P, _I, _I, _I, _I, _I, _I, _I, _I, *_PARTS, _P, _P, "A", "A"],
                        None),
    "bn_pool_lif_bwd": ([_P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, *_PARTS, _P, _P, "A", "A",
                         "A", ctypes.c_int, _P], None),
    "to_u8": ([_P, _P, *_PARTS], _I),
    "from_u8": ([_P, _P, *_PARTS], None),
    "to_bits": ([_P, _P, _I, *_PARTS], _I),
    "from_bits": ([_P, _P, _I, *_PARTS], None),
    "csr_count": ([_P, _I, *_PARTS, _P], None),
    "csr_fill": ([_P, _I, *_PARTS, _P, _P, _P], None),
    "csr_fill_u8": ([_P, _I, *_PARTS, _P, _P, _P], None),
    "csr_fill_bits": ([_P, _I, *_PARTS, _P, _P, _P], None),
    "spconv_fwd": ([_P, _P, _P, _P, _P, _P, _P, *_PARTS], None),
    "spconv_dw": ([_P, _P, _P, _P, _P, _P, *_PARTS], ctypes.c_int),
}
# dtype-free kernels: name -> signature
_PLAIN = {
    "csr_prefix": ([_P, _I, _P], None),
    "csr_count_u8": ([_P, _I, *_PARTS, _P], None),
    "csr_count_bits": ([_P, _I, *_PARTS, _P], None),
}

_DISABLED = "disabled by QKFORMER_CPU_KERNELS=0"
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_probed = False
_openmp = False
_functions: dict = {}
_forked = False


def _note_fork() -> None:
    # GNU OpenMP cannot start a team in a forked child once the parent had one (the child waits
    # for threads it does not have, as torch's own ops do there): one thread in such a child.
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_note_fork)


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


def _build_with(cxx: str, version: str, flags: tuple) -> ctypes.CDLL:
    key = hashlib.sha256("\0".join([*(f.read_text() for f in _SOURCES + _HEADERS),
                                    " ".join(flags), version, _cpu_identity()]).encode()
                         ).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"fused_kernels-{key}.so"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fused_kernels-", suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, *map(str, _SOURCES), "-o", tmp],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{Path(cxx).name} failed on the CPU kernels: "
                                   f"{proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
            os.replace(tmp, target)  # atomic: concurrent ranks never load a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(target))


def isa() -> str:
    """The instruction set the kernels are built for: ``native`` (this CPU) or ``avx2``
    (``QKFORMER_CPU_ISA``)."""
    name = os.environ.get("QKFORMER_CPU_ISA", "native").strip().lower() or "native"
    if name not in _ISA_FLAGS:
        raise ValueError(f"QKFORMER_CPU_ISA={name!r}: expected one of {sorted(_ISA_FLAGS)}")
    if name != "native" and platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"QKFORMER_CPU_ISA={name} needs an x86-64 CPU, not {platform.machine()}")
    return name


def _build() -> ctypes.CDLL:
    global _openmp
    flags = _FLAGS + _ISA_FLAGS[isa()]
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if os.environ.get("QKFORMER_CPU_OPENMP", "1") != "0":
        try:
            lib = _build_with(cxx, version, flags + (_OPENMP,))
            _openmp = True
            return lib
        except (RuntimeError, OSError):  # no OpenMP runtime for this compiler: one thread
            pass
    _openmp = False
    return _build_with(cxx, version, flags)


def required() -> bool:
    """Whether a failed build is an error (``QKFORMER_REQUIRE_CPU_KERNELS=1``)."""
    return os.environ.get("QKFORMER_REQUIRE_CPU_KERNELS", "0") not in ("", "0")


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None when they cannot be built here (see :func:`unavailable_reason`)."""
    global _lib, _reason, _probed
    if not _probed:
        if os.environ.get("QKFORMER_CPU_KERNELS", "1") == "0":
            _reason = _DISABLED
        else:
            isa()  # a misspelt QKFORMER_CPU_ISA is an error (every call), not a fallback
            try:
                _lib = _build()
            except Exception as e:  # no compiler, a failed build, an unloadable file
                _reason = f"{type(e).__name__}: {e}"
        _probed = True
    if _lib is None and required() and _reason != _DISABLED:
        raise RuntimeError(f"QKFORMER_REQUIRE_CPU_KERNELS is set but the CPU kernels are "
                           f"unavailable: {_reason}")
    return _lib


def build_file() -> Optional[Path]:
    """The compiled kernels' file in the cache (None without kernels): records measured on
    this machine's build are kept beside it."""
    lib = library()
    return None if lib is None else Path(lib._name)


def unavailable_reason() -> Optional[str]:
    library()
    return _reason


def threaded() -> bool:
    """Whether the kernels share a call's parts out over threads (built with OpenMP)."""
    return library() is not None and _openmp


@torch.compiler.assume_constant_result
def _loaded() -> bool:
    # a constant to torch.compile: a model compiled before any eager call builds the kernels
    # while it is traced (a build cannot be traced) and sees the answer as a constant
    return library() is not None


def supports(t: torch.Tensor) -> bool:
    """Whether the kernels handle this tensor (CPU, a supported dtype) on this machine."""
    return t.device.type == "cpu" and t.dtype in SUFFIX and _loaded()


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
    global _lib, _reason, _probed, _openmp
    _lib, _reason, _probed, _openmp = None, None, False, False
    _functions.clear()


MAX_PARTS = 64  # a problem is cut into at most this many parts ...
MIN_WORK = 1 << 18  # ... of at least this many elements each: a call costs some microseconds


class Parts:
    """A problem's rows cut into parts, as every kernel takes them (its ``QK_PARTS``
    arguments, :attr:`args`: the bounds, their count and the threads to share them over).

    At most :data:`MAX_PARTS` parts of at least :data:`MIN_WORK` elements (items of ``work``
    elements each), each a multiple of ``grain`` items long (but the last). The cut depends on
    the sizes only, never on the threads, so neither do the results."""

    __slots__ = ("bounds", "_array")

    def __init__(self, n: int, grain: int = 1, work: int = 1):
        if n <= 0:
            self._use([0])
            return
        step = max(-(-n // MAX_PARTS), -(-MIN_WORK // max(work, 1)))
        step = -(-step // grain) * grain
        self._use([*range(0, n, step), n])

    def _use(self, bounds: list) -> None:
        self.bounds = bounds
        self._array = (ctypes.c_int64 * len(bounds))(*bounds)

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def args(self) -> tuple:
        # the array itself, not its address: the call's arguments keep it alive
        return self._array, len(self), 1 if _forked else torch.get_num_threads()

    @classmethod
    def of(cls, bounds: list) -> "Parts":
        """Parts with the given bounds ``[0, ..., n]``."""
        self = cls.__new__(cls)
        self._use(list(bounds))
        return self
