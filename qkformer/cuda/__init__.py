"""CuPy backend of the multistep LIF neuron: loader of ``lif_kernel.cu`` and its autograd Function.

CuPy is imported lazily, on the first question asked of this module, never at ``import qkformer``:
the package must work (and the 'auto' backend must fall back to torch) where CuPy is missing or
broken. The verdict is cached; when CuPy cannot be used, the reason given is the real one (a
missing package, a failed import of an installed one, no visible device, an NVRTC error).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..neuron import lif_backward_torch, lif_forward_torch

__all__ = ["is_available", "unavailable_reason", "require_available", "kernel_source",
           "LIFCupyFunction"]

_SOURCE_PATH = Path(__file__).with_name("lif_kernel.cu")
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_THREADS = 256
_COMPILE_OPTIONS = ("--std=c++14",)

_verdict: tuple[bool, str | None] | None = None  # (available, reason) once probed
_modules: dict[int, object] = {}  # device index -> compiled cupy.RawModule


def kernel_source() -> str:
    return _SOURCE_PATH.read_text(encoding="utf-8")


def _reset_cache() -> None:
    """Forget the probe result and the compiled modules (tests)."""
    global _verdict
    _verdict = None
    _modules.clear()


def _import_cupy():
    import cupy

    return cupy


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
            return False, "cupy is not installed (pip install 'qkformer[cuda]' / cupy-cuda12x)"
        return False, f"cupy failed to import: {type(e).__name__}: {e}"
    except Exception as e:  # ImportError from missing CUDA libraries, a version mismatch, ...
        return False, f"cupy failed to import: {type(e).__name__}: {e}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, driver older than CuPy's runtime, ...
        return False, f"no CUDA device visible to CuPy ({type(e).__name__}: {e})"
    if count == 0:
        return False, "no CUDA device visible to CuPy"
    if not torch.cuda.is_available():
        return False, "CuPy sees a CUDA device but torch does not (CPU-only torch build?)"
    try:
        _module(torch.cuda.current_device())
    except Exception as e:  # cupy.cuda.compiler.CompileException carries the NVRTC log
        return False, f"compiling {_SOURCE_PATH.name} failed: {type(e).__name__}: {e}"
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


class _TorchStream:
    """Torch's stream handle behind the CUDA stream protocol (CuPy >= 14 ``from_external``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _launch(name: str, device: torch.device, n: int, args: tuple) -> None:
    if n == 0:
        return
    cupy = _import_cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = _module(index).get_function(name)
    ptr = torch.cuda.current_stream(device).cuda_stream
    # Launch on torch's current stream: ordering with the surrounding torch ops comes for free
    # and no synchronisation is needed.
    if hasattr(cupy.cuda.Stream, "from_external"):
        stream = cupy.cuda.Stream.from_external(_TorchStream(ptr))
    else:  # CuPy < 14
        stream = cupy.cuda.ExternalStream(ptr)
    with cupy.cuda.Device(index), stream:
        kernel(((n + _THREADS - 1) // _THREADS,), (_THREADS,), args)


def _f32(value: float):
    return np.float32(value)  # a Python float would be passed as a double


def _threshold(v_threshold: float, dtype: torch.dtype):
    # torch compares a tensor with a Python scalar in the tensor's dtype: round the threshold
    # through it so 16-bit spikes flip where torch's would.
    return _f32(torch.tensor(v_threshold, dtype=dtype).item())


def _forward(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool):
    T, n = x.shape[0], x.numel() // max(x.shape[0], 1)
    spikes = torch.empty_like(x)
    h_seq = torch.empty_like(x) if save_h else None
    _launch(f"lif_forward_{_SUFFIX[x.dtype]}", x.device, n,
            (x.data_ptr(), spikes.data_ptr(), h_seq.data_ptr() if save_h else 0, np.int64(n),
             np.int32(T), _f32(tau), _threshold(v_threshold, x.dtype)))
    return spikes, h_seq


def _backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset):
    T, n = h_seq.shape[0], h_seq.numel() // max(h_seq.shape[0], 1)
    grad_x = torch.empty_like(h_seq)
    _launch(f"lif_backward_{_SUFFIX[h_seq.dtype]}", h_seq.device, n,
            (grad_spikes.data_ptr(), h_seq.data_ptr(), grad_x.data_ptr(), np.int64(n),
             np.int32(T), _f32(tau), _f32(1.0 - 1.0 / tau), _threshold(v_threshold, h_seq.dtype),
             _f32(alpha), np.int32(bool(detach_reset))))
    return grad_x


class LIFCupyFunction(torch.autograd.Function):
    """Same contract as ``neuron.LIFTorchFunction``: spikes out, only H saved for backward.

    Types without a kernel (float64) run the torch backend's loops instead, so a caller never has
    to special-case them.
    """

    @staticmethod
    def forward(ctx, x, tau, v_threshold, alpha, detach_reset):
        if not x.is_cuda:
            raise RuntimeError(f"LIF backend 'cupy' needs a CUDA tensor, got one on {x.device}")
        if x.dim() < 2:
            raise ValueError(f"LIF input must be [T, ...], got shape {tuple(x.shape)}")
        ctx.params = (tau, v_threshold, alpha, detach_reset)
        ctx.use_kernel = x.dtype in _SUFFIX
        save_h = ctx.needs_input_grad[0]
        if ctx.use_kernel:
            spikes, h_seq = _forward(x.contiguous(), tau, v_threshold, save_h)
        else:
            spikes, h_seq = lif_forward_torch(x, tau, v_threshold)[:2]
        if save_h:
            ctx.save_for_backward(h_seq)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors
        run = _backward if ctx.use_kernel else lif_backward_torch
        grad_x = run(grad_spikes.reshape(h_seq.shape).contiguous(), h_seq, *ctx.params)
        return grad_x.view(grad_spikes.shape), None, None, None, None
