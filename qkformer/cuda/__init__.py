"""CuPy backend of the multistep LIF neuron: loader of ``lif_kernel.cu``, launchers, self-check.

CuPy is imported lazily, on the first question asked of this module, never at ``import qkformer``:
the package must work (and the 'auto' backend must fall back to torch) where CuPy is missing or
broken. The verdict is cached; when CuPy cannot be used, the reason given is the real one (a
missing package, a failed import of an installed one, no visible device, an NVRTC error), and it
says so when CuPy was built for another CUDA major version than torch.

The probe compiles and loads the module but launches nothing. Before the kernels serve a
(device, dtype) for the first time, :func:`forward` runs them once on a small input against the
torch backend's loops; a disagreement, or an exception from a launch later on, disables the
kernel for that (device, dtype) with one warning, and the torch loops take over. Environment:

* ``QKFORMER_LIF_SELFCHECK=0`` skips the self-check (the kernel is trusted);
* ``QKFORMER_REQUIRE_CUDA_KERNEL=1`` turns every fallback on a CUDA tensor (kernel unavailable,
  failed self-check, failed launch) into an error.

This module imports the torch loops (``qkformer.lif_loops``) but never ``qkformer.neuron``, which
sits above it.
"""
from __future__ import annotations

import re
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..env import flag as _flag
from ..lif_loops import lif_backward_torch, lif_forward_torch

__all__ = ["is_available", "unavailable_reason", "require_available", "kernel_source", "handles",
           "forward", "backward", "kernel_required", "selfcheck_enabled", "disabled_reason",
           "launch_counts", "versions", "REQUIRE_ENV", "SELFCHECK_ENV"]

REQUIRE_ENV = "QKFORMER_REQUIRE_CUDA_KERNEL"
SELFCHECK_ENV = "QKFORMER_LIF_SELFCHECK"

_SOURCE_PATH = Path(__file__).with_name("lif_kernel.cu")
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_THREADS = 256
_COMPILE_OPTIONS = ("--std=c++14",)

_verdict: tuple[bool, str | None] | None = None  # (available, reason) once probed
_modules: dict[int, object] = {}  # device index -> compiled cupy.RawModule
_functions: dict[tuple[int, str], object] = {}  # (device index, kernel name) -> loaded function
_streams: dict[tuple[int, int], object] = {}  # (device index, stream handle) -> CuPy stream
_verified: set = set()  # (device, dtype) keys whose self-check passed (or was skipped)
_failures: dict = {}  # (device, dtype) -> why the kernel is off there
_warned: set = set()  # (device, dtype) keys whose fallback has been announced
_launches: Counter = Counter()  # kernel name -> successful launches (tests, gpu_check)
_lock = threading.Lock()


def kernel_source() -> str:
    return _SOURCE_PATH.read_text(encoding="utf-8")


def _reset_cache() -> None:
    """Forget the probe result, compiled modules, self-check results and counters (tests)."""
    global _verdict
    _verdict = None
    for cache in (_modules, _functions, _streams, _verified, _failures, _warned,
                  _launches):
        cache.clear()


def kernel_required() -> bool:
    """``QKFORMER_REQUIRE_CUDA_KERNEL`` set: a CUDA tensor must run the kernel or fail."""
    return bool(_flag(REQUIRE_ENV))


def selfcheck_enabled() -> bool:
    return _flag(SELFCHECK_ENV) is not False


def _import_cupy():
    import cupy

    return cupy


# ------------------------------------------------------------------------ CUDA major versions


def _torch_cuda_major() -> Optional[int]:
    v = torch.version.cuda
    return int(v.split(".")[0]) if v else None


def _installed_cupy_major() -> Optional[int]:
    """CUDA major of the installed CuPy wheel (cupy-cudaNNx), read from the package metadata so
    that it is known even when ``import cupy`` fails (the usual symptom of a mismatch)."""
    from importlib import metadata

    for dist in metadata.distributions():
        m = re.fullmatch(r"cupy[-_]cuda(\d+)x", (dist.metadata.get("Name") or "").lower())
        if m:
            return int(m.group(1))
    return None


def _cupy_major(cupy=None) -> Optional[int]:
    if cupy is not None:
        try:
            return cupy.cuda.runtime.runtimeGetVersion() // 1000
        except Exception:
            pass
    try:
        return _installed_cupy_major()
    except Exception:
        return None


def _install_hint() -> str:
    major = _torch_cuda_major()
    if major is None:
        return "pip install 'qkformer[cuda]' with a CUDA build of torch"
    return (f"pip install 'qkformer[cuda{major}]', which installs cupy-cuda{major}x to match "
            f"torch's CUDA {major}")


def _mismatch_note(cupy=None) -> str:
    ours, theirs = _cupy_major(cupy), _torch_cuda_major()
    if ours is None or theirs is None or ours == theirs:
        return ""
    return (f"; CuPy is built for CUDA {ours} but torch for CUDA {theirs}: install "
            f"'qkformer[cuda{theirs}]' (cupy-cuda{theirs}x) instead")


# ------------------------------------------------------------------------------------ probe


def _module(device_index: int):
    """The kernels compiled for one device, built once (NVRTC compiles for that device's arch)."""
    mod = _modules.get(device_index)
    if mod is None:
        cupy = _import_cupy()
        with cupy.cuda.Device(device_index):
            mod = cupy.RawModule(code=kernel_source(), options=_COMPILE_OPTIONS)
            for suffix in _SUFFIX.values():  # compilation is lazy in CuPy: force it here
                mod.get_function(f"lif_forward_{suffix}")
                mod.get_function(f"lif_backward_{suffix}")
        _modules[device_index] = mod
    return mod


def _probe() -> tuple[bool, str | None]:
    try:
        cupy = _import_cupy()
    except ModuleNotFoundError as e:
        # Only cupy itself missing means "not installed"; a missing dependency of an installed
        # CuPy is a broken install, and its own message says which.
        if e.name == "cupy":
            return False, f"cupy is not installed ({_install_hint()})"
        return False, f"cupy failed to import: {type(e).__name__}: {e}{_mismatch_note()}"
    except Exception as e:  # ImportError from missing CUDA libraries, a version mismatch, ...
        return False, f"cupy failed to import: {type(e).__name__}: {e}{_mismatch_note()}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, driver older than CuPy's runtime, ...
        return False, (f"no CUDA device visible to CuPy ({type(e).__name__}: {e})"
                       f"{_mismatch_note(cupy)}")
    if count == 0:
        return False, "no CUDA device visible to CuPy"
    if not torch.cuda.is_available():
        return False, "CuPy sees a CUDA device but torch does not (CPU-only torch build?)"
    try:
        _module(torch.cuda.current_device())
    except Exception as e:  # cupy.cuda.compiler.CompileException carries the NVRTC log
        return False, (f"compiling {_SOURCE_PATH.name} failed: {type(e).__name__}: {e}"
                       f"{_mismatch_note(cupy)}")
    return True, None


def _state() -> tuple[bool, str | None]:
    global _verdict
    if _verdict is None:
        _verdict = _probe()
    return _verdict


def is_available() -> bool:
    return _state()[0]


def unavailable_reason() -> str | None:
    return _state()[1]


def require_available() -> None:
    ok, reason = _state()
    if not ok:
        raise RuntimeError(f"LIF backend 'cupy' is unavailable: {reason}")


def handles(x: torch.Tensor) -> bool:
    """Whether ``x`` lives where the kernel runs (tests stand a CPU tensor in for a CUDA one)."""
    return x.device.type == "cuda"


def versions() -> dict:
    """torch / CUDA / CuPy / NVRTC / driver versions and the GPU name, as far as they are known
    (for ``benchmarks/gpu_check.sh`` and bug reports); never raises."""
    out = {"torch": torch.__version__, "torch CUDA": torch.version.cuda or "none (CPU build)"}
    try:
        out["GPU"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except Exception as e:
        out["GPU"] = f"error: {e}"
    try:
        cupy = _import_cupy()
    except Exception as e:
        out["CuPy"] = f"not importable ({type(e).__name__}: {e})"
        return out
    out["CuPy"] = cupy.__version__
    queries = {"CuPy CUDA runtime": lambda: cupy.cuda.runtime.runtimeGetVersion(),
               "NVRTC": lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
               "driver": lambda: cupy.cuda.runtime.driverGetVersion()}
    for name, query in queries.items():
        try:
            out[name] = query()
        except Exception as e:
            out[name] = f"error: {type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------------------------- launches


def _function(index: int, name: str):
    """A kernel, loaded once per device inside that device's context (a function loaded on the
    current device would not run on another)."""
    fn = _functions.get((index, name))
    if fn is None:
        cupy = _import_cupy()
        with cupy.cuda.Device(index):
            fn = _module(index).get_function(name)
        _functions[(index, name)] = fn
    return fn


class _TorchStream:
    """Torch's stream handle behind the CUDA stream protocol (CuPy >= 14 ``from_external``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _stream(cupy, index: int, ptr: int):
    stream = _streams.get((index, ptr))
    if stream is None:
        if len(_streams) > 256:  # streams come and go in some programs; wrappers are cheap
            _streams.clear()
        if hasattr(cupy.cuda.Stream, "from_external"):
            stream = cupy.cuda.Stream.from_external(_TorchStream(ptr))
        else:  # CuPy < 14
            stream = cupy.cuda.ExternalStream(ptr, index)
        _streams[(index, ptr)] = stream
    return stream


def _launch(name: str, device: torch.device, n: int, args: tuple) -> None:
    if n == 0:
        return
    cupy = _import_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _function(index, name)
    # Launch on torch's current stream: ordering with the surrounding torch ops comes for free
    # and no synchronisation is needed.
    stream = _stream(cupy, index, torch.cuda.current_stream(device).cuda_stream)
    with cupy.cuda.Device(index), stream:
        kernel(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)
    _launches[name] += 1


def launch_counts() -> dict:
    """Successful kernel launches so far, by kernel name: proof that the kernel really ran."""
    return dict(_launches)


def _f32(value: float):
    return np.float32(value)  # a Python float would be passed as a double


def _threshold(v_threshold: float, dtype: torch.dtype):
    # torch compares a tensor with a Python scalar in the tensor's dtype: round the threshold
    # through it so 16-bit spikes flip where torch's would.
    return _f32(torch.tensor(v_threshold, dtype=dtype).item())


def _forward(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool):
    """One launch of the forward kernel on a contiguous [T, ...] tensor of a kernel dtype."""
    T, n = x.shape[0], x.numel() // max(x.shape[0], 1)
    spikes = torch.empty_like(x)
    h_seq = torch.empty_like(x) if save_h else None
    _launch(f"lif_forward_{_SUFFIX[x.dtype]}", x.device, n,
            (x.data_ptr(), spikes.data_ptr(), h_seq.data_ptr() if save_h else 0, np.int64(n),
             np.int32(T), _f32(tau), _threshold(v_threshold, x.dtype)))
    return spikes, h_seq


def _backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset):
    """One launch of the backward kernel; both tensors contiguous, same shape and dtype."""
    T, n = h_seq.shape[0], h_seq.numel() // max(h_seq.shape[0], 1)
    grad_x = torch.empty_like(h_seq)
    _launch(f"lif_backward_{_SUFFIX[h_seq.dtype]}", h_seq.device, n,
            (grad_spikes.data_ptr(), h_seq.data_ptr(), grad_x.data_ptr(), np.int64(n),
             np.int32(T), _f32(tau), _f32(1.0 - 1.0 / tau), _threshold(v_threshold, h_seq.dtype),
             _f32(alpha), np.int32(bool(detach_reset))))
    return grad_x


# -------------------------------------------------------------------------------- self-check


def _check_inputs(device: torch.device, dtype: torch.dtype):
    """x on a grid of quarters, so that every H is exact in all three dtypes (at most 8
    significant bits over T = 4 steps) and the kernel must equal the torch loops bit for bit,
    ties at the threshold included; plus +inf, -inf and NaN (reset semantics) at t = 1 and in
    the last step. N spans several thread blocks and a partial one. Made on the CPU with a
    fixed seed: the same numbers on every device, and the global RNG is left alone."""
    g = torch.Generator().manual_seed(20240917)
    T, n = 4, 3 * _THREADS + 37
    x = torch.randint(-8, 13, (T, n), generator=g).to(dtype) * 0.25
    x[1, 0], x[1, 1], x[2, 2], x[T - 1, 3] = float("inf"), -float("inf"), float("nan"), float("inf")
    gs = torch.randint(-8, 9, (T, n), generator=g).to(dtype) * 0.125
    return x.to(device), gs.to(device)


def _disagreement(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float):
    """(elements off, largest finite difference); NaN must meet NaN and inf the same inf."""
    got, ref = got.double().cpu(), ref.double().cpu()
    nan_got, nan_ref = got.isnan(), ref.isnan()
    same = (got == ref) | (nan_got & nan_ref)
    diff = torch.where(same | nan_got | nan_ref, 0.0, (got - ref).abs()).nan_to_num(posinf=0.0)
    off = ~same & ((nan_got != nan_ref) | got.isinf() | ref.isinf()
                   | ((got - ref).abs() > atol + rtol * ref.abs()))
    return int(off.sum()), float(diff.max()) if diff.numel() else 0.0


def _self_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the kernel agrees with the torch loops on the check input, else what differs."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        x, gs = _check_inputs(device, dtype)
        spikes, h = _forward(x, 2.0, 1.0, True)
        s_ref, h_ref = lif_forward_torch(x, 2.0, 1.0, True)
        bad, _ = _disagreement(spikes, s_ref, 0.0, 0.0)
        if bad:
            return f"{bad} of {x.numel()} spikes differ from the torch backend"
        bad, err = _disagreement(h, h_ref, 0.0, 0.0)
        if bad:
            return (f"{bad} of {x.numel()} membrane potentials H differ from the torch backend "
                    f"(largest difference {err:.3g})")
        if _disagreement(_forward(x, 2.0, 1.0, False)[0], s_ref, 0.0, 0.0)[0]:
            return "the forward pass without saved H gives other spikes than with it"
        # The kernel computes the backward in float and rounds once when it stores: against the
        # torch loops in float32 on the same (exactly representable) inputs it may differ by the
        # final rounding (half an ulp of the storage type) plus a few float32 ulps (its expf).
        eps = torch.finfo(dtype).eps
        rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (eps, 2.0 ** -24)
        for detach_reset in (True, False):
            gx = _backward(gs, h, 2.0, 1.0, 4.0, detach_reset)
            ref = lif_backward_torch(gs.float(), h.float(), 2.0, 1.0, 4.0, detach_reset)
            bad, err = _disagreement(gx, ref, rtol, atol)
            if bad:
                return (f"{bad} of {x.numel()} input gradients (detach_reset={detach_reset}) "
                        f"differ from the torch backend beyond rtol {rtol:.2g}, atol {atol:.2g} "
                        f"(largest finite difference {err:.3g})")
    return None


def _key(x: torch.Tensor):
    return (str(x.device), x.dtype)


def disabled_reason(device, dtype: torch.dtype) -> Optional[str]:
    """Why the kernel is off for (device, dtype) after a failed self-check or launch, or None."""
    return _failures.get((str(torch.device(device)), dtype))


def _refuse(key, problem: str, strict: bool) -> None:
    """Record that the kernel is off for ``key`` and say so: an error when the kernel is
    required (``strict`` = backend 'cupy' asked for explicitly, or the environment variable),
    otherwise one warning per (device, dtype)."""
    _failures.setdefault(key, problem)
    where = f"on {key[0]} for {key[1]}"
    if strict or kernel_required():
        why = "backend 'cupy' was requested" if strict else f"{REQUIRE_ENV} is set"
        raise RuntimeError(f"LIF CUDA kernel unusable {where}: {_failures[key]} ({why})")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"LIF CUDA kernel disabled {where}: {_failures[key]}; falling back to the "
                      f"torch backend ({SELFCHECK_ENV}=0 skips the self-check, {REQUIRE_ENV}=1 "
                      f"makes this an error)", RuntimeWarning, stacklevel=4)


def _usable(x: torch.Tensor, strict: bool) -> bool:
    key = _key(x)
    if key in _failures:  # also after a passed check: a later launch may have failed
        _refuse(key, _failures[key], strict)
        return False
    if key in _verified:
        return True
    with _lock:
        if key not in _verified and key not in _failures:
            if not selfcheck_enabled():
                _verified.add(key)
                return True
            try:
                problem = _self_check(x.device, x.dtype)
            except Exception as e:  # a launch error is a failed check like any other
                problem = f"the kernel raised {type(e).__name__}: {e}"
            if problem is None:
                _verified.add(key)
                return True
            _refuse(key, f"self-check failed: {problem}", strict)  # records; raises or warns
            return False
    return _usable(x, strict)  # another thread settled it meanwhile


def forward(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool,
            strict: bool = False):
    """The kernel's ``(spikes, h_seq or None)`` for ``x`` ([T, ...], a CUDA tensor), both shaped
    like ``x`` and contiguous; None where the torch loops must run instead (no kernel for the
    dtype, kernel disabled for this device and dtype, failed launch)."""
    if x.dtype not in _SUFFIX or not _usable(x, strict):
        return None
    try:
        return _forward(x.contiguous(), tau, v_threshold, save_h)
    except Exception as e:
        _refuse(_key(x), f"the forward kernel raised {type(e).__name__}: {e}", strict)
        return None


def backward(grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float, v_threshold: float,
             alpha: float, detach_reset: bool, strict: bool = False):
    """The kernel's input gradient (contiguous, shaped like ``h_seq``), or None as in
    :func:`forward`. ``grad_spikes`` must have ``h_seq``'s shape and dtype."""
    if h_seq.dtype not in _SUFFIX or not _usable(h_seq, strict):
        return None
    try:
        return _backward(grad_spikes.contiguous(), h_seq.contiguous(), tau, v_threshold, alpha,
                         detach_reset)
    except Exception as e:
        _refuse(_key(h_seq), f"the backward kernel raised {type(e).__name__}: {e}", strict)
        return None
