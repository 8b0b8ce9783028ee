"""Fused spiking layers of the fast path, on token-major tensors (channels innermost).

A *spiking unit* is the pattern every QKFormer layer is made of:
convolution (1x1 as one GEMM over all tokens, or k x k) -> BatchNorm -> [MaxPool 3/2/1] -> LIF.
:func:`spiking_unit` runs it as one autograd node: one pass over the GEMM output for BatchNorm
and the neuron forward, one pass back, and it keeps for the backward pass only

* its input, compactly (:func:`pack`): spikes as 1 bit, small integer counts (the residual
  stream) as 1 byte, both checked, with the original kept where a check fails (in a compiled
  graph, which cannot branch on the check, a failed check is an error);
* the GEMM output (float) and the batch statistics, from which BatchNorm, the pool's argmax and
  the LIF charges are recomputed in the backward pass (cheaper than storing them).

:func:`qk_attention` (QKTA/QKCA mask) and :func:`ssa_attention` (q (kᵀ v) -> LIF) are the
attention cores, stored the same way. Each is a ``torch.library`` custom op with a fake kernel
and an autograd formula, so ``torch.compile(fullgraph=True)`` sees single opaque nodes.

Each pass has three routes (:func:`route`): on CPU the compiled kernels of :mod:`qkformer.cpu`;
on CUDA the Triton kernels of :mod:`qkformer.triton_units` (after a self-check against the torch
route, per device and dtype); elsewhere (no C++ compiler, no Triton, a failed self-check) the
same algorithm in torch ops with the LIF of :mod:`qkformer.neuron`, backend 'auto'. A ``MultiStepLIF``'s own ``backend`` setting
applies to the reference path, where the module itself runs.
The formulas equal the reference modules' (``nn.BatchNorm*`` in train and eval mode, the
multistep LIF, ``max_pool2d``) up to floating-point rounding; the tests hold them to the
reference path in float64.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from . import cpu, kernel_ops, sparse, triton_units
from .kernel_ops import kernel_op
from .neuron import lif_backward, lif_forward

__all__ = ["ANALOG", "SPIKES", "COUNTS", "route", "forced_route", "fast_path_ready", "describe", "pack", "unpack", "compact_storage",
           "compact_storage_enabled", "batch_stats", "bn_lif_forward", "bn_lif_backward",
           "spiking_unit", "qk_attention", "ssa_attention"]

# What a unit's input holds, which decides how it is kept for backward.
ANALOG, SPIKES, COUNTS = 0, 1, 2
_FORMATS = (None, "bits", "u8")  # how each kind is stored: itself, or packed (see pack())

_state = threading.local()


def compact_storage_enabled() -> bool:
    return getattr(_state, "compact", True)


@contextlib.contextmanager
def compact_storage(enabled: bool):
    """Turn compact storage of saved inputs on or off (on by default) within the block.
    Off keeps every saved input as it is: the results are bit-identical, only memory differs."""
    previous = compact_storage_enabled()
    _state.compact = enabled
    try:
        yield
    finally:
        _state.compact = previous


ROUTES = ("cpu", "triton", "torch")


def route(t: Tensor) -> str:
    """Which kernels run the passes on ``t``: 'cpu' (compiled CPU kernels), 'triton' (the
    self-checked Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
    or 'torch' (the same algorithm in torch ops)."""
    forced = getattr(_state, "route", None)
    if forced is not None:
        return forced
    if cpu.supports(t):
        return "cpu"
    if _triton_serves(t.device, t.dtype):
        return "triton"
    return "torch"


@contextlib.contextmanager
def forced_route(name: Optional[str]):
    """Run every pass on route ``name`` within the block (tests, the self-check); None: the
    usual choice."""
    if name is not None and name not in ROUTES:
        raise ValueError(f"unknown route {name!r}; expected one of {ROUTES}")
    previous = getattr(_state, "route", None)
    _state.route = name
    if name == "triton" and not triton_units.interpreting():
        kernel_ops.prepare_traced()
    try:
        yield
    finally:
        _state.route = previous


def _triton_route_for(device: torch.device, dtype: torch.dtype) -> bool:
    """The Triton route serves tensors of ``dtype`` on ``device`` (forced or chosen)."""
    return route(torch.empty(0, dtype=dtype, device=device)) == "triton"


def _kernels(t: Tensor) -> bool:
    return route(t) == "cpu"


def _triton(t: Tensor) -> bool:
    return route(t) == "triton"


def _traced_route(device: torch.device, dtype: torch.dtype) -> bool:
    """The Triton route with JIT-compiled kernels serves ``dtype`` on ``device``: there
    torch.compile traces through the ops (:mod:`qkformer.kernel_ops`); the interpreter's
    kernels cannot be traced."""
    return not triton_units.interpreting() and _triton_route_for(device, dtype)


_AMP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fast_path_ready(device) -> bool:
    """Whether the fast path is the faster route on ``device``: on the CPU (compiled kernels,
    or their torch-op form), and on CUDA where the Triton units pass their self-check for
    float32 and both 16-bit types. Elsewhere only the torch-op form would run, which by a count
    of launches and bytes (``benchmarks/gpu_cost.py``) is slower on a GPU than the layer-by-layer
    computation with the CUDA LIF kernel: models take the reference path there unless
    ``QKFORMER_CUDA_FAST_PATH=1`` (tests, measurements) asks for the fast path anyway."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if os.environ.get("QKFORMER_CUDA_FAST_PATH", "0") not in ("", "0"):
        return True
    return device.type == "cuda" and all(_triton_serves(device, d) for d in _AMP_DTYPES)


@torch.compiler.assume_constant_result
def _triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    # a constant to torch.compile: a graph traced before any eager call runs the self-check
    # eagerly (it cannot be traced) and takes its verdict as a constant
    ok = (triton_units.serves(device, dtype)
          and triton_units.verdict(device, dtype, _triton_self_check))
    if ok and not triton_units.interpreting():
        kernel_ops.prepare_traced()  # registered here, eagerly: Dynamo cannot trace that
    return ok


def describe(model, device) -> str:
    """One line for the logs: which path ``model`` runs and, on the fast path, with what."""
    if not getattr(model, "fast_path", False):
        return "path: reference (layer by layer)"
    device = torch.device(device)
    checkpointing = ", gradient checkpointing" if getattr(model, "grad_checkpointing", False) else ""
    if not fast_path_ready(device):
        return (f"path: reference (layer by layer, the original's computation) on {device.type}: "
                f"{triton_units.describe(device)}, and the fast path's torch-op form would be "
                f"slower there (QKFORMER_CUDA_FAST_PATH=1 runs it anyway){checkpointing}")
    if device.type != "cpu":
        if _triton_serves(device, torch.float32):
            return (f"path: fast (fused units as Triton kernels, triton "
                    f"{triton_units._triton_version()}{checkpointing})")
        return f"path: fast (fused units in torch ops with the LIF backend above{checkpointing})"
    if cpu.library() is None:
        return (f"path: fast (fused units in torch ops, since the CPU kernels are unavailable: "
                f"{cpu.unavailable_reason()}{checkpointing})")
    forward, weight_grad = sparse.limits()
    spikes = (f"spike-driven products below {forward:.0%} / {weight_grad:.0%} non-zeros "
              f"(forward / weight gradient)" if max(forward, weight_grad) > 0
              else "spike-driven products off")
    n = torch.get_num_threads()
    threads = (f"{n} OpenMP thread{'s' if n != 1 else ''}" if cpu.threaded()
               else "1 thread, built without OpenMP")
    if cpu.isa() != "native":
        threads += f", built for {cpu.isa()}"
    return f"path: fast (fused units, compiled CPU kernels on {threads}, {spikes}{checkpointing})"


def _arith(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


# The kernels read raw memory by the sizes they are given: everything that reaches them is
# checked here first (a wrong dtype or size is a ValueError, a strided view is copied).
def _channels(t: Optional[Tensor], like: Tensor, name: str) -> Optional[Tensor]:
    """A per-channel vector for ``like`` [..., C]: C values of its arithmetic dtype, on its
    device (contiguous)."""
    if t is None:
        return None
    C, dtype = like.shape[-1], _arith(like.dtype)
    if t.numel() != C or t.dtype != dtype or t.device != like.device:
        raise ValueError(f"{name}: expected {C} values of {dtype} on {like.device}, got "
                         f"{t.numel()} of {t.dtype} on {t.device}")
    return t.contiguous().view(C)


def _same_shape(t: Tensor, shape, name: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


# ---------------------------------------------------------------------------------------------
# compact storage
# ---------------------------------------------------------------------------------------------
class _Produced:
    """Compact copies that the kernel producing a tensor wrote beside it (Triton route): the
    bits of a spiking pass's spikes, the bytes (and their check flag) of a residual sum of
    counts. Found again from the tensor a later unit keeps: the same memory, contiguous, of the
    same size and dtype, and unchanged since (views share the version counter). An entry goes
    with its tensor and holds no reference to it."""

    def __init__(self):
        self._by_ptr = {}

    def remember(self, t: Tensor, kind: int, copy) -> None:
        ptr = t.data_ptr()
        self._by_ptr[ptr] = (weakref.ref(t), t._version, t.numel(), t.dtype, kind, copy)
        weakref.finalize(t, self._forget, ptr, id(copy))

    def _forget(self, ptr: int, copy_id: int) -> None:
        entry = self._by_ptr.get(ptr)
        if entry is not None and id(entry[5]) == copy_id:
            del self._by_ptr[ptr]

    def find(self, x: Tensor, kind: int):
        """The copy of ``x`` remembered as ``kind``, else None."""
        entry = self._by_ptr.get(x.data_ptr())
        if entry is None:
            return None
        t, version, n, dtype, k, copy = entry
        if (t() is None or x._version != version or x.numel() != n or x.dtype != dtype
                or k != kind or not x.is_contiguous()):
            return None
        return copy


_produced = _Produced()


class _AddCounts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        out, data, flag = triton_units.add_counts(a, b)
        _produced.remember(out, COUNTS, (data, flag))
        return out

    @staticmethod
    def backward(ctx, g):
        return g, g


def add_counts(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` of spike counts: a residual sum, which the next unit keeps as bytes.

    On the Triton route, when training eagerly with compact storage on, one kernel also writes
    the sum as bytes (and their check), which that unit then keeps instead of packing the sum
    again. Elsewhere a plain addition.

    Shape:
        - Input: two tensors of one shape, dtype and device
        - Output: their sum
    """
    if (compact_storage_enabled() and torch.is_grad_enabled()
            and (a.requires_grad or b.requires_grad) and not torch.compiler.is_compiling()
            and not is_fake(a) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device and a.is_contiguous() and b.is_contiguous() and _triton(a)):
        return _AddCounts.apply(a, b)
    return a + b


def pack(x: Tensor, kind: int) -> Tuple[Tensor, Optional[tuple]]:
    """What to keep of ``x`` for backward: ``(stored tensor, how to restore it)``.

    Spikes -> 1 bit per element, counts -> 1 byte, analog (and anything that fails its check)
    -> ``x`` itself (``how`` None). Off under ``compact_storage(False)``. A compiled graph
    cannot branch on the check, so there a value that does not fit is an error instead
    (:func:`_pack_exact`).

    Args:
        x: the tensor to keep.
        kind: :data:`ANALOG`, :data:`SPIKES` (values 0 or 1) or :data:`COUNTS` (integers 0-255).

    Shape:
        - Input: any
        - Output: uint8 ``[ceil(numel / 8)]`` (bits) or ``[numel]`` (bytes), with ``how`` =
          ``(format, shape, dtype)``; or ``x`` itself with ``how`` None
    """
    if kind == ANALOG or not compact_storage_enabled() or x.numel() == 0:
        return x, None
    if torch.compiler.is_compiling() or is_fake(x):
        return _pack_exact(x, kind), (_FORMATS[kind], x.shape, x.dtype)
    return _pack_now(x, kind)


def _pack_now(x: Tensor, kind: int) -> Tuple[Tensor, Optional[tuple]]:
    flat = x.contiguous().view(-1)
    n = flat.numel()
    if _triton(flat):
        fmt = "bits" if kind == SPIKES else "u8"
        produced = _produced.find(x, kind)
        if produced is not None and kind == SPIKES:  # by the spiking pass: exact, no check
            return produced, (fmt, x.shape, x.dtype)
        if produced is not None:  # by a residual sum, with its check
            record = triton_units.packed(*produced, x)
            return record.data, (fmt, x.shape, x.dtype, record)
        record = triton_units.pack(x.contiguous(), fmt)
        return record.data, (fmt, x.shape, x.dtype, record)
    if kind == SPIKES:
        out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
        if _kernels(flat):
            bad = cpu.kernel("to_bits", flat.dtype)(flat.data_ptr(), out.data_ptr(), n,
                                                     *cpu.Parts(n, 8).args)
        else:
            ok = ((flat == 0) | (flat == 1)).all()
            padded = torch.zeros(out.numel() * 8, dtype=torch.uint8, device=x.device)
            padded[:n] = flat == 1
            weights = 1 << torch.arange(8, dtype=torch.uint8, device=x.device)
            out = (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
            bad = int(not ok)
        fmt = "bits"
    else:
        out = torch.empty(n, dtype=torch.uint8, device=x.device)
        if _kernels(flat):
            bad = cpu.kernel("to_u8", flat.dtype)(flat.data_ptr(), out.data_ptr(),
                                                   *cpu.Parts(n).args)
        else:
            ok = ((flat >= 0) & (flat <= 255) & (flat == flat.round())).all()
            out = flat.clamp(0, 255).to(torch.uint8)
            bad = int(not ok)
        fmt = "u8"
    if bad:  # not what the layer structure promised: keep the exact values
        return x, None
    return out, (fmt, x.shape, x.dtype)


@kernel_op("qkformer::pack_exact",
           traceable=lambda a: _traced_route(a["x"].device, a["x"].dtype))
def _pack_exact(x: Tensor, kind: int) -> Tensor:
    # Inside a compiled graph only the packed copy is kept: the graph cannot choose between it
    # and the original by the check. A value that does not fit (a layer declared the wrong
    # kind) is an error: on the Triton route a device-side assertion, so the host never waits.
    flat = x.contiguous().view(-1)
    if _triton(flat):
        data, flag = triton_units.pack_flagged(flat, _FORMATS[kind])
        torch._assert_async(flag[0] == 0, _NOT_PACKABLE[kind])
        return data
    data, how = _pack_now(flat, kind)
    if how is None:
        raise ValueError(_NOT_PACKABLE[kind])
    return data


_NOT_PACKABLE = (None, "compact storage: a tensor declared as spikes holds a value other than 0 "
                 "and 1", "compact storage: a tensor declared as counts holds a value that is "
                 "not an integer 0-255")


@_pack_exact.register_fake
def _(x, kind):
    n = x.numel()
    return x.new_empty((n + 7) // 8 if kind == SPIKES else n, dtype=torch.uint8)


@kernel_op("qkformer::unpack_exact",
           traceable=lambda a: _traced_route(a["data"].device, a["dtype"]))
def _unpack_exact(data: Tensor, kind: int, shape: List[int], dtype: torch.dtype) -> Tensor:
    return _unpack_now(data, (_FORMATS[kind], torch.Size(shape), dtype))


@_unpack_exact.register_fake
def _(data, kind, shape, dtype):
    return data.new_empty(shape, dtype=dtype)


def _kept(stored: Tensor, how: Optional[tuple]) -> Tuple[Tensor, Optional[tuple]]:
    """What the backward pass reads of a packed input: the packed copy when its device-side
    check is known to have passed, else the original (still referenced until then)."""
    if how is None or len(how) < 4:
        return stored, how
    record = how[3]
    if record.fits():
        return stored, how[:3]
    return record.original, None


def unpack(data: Tensor, how: Optional[tuple]) -> Tensor:
    """Inverse of :func:`pack`: ``unpack(*pack(x, kind))`` equals ``x``. (On the Triton route,
    while the device-side check of the packing is unknown to the host, or when it failed, that
    is the original ``x`` itself.)

    Args:
        data: the stored tensor returned by :func:`pack`.
        how: the restore information returned with it (None: ``data`` is returned as it is).

    Shape:
        - Input: uint8 ``[ceil(numel / 8)]`` or ``[numel]``
        - Output: the packed tensor's shape and dtype (contiguous)
    """
    data, how = _kept(data, how)
    if how is None:
        return data
    if torch.compiler.is_compiling() or is_fake(data):
        return _unpack_exact(data, _FORMATS.index(how[0]), list(how[1]), how[2])
    return _unpack_now(data, how)


def _unpack_now(data: Tensor, how: tuple) -> Tensor:
    fmt, shape, dtype = how[:3]
    n = math.prod(shape)
    if data.dtype != torch.uint8 or data.numel() != ((n + 7) // 8 if fmt == "bits" else n):
        raise ValueError(f"unpack: {data.numel()} values of {data.dtype} do not hold {fmt} of "
                         f"shape {tuple(shape)}")
    data = data.contiguous()
    if _triton(data.new_empty(0, dtype=dtype)):
        return triton_units.unpack(data, fmt, n, dtype).view(shape)
    out = torch.empty(n, dtype=dtype, device=data.device)
    if _kernels(out):
        if fmt == "bits":
            cpu.kernel("from_bits", dtype)(data.data_ptr(), out.data_ptr(), n,
                                           *cpu.Parts(n, 8).args)
        else:
            cpu.kernel("from_u8", dtype)(data.data_ptr(), out.data_ptr(), *cpu.Parts(n).args)
    elif fmt == "bits":
        bits = (data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=data.device)) & 1
        out.copy_(bits.view(-1)[:n])
    else:
        out.copy_(data)
    return out.view(shape)


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics and the fused BN -> [pool] -> LIF passes
# ---------------------------------------------------------------------------------------------
def batch_stats(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over all rows of ``y``, in float64.

    The statistics of ``nn.BatchNorm`` in training mode on the token-major layout (T, B and
    space pooled, docs/original.md Q10), accumulated in float64.

    Args:
        y: token-major values, channels innermost.

    Shape:
        - Input: ``[*, C]``
        - Output: ``(mean, var)``, each ``[C]`` float64
    """
    C = y.shape[-1]
    y2 = y.reshape(-1, C)
    R = y2.shape[0]
    if _kernels(y2) and R > 0:
        y2 = y2.contiguous()  # reshape keeps a strided view where it can; the kernel reads rows
        parts = cpu.Parts(R, work=C)
        shift = y2[0].to(_arith(y2.dtype)).contiguous()
        sums = torch.zeros(2, len(parts), C, dtype=torch.float64)
        cpu.kernel("colstats", y2.dtype)(y2.data_ptr(), C, *parts.args, shift.data_ptr(),
                                         sums[0].data_ptr(), sums[1].data_ptr())
        d, d2 = sums.sum(1) / R
        return shift.double() + d, (d2 - d * d).clamp_min(0)
    var, mean = torch.var_mean(y2.to(_arith(y2.dtype)), dim=0, correction=0)
    return mean.double(), var.double()


def _pool_out(n: int) -> int:
    return (n - 1) // 2 + 1  # MaxPool2d(kernel 3, stride 2, padding 1)


def _geometry(y: Tensor, steps: int, pool: bool, bcast: bool):
    """Sizes of the kernels' problem and the spike output shape."""
    C = y.shape[-1]
    rows = y.shape[0] if pool else y.numel() // max(C, 1)
    if steps < 1 or (pool and y.dim() != 4) or (not bcast and rows % steps):
        raise ValueError(f"no BN-LIF problem for {tuple(y.shape)} over {steps} steps "
                         f"(pool={pool}, bcast={bcast})")
    if pool:
        N, H, W = y.shape[0], y.shape[1], y.shape[2]
        B = N if bcast else N // steps
        out_shape = (steps * B, _pool_out(H), _pool_out(W), C)
        return dict(C=C, B=B, H=H, W=W, Ho=out_shape[1], Wo=out_shape[2]), out_shape
    if bcast:
        M = y.numel() // C
        return dict(C=C, M=M), (steps * y.shape[0], *y.shape[1:])
    return dict(C=C, M=y.numel() // (steps * C)), tuple(y.shape)


def _to_nchw(t: Tensor) -> Tensor:  # [N, H, W, C] -> the same memory as an NCHW channels-last tensor
    return t.permute(0, 3, 1, 2)


def _from_nchw(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1)


def _affine_torch(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    z = y.to(_arith(y.dtype))
    return z if scale is None else torch.addcmul(shift, z, scale)


def bn_lif_forward(y: Tensor, steps: int, scale: Optional[Tensor], shift: Optional[Tensor],
                   tau: float, v_threshold: float, pool: bool = False, bcast: bool = False) -> Tensor:
    """Spikes of LIF(pool?(y * scale + shift)) in one pass over ``y``, without autograd.

    The time axis is t-major: ``y``'s leading extent splits into ``steps`` equal parts, or,
    with ``bcast``, all of ``y`` is the input at each of ``steps`` steps.

    Args:
        y: the conv/GEMM output, token-major.
        steps: LIF time steps.
        scale, shift: per-channel BatchNorm affine in the arithmetic dtype (float32; float64
            for float64 ``y``), or both None for no BatchNorm.
        tau, v_threshold: the LIF's constants.
        pool: MaxPool2d(3, 2, 1) between BatchNorm and LIF. Default: False
        bcast: repeat ``y`` over the steps. Default: False

    Shape:
        - Input: ``y`` ``[*, C]``, its rows t-major and a multiple of ``steps`` in number (any
          number with ``bcast``); with ``pool`` ``[steps * B, H, W, C]`` (``[B, H, W, C]``)
        - Output: spikes in ``y``'s dtype, shaped like ``y`` (``[steps * M, *]`` for ``y``
          ``[M, *]`` with ``bcast``); with ``pool`` ``[steps * B, H', W', C]``,
          H' = (H - 1) // 2 + 1
    """
    g, out_shape = _geometry(y, steps, pool, bcast)
    C = g["C"]
    if (scale is None) != (shift is None):
        raise ValueError("bn_lif_forward: scale and shift go together")
    scale, shift = _channels(scale, y, "scale"), _channels(shift, y, "shift")
    if _triton(y):
        y = y.contiguous()
        s = torch.empty(out_shape, dtype=y.dtype, device=y.device)
        triton_units.bn_lif_forward(y, s, steps, g, scale, shift, tau, v_threshold, pool, bcast)
        return s
    if _kernels(y):
        y = y.contiguous()
        s = torch.empty(out_shape, dtype=y.dtype)
        if pool:
            y_step = 0 if bcast else g["B"] * g["H"] * g["W"] * C
            cpu.kernel("bn_pool_lif_fwd", y.dtype)(
                y.data_ptr(), s.data_ptr(), steps, g["B"], g["H"], g["W"], C, g["Ho"], g["Wo"],
                y_step, *cpu.Parts(g["B"], work=steps * g["H"] * g["W"] * C).args, _ptr(scale),
                _ptr(shift), tau, v_threshold)
        else:
            M = g["M"]
            cpu.kernel("bn_lif_fwd", y.dtype)(
                y.data_ptr(), s.data_ptr(), steps, M, C, 0 if bcast else M * C,
                *cpu.Parts(M, work=steps * C).args, _ptr(scale), _ptr(shift), tau, v_threshold)
        return s
    z = _affine_torch(y, scale, shift)
    if pool:
        z = _from_nchw(F.max_pool2d(_to_nchw(z), 3, 2, 1))
    if bcast:
        z = z.unsqueeze(0).expand(steps, *z.shape)
    spikes, _ = lif_forward(z.reshape(steps, -1), tau, v_threshold, save_h=False)
    return spikes.to(y.dtype).reshape(out_shape)


def bn_lif_backward(grad: Tensor, y: Tensor, steps: int, scale: Optional[Tensor],
                    shift: Optional[Tensor], tau: float, v_threshold: float, alpha: float,
                    detach_reset: bool, pool: bool = False, bcast: bool = False,
                    sums: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Backward pass of :func:`bn_lif_forward`: the gradient with respect to Z = y * scale + shift.

    The LIF charges and the pool's argmax are recomputed from ``y`` rather than stored. With
    ``bcast`` the gradient is summed over the steps. With ``sums`` it also returns the
    per-channel ``[sum(g_Z), sum(g_Z * y)]`` that the BatchNorm backward needs, from the same
    pass.

    Args:
        grad: gradient of the spikes, with their number of elements.
        y, steps, scale, shift, tau, v_threshold, pool, bcast: as for :func:`bn_lif_forward`.
        alpha: slope of the sigmoid surrogate.
        detach_reset: treat the spike inside the reset as a constant.
        sums: also compute the per-channel sums. Default: False

    Shape:
        - Input: ``grad`` with the elements of :func:`bn_lif_forward`'s output
        - Output: ``(g_Z, sums)``: ``g_Z`` shaped like ``y`` in the arithmetic dtype (float32;
          float64 for float64 ``y``); ``sums`` ``[2, C]`` float64, or None
    """
    g, out_shape = _geometry(y, steps, pool, bcast)
    C = g["C"]
    if (scale is None) != (shift is None):
        raise ValueError("bn_lif_backward: scale and shift go together")
    scale, shift = _channels(scale, y, "scale"), _channels(shift, y, "shift")
    if math.prod(grad.shape) != math.prod(out_shape):
        raise ValueError(f"bn_lif_backward: a gradient of shape {tuple(grad.shape)} for spikes "
                         f"of shape {tuple(out_shape)}")
    if _triton(y):
        y = y.contiguous()
        grad = grad.to(y.dtype).contiguous()
        if pool:
            gz = torch.empty(y.shape, dtype=_arith(y.dtype), device=y.device)
            part = triton_units.pool_lif_backward(grad, y, steps, g, scale, shift, tau,
                                                  v_threshold, alpha, detach_reset, bcast, gz,
                                                  sums)
        else:
            gz = torch.empty(y.shape, dtype=_arith(y.dtype), device=y.device)
            triton_units.bn_lif_backward(grad, y, steps, g, scale, shift, tau, v_threshold, alpha,
                                         detach_reset, bcast, False, out=gz)
            part = (triton_units.bn_lif_backward(grad, y, steps, g, scale, shift, tau,
                                                 v_threshold, alpha, detach_reset, bcast, True)
                    if sums else None)
        return gz, (part.sum(0) if sums else None)
    if _kernels(y):
        y = y.contiguous()
        grad = grad.to(y.dtype).contiguous()
        gz = torch.empty(y.shape, dtype=_arith(y.dtype))
        if pool:
            parts = cpu.Parts(g["B"], work=steps * g["H"] * g["W"] * C)
            y_step = 0 if bcast else g["B"] * g["H"] * g["W"] * C
            psum = torch.zeros(len(parts), 2 * C, dtype=torch.float64) if sums else None
            cpu.kernel("bn_pool_lif_bwd", y.dtype)(
                grad.data_ptr(), y.data_ptr(), gz.data_ptr(), steps, g["B"], g["H"], g["W"], C,
                g["Ho"], g["Wo"], y_step, *parts.args, _ptr(scale), _ptr(shift), tau,
                v_threshold, alpha, int(detach_reset), _ptr(psum))
        else:
            M = g["M"]
            parts = cpu.Parts(M, work=steps * C)
            psum = torch.zeros(len(parts), 2 * C, dtype=torch.float64) if sums else None
            cpu.kernel("bn_lif_bwd", y.dtype)(
                grad.data_ptr(), y.data_ptr(), gz.data_ptr(), steps, M, C, 0 if bcast else M * C,
                0 if bcast else M * C, *parts.args, _ptr(scale), _ptr(shift), tau, v_threshold,
                alpha, int(detach_reset), _ptr(psum))
        return gz, (psum.sum(0).view(2, C) if sums else None)
    z = _affine_torch(y, scale, shift)
    indices = None
    if pool:
        pooled, indices = F.max_pool2d(_to_nchw(z), 3, 2, 1, return_indices=True)
        zp = _from_nchw(pooled)
    else:
        zp = z
    if bcast:
        zp = zp.unsqueeze(0).expand(steps, *zp.shape)
    _, h = lif_forward(zp.reshape(steps, -1).contiguous(), tau, v_threshold, save_h=True)
    gzp = lif_backward(grad.reshape(steps, -1).to(h.dtype).contiguous(), h, tau,
                             v_threshold, alpha, detach_reset)
    gzp = gzp.reshape(zp.shape)
    if bcast:
        gzp = gzp.sum(0)
    if pool:
        gz = _from_nchw(torch.ops.aten.max_pool2d_with_indices_backward(
            _to_nchw(gzp), _to_nchw(z), [3, 3], [2, 2], [1, 1], [1, 1], False, indices))
    else:
        gz = gzp
    gz = gz.contiguous()
    if not sums:
        return gz, None
    g2, y2 = gz.reshape(-1, C).double(), y.reshape(-1, C).double()
    return gz, torch.stack([g2.sum(0), (g2 * y2).sum(0)])


def _bn_input_grad(gz: Tensor, y: Tensor, a: Optional[Tensor], b: Optional[Tensor],
                   mu: Optional[Tensor], d: Optional[Tensor]) -> Tensor:
    """g_Y = a g_Z + b (y - mu) + d per channel (b None: a g_Z; a None: g_Z), in y's dtype."""
    C = y.shape[-1]
    _same_shape(gz, y.shape, "BN input gradient")
    a, b, mu, d = (_channels(t, y, n) for t, n in zip((a, b, mu, d), "a b mu d".split()))
    if b is not None and (a is None or mu is None or d is None):
        raise ValueError("BN input gradient: b needs a, mu and d")
    if _kernels(y):
        y = y.contiguous()
        if gz.dtype != _arith(y.dtype):
            raise ValueError(f"BN input gradient: g_Z in {gz.dtype}, expected {_arith(y.dtype)}")
        gz = gz.contiguous()
        out = gz if gz.dtype == y.dtype else torch.empty(y.shape, dtype=y.dtype)
        if a is None and out is gz:
            return out
        R = y.numel() // C
        cpu.kernel("bn_bwd_apply", y.dtype)(
            gz.data_ptr(), y.data_ptr(), out.data_ptr(), C, *cpu.Parts(R, work=C).args, _ptr(a),
            _ptr(b), _ptr(mu), _ptr(d))
        return out
    if a is None:
        return gz.to(y.dtype)
    out = gz * a
    if b is not None:
        out = out + b * (y.to(out.dtype) - mu) + d
    return out.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# the spiking unit: GEMM/conv -> BN -> [pool] -> LIF
# ---------------------------------------------------------------------------------------------
def _gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: int, stride: int,
          x_kind: int = ANALOG) -> Tensor:
    """1x1 projection over tokens (``kernel_size`` 0: ``x`` [..., Cin]) or a convolution of
    ``x`` [N, H, W, Cin] (padding k // 2); output token-major. Spike and count inputs that are
    sparse enough go through the spike-driven product (:mod:`qkformer.sparse`)."""
    if x_kind != ANALOG and sparse.enabled(x.dtype, x.device) and sparse.max_density() > 0:
        csr = sparse.csr_from_dense(x)
        if csr is not None:
            return sparse.forward(csr, x.shape, weight, bias, kernel_size, stride)
    if kernel_size == 0:
        w2 = weight.reshape(weight.shape[0], -1)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, w2.t()) if bias is not None else x2 @ w2.t()
        return y.view(*x.shape[:-1], w2.shape[0])
    y = F.conv2d(_to_nchw(x), weight, bias, stride, kernel_size // 2)
    return _from_nchw(y).contiguous()  # a no-op: the output is channels-last already


def _input_grad(gy: Tensor, x_shape, x_dtype, weight: Tensor, kernel_size: int,
                stride: int) -> Tensor:
    """Gradient with respect to the input of :func:`_gemm`: needs the weights, not the input."""
    if kernel_size == 0:
        w2 = weight.reshape(weight.shape[0], -1)
        return (gy.reshape(-1, gy.shape[-1]) @ w2).view(x_shape)
    N, H, W, C = x_shape
    # a stand-in of the input's shape and layout: only the weights and gy are read
    stand_in = torch.empty((N, H, W, C), dtype=gy.dtype, device=gy.device)
    gx, _, _ = torch.ops.aten.convolution_backward(
        _to_nchw(gy), _to_nchw(stand_in), weight, None, [stride, stride], [kernel_size // 2] * 2,
        [1, 1], False, [0, 0], 1, [True, False, False])
    return _from_nchw(gx).to(x_dtype)


def _weight_grad(gy: Tensor, x: Tensor, weight: Tensor, kernel_size: int, stride: int) -> Tensor:
    if kernel_size == 0:
        g2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
        return (g2.t() @ x2).view(weight.shape)
    _, gw, _ = torch.ops.aten.convolution_backward(
        _to_nchw(gy), _to_nchw(x), weight, None, [stride, stride], [kernel_size // 2] * 2,
        [1, 1], False, [0, 0], 1, [False, True, False])
    return gw


def _per_channel(y: Tensor, steps: int, bcast: bool) -> int:
    """How many values of each channel BatchNorm's batch statistics of the conv output ``y``
    are taken over (with ``bcast`` y is one image batch repeated over the steps)."""
    return y.numel() // y.shape[-1] * (steps if bcast else 1)


def _no_stats(y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    # the statistics outputs of a unit without BatchNorm: three distinct empty tensors
    return tuple(torch.zeros(0, dtype=torch.float64, device=y.device) for _ in range(3))


def _unit_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kernel_size,
                  stride, pool, steps, bcast, use_bn, batch_stats_, eps, tau, v_threshold, alpha,
                  detach_reset, x_kind, gemm_dtype, spike_bits, running):
    """The unit's forward (:func:`_spiking_unit`'s arguments). ``running``
    (:data:`triton_units.Running`, Triton route only): the statistics kernel also updates the
    BatchNorm buffers, in place; the op itself passes None, as an op with autograd must not
    mutate its inputs."""
    w_cast = weight.new_empty(0)
    bits = x.new_empty(0, dtype=torch.uint8)
    if running is not None:
        if not (use_bn and batch_stats_ and _triton_route_for(x.device, gemm_dtype or x.dtype)):
            raise ValueError("spiking_unit: running statistics are updated in the kernels of "
                             "the Triton route, from batch statistics")
    with torch.autocast(x.device.type, enabled=False):
        if gemm_dtype is not None:
            x, weight = x.to(gemm_dtype), weight.to(gemm_dtype)
            bias = bias.to(gemm_dtype) if bias is not None else None
            w_cast = weight
        stats = None
        if (kernel_size == 0 and use_bn and batch_stats_ and not pool and _triton(x)
                and triton_units.gemms_enabled() and x.dtype == weight.dtype):
            # the statistics from the GEMM's epilogue; taken about the running mean where there
            # is one (a shift that keeps E[d^2] - E[d]^2 free of cancellation)
            ref = (torch.cat([grp[0] for grp in running[0]]) if running is not None
                   else torch.zeros(weight.shape[0], device=x.device)).to(x.dtype)
            y2, part = triton_units.linear_stats(x.reshape(-1, x.shape[-1]).contiguous(),
                                                 weight.reshape(weight.shape[0], -1), bias, ref)
            y, stats = y2.view(*x.shape[:-1], -1), (part, ref)
        else:
            y = _gemm(x, weight, bias, kernel_size, stride,
                      x_kind if gemm_dtype is None else ANALOG)
        if running is not None:
            running = (*running, _per_channel(y, steps, bcast))
        A = _arith(y.dtype)
        if spike_bits and (pool or not _triton(y)):
            raise ValueError("spiking_unit: spike_bits needs the unpooled Triton route")
        if _triton(y) and not pool:  # BatchNorm's coefficients computed in the spiking pass
            g, out_shape = _geometry(y, steps, pool, bcast)
            spikes = torch.empty(out_shape, dtype=y.dtype, device=y.device)
            if spike_bits:
                bits = torch.empty(spikes.numel() // 8, dtype=torch.uint8, device=y.device)
            packed = bits if spike_bits else None
            if use_bn:
                mean, var, invstd = triton_units.bn_lif_forward_bn(
                    y, spikes, steps, g, batch_stats_, running_mean, running_var, bn_weight,
                    bn_bias, eps, tau, v_threshold, bcast, packed, running, stats)
            else:
                mean, var, invstd = _no_stats(y)
                triton_units.bn_lif_forward(y.contiguous(), spikes, steps, g, None, None, tau,
                                            v_threshold, False, bcast, packed)
            return spikes, y, mean, var, invstd, w_cast, bits
        if not use_bn:
            mean, var, invstd = _no_stats(y)
            scale = shift = None
        elif _triton(y):  # pooled
            mean, var, invstd, scale, shift = triton_units.colstats_coefficients(
                y.reshape(-1, y.shape[-1]), batch_stats_, running_mean, running_var, bn_weight,
                bn_bias, eps, running)
        else:
            if batch_stats_:
                mean, var = batch_stats(y)
            else:
                mean, var = running_mean.double(), running_var.double()
            mean, var = mean.clone(), var.clone()  # never an alias of an input
            invstd = (var + eps).rsqrt()
            _, scale, shift = _bn_affine(bn_weight, bn_bias, mean, invstd, A)
        spikes = bn_lif_forward(y, steps, scale, shift, tau, v_threshold, pool, bcast)
    return spikes, y, mean, var, invstd, w_cast, bits


@kernel_op("qkformer::spiking_unit",
           traceable=lambda a: _traced_route(a["x"].device, a["gemm_dtype"] or a["x"].dtype))
def _spiking_unit(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                  bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], kernel_size: int, stride: int, pool: bool,
                  steps: int, bcast: bool, use_bn: bool, batch_stats_: bool,
                  eps: float, tau: float, v_threshold: float, alpha: float,
                  detach_reset: bool, x_kind: int, gemm_dtype: Optional[torch.dtype],
                  spike_bits: bool
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Functional (autograd needs that): the batch statistics are returned, and the caller
    # updates the running ones. alpha, detach_reset (the surrogate) and x_kind (how to keep x)
    # are for the backward pass, and so is the weight cast to gemm_dtype (empty when there is
    # no cast): the backward pass reuses it instead of casting again. spike_bits (the Triton
    # route, unpooled): the spiking pass also writes the spikes as bits, returned last (else
    # an empty tensor), which the next unit keeps instead of packing them again.
    return _unit_forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                         kernel_size, stride, pool, steps, bcast, use_bn, batch_stats_, eps, tau,
                         v_threshold, alpha, detach_reset, x_kind, gemm_dtype, spike_bits, None)


@_spiking_unit.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, pool,
      steps, bcast, use_bn, batch_stats_, eps, tau, v_threshold, alpha, detach_reset, x_kind,
      gemm_dtype, spike_bits):
    dtype = gemm_dtype or x.dtype
    cout = weight.shape[0]
    if kernel_size == 0:
        y = x.new_empty((*x.shape[:-1], cout), dtype=dtype)
    else:
        N, H, W = x.shape[0], x.shape[1], x.shape[2]
        pad = kernel_size // 2
        Hy = (H + 2 * pad - kernel_size) // stride + 1
        Wy = (W + 2 * pad - kernel_size) // stride + 1
        y = x.new_empty((N, Hy, Wy, cout), dtype=dtype)
    _, out_shape = _geometry(y, steps, pool, bcast)
    stats = cout if use_bn else 0
    w_cast = weight.new_empty(weight.shape if gemm_dtype is not None else 0, dtype=dtype)
    bits = x.new_empty(math.prod(out_shape) // 8 if spike_bits else 0, dtype=torch.uint8)
    return (y.new_empty(out_shape), y, *(x.new_empty(stats, dtype=torch.float64) for _ in range(3)),
            w_cast, bits)


def _unit_setup(ctx, inputs, output):
    (x, weight, bias, bn_weight, bn_bias, running_mean, running_var, kernel_size, stride, pool,
     steps, bcast, use_bn, batch_stats_, eps, tau, v_threshold, alpha, detach_reset, x_kind,
     gemm_dtype, _) = inputs
    _, y, mean, var, invstd, w_cast, bits = output
    stored, ctx.x_how = pack(x, x_kind)
    ctx.x_shape, ctx.x_dtype, ctx.x_kind = tuple(x.shape), x.dtype, x_kind
    ctx.save_for_backward(stored, weight, bn_weight, bn_bias, y, mean, invstd,
                          w_cast if gemm_dtype is not None else None)
    ctx.cfg = (kernel_size, stride, pool, steps, bcast, use_bn, batch_stats_, tau, v_threshold,
               alpha, detach_reset, gemm_dtype, bias is not None)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(y, mean, var, invstd, w_cast, bits)
    # no gradient flows into y and the statistics: autograd must not build (and page in)
    # a zero tensor the size of y for every unit
    ctx.set_materialize_grads(False)


def _bn_affine(bn_weight, bn_bias, mean: Tensor, invstd: Tensor, A: torch.dtype):
    """BatchNorm as Z = y scale + shift: (scale in float64, scale and shift in ``A``)."""
    gamma = bn_weight.double() if bn_weight is not None else torch.ones_like(invstd)
    beta = bn_bias.double() if bn_bias is not None else torch.zeros_like(invstd)
    scale64 = gamma * invstd
    return scale64, scale64.to(A), (beta - mean * scale64).to(A)


def _unit_input_grad(grad, y, mean, invstd, bn_weight, bn_bias, steps, pool, bcast, use_bn,
                     batch_stats_, tau, v_threshold, alpha, detach_reset, need):
    """The unit's gradient with respect to its conv output y, and those of gamma and beta
    (None where not wanted), on the CPU-kernel or torch-op route."""
    A = _arith(y.dtype)
    scale64, scale, shift = (_bn_affine(bn_weight, bn_bias, mean, invstd, A) if use_bn
                             else (None, None, None))
    gz, sums = bn_lif_backward(grad, y, steps, scale, shift, tau, v_threshold, alpha,
                               detach_reset, pool, bcast, sums=use_bn)
    g_gamma = g_beta = None
    if use_bn:
        sum_gz, sum_gzy = sums[0].clone(), sums[1].clone()
        gzxhat = invstd * (sum_gzy - mean * sum_gz)  # sum(g_Z * x_hat)
        if need[3] and bn_weight is not None:
            g_gamma = gzxhat.to(bn_weight.dtype)
        if need[4] and bn_bias is not None:
            g_beta = sum_gz.to(bn_bias.dtype)
        if batch_stats_:  # the batch statistics depend on y too
            n = _per_channel(y, steps, bcast)
            rep = steps if bcast else 1
            b = (-scale64 * invstd * gzxhat / n * rep).to(A)
            d = (-scale64 * sum_gz / n * rep).to(A)
            gy = _bn_input_grad(gz, y, scale, b, mean.to(A), d)
        else:
            gy = _bn_input_grad(gz, y, scale, None, None, None)
    else:
        gy = _bn_input_grad(gz, y, None, None, None, None)
    return gy, g_gamma, g_beta


def _unit_input_grad_triton(grad, y, mean, invstd, bn_weight, bn_bias, steps, pool, bcast,
                            use_bn, batch_stats_, tau, v_threshold, alpha, detach_reset, need,
                            bias_grad=None):
    """:func:`_unit_input_grad` in Triton kernels: the BatchNorm sums in one pass, then the
    input gradient (and gamma's and beta's) in a second pass that recomputes g_Z. The pooled
    unit keeps g_Z instead (its gather is not worth recomputing). ``bias_grad`` (unpooled
    units): filled with the gradient of the convolution's bias, summed by the pass that writes
    the input gradient."""
    g, _ = _geometry(y, steps, pool, bcast)
    y = y.contiguous()
    grad = grad.to(y.dtype).contiguous()
    gy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    lif = (tau, v_threshold, alpha, detach_reset, bcast)
    rep = steps if bcast else 1
    n = _per_channel(y, steps, bcast)
    want_gamma = need[3] and bn_weight is not None
    want_beta = need[4] and bn_bias is not None
    if not pool:
        if not use_bn:
            triton_units.bn_lif_backward(grad, y, steps, g, None, None, *lif, False, out=gy,
                                         bias_grad=bias_grad)
            return gy, None, None
        bn = (bn_weight, bn_bias, mean, invstd)
        part = triton_units.bn_lif_backward(grad, y, steps, g, None, None, *lif, True, bn=bn)
        g_gamma = torch.empty_like(bn_weight) if want_gamma else None
        g_beta = torch.empty_like(bn_bias) if want_beta else None
        triton_units.bn_lif_backward(grad, y, steps, g, None, None, *lif, False, out=gy, bn=bn,
                                     bias_grad=bias_grad,
                                     apply=(part, n, rep, batch_stats_, g_gamma, g_beta))
        return gy, g_gamma, g_beta
    scale, shift = (triton_units.bn_affine(bn_weight, bn_bias, mean, invstd, y.dtype) if use_bn
                    else (None, None))
    g_gamma = torch.empty_like(bn_weight) if want_gamma else None
    g_beta = torch.empty_like(bn_bias) if want_beta else None
    triton_units.pool_lif_backward(grad, y, steps, g, scale, shift, *lif, gy, apply=(
        bn_weight, mean, invstd, n, rep, batch_stats_, g_gamma, g_beta) if use_bn else None)
    return gy, g_gamma, g_beta


@kernel_op("qkformer::spiking_unit_backward",
           traceable=lambda a: _traced_route(a["y"].device, a["y"].dtype))
def _spiking_unit_backward(grad: Tensor, stored: Tensor, x_format: int, x_shape: List[int],
                           x_dtype: torch.dtype, x_kind: int, weight: Tensor,
                           w_cast: Optional[Tensor], bn_weight: Optional[Tensor],
                           bn_bias: Optional[Tensor], y: Tensor,
                           mean: Tensor, invstd: Tensor, kernel_size: int, stride: int, pool: bool,
                           steps: int, bcast: bool, use_bn: bool, batch_stats_: bool, tau: float,
                           v_threshold: float, alpha: float, detach_reset: bool,
                           gemm_dtype: Optional[torch.dtype], has_bias: bool,
                           need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`_spiking_unit` for (x, weight, bias, bn_weight, bn_bias); those not
    in ``need`` are empty. ``stored``/``x_format`` hold the unit's input as :func:`pack` kept it;
    ``w_cast`` is the weight as the forward pass cast it to ``gemm_dtype`` (None: no cast)."""
    how = None if x_format == 0 else (_FORMATS[x_format], torch.Size(x_shape), x_dtype)
    with torch.autocast(y.device.type, enabled=False):
        args = (grad, y, mean, invstd, bn_weight, bn_bias, steps, pool, bcast, use_bn,
                batch_stats_, tau, v_threshold, alpha, detach_reset, need)
        gb = None
        if not _triton(y):
            gy, g_gamma, g_beta = _unit_input_grad(*args)
        else:  # the unpooled pass writing gy sums the bias's gradient too
            gb = (torch.empty(y.shape[-1], dtype=weight.dtype, device=y.device)
                  if need[2] and has_bias and not pool else None)
            gy, g_gamma, g_beta = _unit_input_grad_triton(*args, bias_grad=gb)
        w = weight if w_cast is None else w_cast
        gx = gw = None
        if need[0]:
            gx = _input_grad(gy, x_shape, x_dtype, w, kernel_size, stride)
        if need[1]:
            csr = None
            limit = sparse.max_density_weight_grad() if x_kind != ANALOG else 0.0
            if (limit > 0 and gemm_dtype is None and sparse.enabled(gy.dtype, gy.device)
                    and sparse.weight_grad_supported(kernel_size, stride)):
                csr = (sparse.csr_from_packed(stored, how, limit) if how is not None
                       else sparse.csr_from_dense(stored, limit))
            if csr is not None:
                gw = sparse.weight_grad(csr, x_shape, gy, w, kernel_size, stride)
            elif (how is not None and kernel_size == 0 and _triton(gy)
                  and triton_units.gemms_enabled()):
                # the input read as it was kept (bits, bytes): no unpacked copy
                gw = triton_units.weight_grad_packed(gy.reshape(-1, gy.shape[-1]), stored,
                                                     how[0], x_shape[-1]).view(weight.shape)
            else:
                x = unpack(stored, how)
                gw = _weight_grad(gy, x.to(gy.dtype), w, kernel_size, stride)
        if need[2] and has_bias and gb is None:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
    dtypes = (x_dtype, weight.dtype, weight.dtype, None, None)
    # every output its own tensor (custom ops may not return aliases); unwanted ones empty
    return tuple(y.new_empty(0) if g is None else g.to(dt or g.dtype).contiguous()
                 for g, dt in zip((gx, gw, gb, g_gamma, g_beta), dtypes))


@_spiking_unit_backward.register_fake
def _(grad, stored, x_format, x_shape, x_dtype, x_kind, weight, w_cast, bn_weight, bn_bias, y,
      mean, invstd, kernel_size, stride, pool, steps, bcast, use_bn, batch_stats_, tau, v_threshold,
      alpha, detach_reset, gemm_dtype, has_bias, need):
    def like(t, wanted):
        return torch.empty_like(t) if wanted and t is not None else y.new_empty(0)

    x_like = y.new_empty(x_shape, dtype=x_dtype) if need[0] else None
    bias_like = weight.new_empty(weight.shape[0]) if has_bias else None
    return (like(x_like, need[0]), like(weight, need[1]), like(bias_like, need[2]),
            like(bn_weight, need[3] and use_bn), like(bn_bias, need[4] and use_bn))


def _unit_backward(ctx, g_spikes, *_):
    if g_spikes is None:  # the spikes did not reach the loss
        return (None,) * ctx.n_inputs
    stored, weight, bn_weight, bn_bias, y, mean, invstd, w_cast = ctx.saved_tensors
    (kernel_size, stride, pool, steps, bcast, use_bn, batch_stats_, tau, v_threshold, alpha,
     detach_reset, gemm_dtype, has_bias) = ctx.cfg
    need = [bool(n) for n in ctx.needs_input_grad[:5]]
    stored, how = _kept(stored, ctx.x_how)
    fmt = 0 if how is None else _FORMATS.index(how[0])
    grads = _spiking_unit_backward(g_spikes.contiguous(), stored, fmt, list(ctx.x_shape),
                                   ctx.x_dtype, ctx.x_kind, weight, w_cast, bn_weight, bn_bias, y,
                                   mean, invstd, kernel_size, stride, pool, steps, bcast, use_bn,
                                   batch_stats_, tau, v_threshold, alpha, detach_reset,
                                   gemm_dtype, has_bias, need)
    grads = tuple(g if n else None for g, n in zip(grads, need))
    return grads + (None,) * (ctx.n_inputs - 5)


_spiking_unit.register_autograd(_unit_backward, setup_context=_unit_setup)


class _SpikingUnitFunction(torch.autograd.Function):
    """Eager autograd of the unit: the op's formula without the dispatcher's custom-op layers
    (Python overhead on every call), and free to update BatchNorm's running statistics inside
    the statistics kernel (the last argument, :data:`triton_units.Running` or None)."""

    @staticmethod
    def forward(ctx, *args):
        output = _unit_forward(*args)
        _unit_setup(ctx, args[:-1], output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _unit_backward(ctx, *grads) + (None,)


@kernel_op("qkformer::bn_running_update", mutates_args=("running_mean", "running_var", "count"),
           traceable=lambda a: not triton_units.interpreting())  # Triton route only
def _running_update(running_mean: Tensor, running_var: Tensor, count: Tensor, mean: Tensor,
                    var: Tensor, momentum: float, n: int) -> None:
    # BatchNorm's buffers updated in one Triton launch. An op, so that a compiled graph calls it
    # as it is (its mutations declared) instead of tracing into the kernel launch
    triton_units.running_update(running_mean, running_var, count, mean, var, momentum, n)


@_running_update.register_fake
def _(running_mean, running_var, count, mean, var, momentum, n):
    return None


def spiking_unit(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn: Optional[torch.nn.Module],
                 lif, *, kernel_size: int = 0, stride: int = 1, pool: bool = False,
                 steps: int, bcast: bool = False, x_kind: int = ANALOG,
                 update_stats: bool = True) -> Tensor:
    """LIF(pool?(BN(conv(x)))) as one autograd node.

    Args:
        x: token-major input: ``[..., Cin]`` for a 1x1 projection (``kernel_size=0``), or
            ``[N, H, W, Cin]`` for a ``kernel_size`` x ``kernel_size`` convolution (padding
            ``kernel_size // 2``, ``stride``).
        weight, bias: the convolution's parameters, in their own (state_dict) shape.
        bn: an ``nn.BatchNorm1d/2d`` (or a list of them, applied to consecutive channel groups,
            as for a stacked q/k/v projection), or None.
        lif: the :class:`~qkformer.neuron.MultiStepLIF` whose parameters to use.
        pool: MaxPool2d(3, 2, 1) between BatchNorm and LIF.
        steps: the LIF time steps: the leading extent of the output (``T``; ``T*B`` for the
            original's batch-coupled SSA ``proj_lif``).
        bcast: ``x`` is one static image batch ``[B, H, W, Cin]`` that the original feeds at
            every step: the convolution runs once and its output is repeated ``steps`` times.
        x_kind: :data:`ANALOG`, :data:`SPIKES` or :data:`COUNTS`: how to keep ``x`` for backward.
        update_stats: update BatchNorm running statistics in training mode (False while a
            checkpointed block is recomputed, so they are updated exactly once).

    Shape:
        - Input: ``[..., Cin]`` (projection), ``[N, H, W, Cin]`` (convolution; ``[B, H, W, Cin]``
          with ``bcast``)
        - Output: spikes, token-major: ``[..., Cout]`` (projection), ``[N, H', W', Cout]``
          (convolution, H' after stride and pool); ``[steps * B, H', W', Cout]`` with ``bcast``
    """
    bns = [m for m in (bn if isinstance(bn, (list, tuple)) else [bn])
           if m is not None and not isinstance(m, torch.nn.Identity)]  # Identity: folded away
    if bns and len(bns) != (len(bn) if isinstance(bn, (list, tuple)) else 1):
        raise ValueError("spiking_unit: a stacked projection needs BatchNorm on every branch or none")
    use_bn = bool(bns)
    bn_w = bn_b = rm = rv = None
    batch, momentum, eps = False, 0.0, 1e-5
    gemm_dtype = (torch.get_autocast_dtype(x.device.type)
                  if torch.is_autocast_enabled(x.device.type) else None)
    on_triton = _triton_route_for(x.device, gemm_dtype or x.dtype)
    if use_bn:
        first = bns[0]
        training = first.training
        tracking = first.running_mean is not None
        batch = training or not tracking
        eps = first.eps
        # on the Triton route the update kernel counts the batch (with a fixed momentum)
        on_device = first.momentum is not None and on_triton
        if training and tracking and update_stats:
            if not on_device:
                for m in bns:
                    m.num_batches_tracked.add_(1)
            momentum = (1.0 / float(first.num_batches_tracked) if first.momentum is None
                        else first.momentum)
        update = training and tracking and update_stats
        cat = (lambda ts: ts[0]) if len(bns) == 1 else torch.cat
        bn_w = cat([m.weight for m in bns]) if first.affine else None
        bn_b = cat([m.bias for m in bns]) if first.affine else None
        if tracking and not batch:
            rm = cat([m.running_mean for m in bns])
            rv = cat([m.running_var for m in bns])
    else:
        update = False
    if kernel_size == 1 and (stride == 1 or not on_triton):
        # A 1x1 convolution (padding 0) reads every stride-th pixel: a projection of those
        # tokens. Exact, and it keeps strided 1x1 convolutions away from oneDNN, whose
        # channels-last weight gradient for them is wrong (or corrupts the heap) on AVX2 CPUs
        # for fewer than 8 input channels (docs/performance.md, "oneDNN"). On the Triton route
        # a strided one stays a convolution: it reads the input in place (no copy of the
        # pixels, and the bits of the spikes are those their producer wrote) and writes its
        # input gradient whole (no scatter into zeros).
        x = x[:, ::stride, ::stride, :] if stride > 1 else x
        kernel_size, stride = 0, 1
    spike_bits = (not pool and compact_storage_enabled() and not torch.compiler.is_compiling()
                  and not is_fake(x) and triton_units.spike_bits_supported(weight.shape[0])
                  and on_triton)
    args = (x, weight, bias, bn_w, bn_b, rm, rv, kernel_size, stride, pool, steps, bcast, use_bn,
            batch, eps, lif.tau, lif.v_threshold, lif.alpha, lif.detach_reset, x_kind,
            gemm_dtype, spike_bits)
    if torch.compiler.is_compiling() or is_fake(x):
        running = None
        spikes, y, mean, var, _, _, bits = _spiking_unit(*args)
    else:
        # eagerly, on the Triton route, the statistics kernel updates the running statistics
        running = (([(m.running_mean, m.running_var, m.num_batches_tracked) for m in bns],
                    momentum) if update and on_device and len(bns) <= 3
                   and len({m.num_features for m in bns}) == 1 else None)
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, bn_w, bn_b))
        spikes, y, mean, var, _, _, bits = (_SpikingUnitFunction.apply(*args, running) if grad
                                            else _unit_forward(*args, running))
    if spike_bits:
        _produced.remember(spikes, SPIKES, bits)
    if update and running is None:  # as nn.BatchNorm: running = (1 - m) running + m batch
        n = _per_channel(y, steps, bcast)
        with torch.no_grad():
            offset = 0
            for m in bns:
                k = m.num_features
                if on_device:
                    _running_update(m.running_mean, m.running_var, m.num_batches_tracked,
                                    mean[offset:offset + k], var[offset:offset + k], momentum, n)
                    offset += k
                    continue
                m.running_mean.mul_(1 - momentum).add_(mean[offset:offset + k].to(m.running_mean.dtype),
                                                       alpha=momentum)
                m.running_var.mul_(1 - momentum).add_(
                    (var[offset:offset + k] * (n / max(n - 1, 1))).to(m.running_var.dtype),
                    alpha=momentum)
                offset += k
    return spikes


# ---------------------------------------------------------------------------------------------
# attention cores
# ---------------------------------------------------------------------------------------------
def _lif_only(x: Tensor, steps: int, tau: float, v_threshold: float) -> Tensor:
    return bn_lif_forward(x.contiguous(), steps, None, None, tau, v_threshold)


def _q_sums(q: Tensor, num_heads: int, channel: bool) -> Tensor:
    """Q summed per head over its channels ([T, B, N, h]; QKTA) or per channel over the tokens
    ([T, B, C]; QKCA). Sums of spikes: exact in any order."""
    if channel:
        return q.sum(2, dtype=_arith(q.dtype))
    return q.unflatten(-1, (num_heads, -1)).sum(-1, dtype=_arith(q.dtype))


def _mask(a: Tensor, k: Tensor, num_heads: int, channel: bool,
          out: Optional[Tensor] = None) -> Tensor:
    """``a`` per head (per channel for QKCA) times ``k``; into ``out`` (shaped like ``k``, any
    strides) when given."""
    if channel:
        return torch.mul(a.unsqueeze(2), k, out=out)
    if out is None:
        return (a.unsqueeze(-1) * k.unflatten(-1, (num_heads, -1))).flatten(-2)
    torch.mul(a.unsqueeze(-1), k.unflatten(-1, (num_heads, -1)),
              out=out.unflatten(-1, (num_heads, -1)))
    return out


@kernel_op("qkformer::qk_attention",
           traceable=lambda a: _traced_route(a["qk"].device, a["qk"].dtype))
def _qk_attention(qk: Tensor, num_heads: int, channel: bool, tau: float, v_threshold: float,
                  alpha: float, detach_reset: bool) -> Tuple[Tensor, Tensor]:
    if not channel and _triton(qk) and qk.is_contiguous():
        return triton_units.qk_token_forward(qk, num_heads, tau, v_threshold)
    q, k = qk.chunk(2, dim=-1)
    qs = _q_sums(q, num_heads, channel)
    a = _lif_only(qs, qs.shape[0], tau, v_threshold).to(k.dtype)
    return _mask(a, k, num_heads, channel).contiguous(), qs


@_qk_attention.register_fake
def _(qk, num_heads, channel, tau, v_threshold, alpha, detach_reset):
    T, B, N, C2 = qk.shape
    qs_shape = (T, B, C2 // 2) if channel else (T, B, N, num_heads)
    return qk.new_empty((T, B, N, C2 // 2)), qk.new_empty(qs_shape, dtype=_arith(qk.dtype))


def _qk_setup(ctx, inputs, output):
    qk, num_heads, channel, tau, v_threshold, alpha, detach_reset = inputs
    _, qs = output
    k = qk.chunk(2, dim=-1)[1]
    stored, ctx.k_how = pack(k, SPIKES)
    ctx.save_for_backward(stored, qs)
    ctx.cfg = (num_heads, channel, tau, v_threshold, alpha, detach_reset)
    ctx.mark_non_differentiable(qs)
    ctx.set_materialize_grads(False)  # (see _unit_setup)


@kernel_op("qkformer::qk_attention_backward",
           traceable=lambda a: _traced_route(a["k"].device, a["k"].dtype))
def _qk_attention_backward(g_out: Tensor, k: Tensor, qs: Tensor, num_heads: int, channel: bool,
                           tau: float, v_threshold: float, alpha: float,
                           detach_reset: bool) -> Tensor:
    if not channel and _triton(k):
        return triton_units.qk_token_backward(g_out.contiguous(), k.contiguous(), qs, tau,
                                              v_threshold, alpha, detach_reset)
    dtype = k.dtype
    T = qs.shape[0]
    a = _lif_only(qs, T, tau, v_threshold)
    g_out = g_out.to(_arith(dtype))
    kf = k.to(g_out.dtype)
    if channel:
        g_a = (g_out * kf).sum(2)
    else:
        g_a = (g_out * kf).unflatten(-1, (num_heads, -1)).sum(-1)
    g_qs, _ = bn_lif_backward(g_a, qs, T, None, None, tau, v_threshold, alpha, detach_reset)
    C = k.shape[-1]
    out = k.new_empty((*k.shape[:-1], 2 * C))  # [g_q | g_k], written in place (no cat)
    g_q, g_k = out[..., :C], out[..., C:]
    if channel:
        g_q.copy_(g_qs.unsqueeze(2).expand(k.shape))
    else:
        g_q.unflatten(-1, (num_heads, -1)).copy_(g_qs.unsqueeze(-1).expand(
            *g_qs.shape, C // num_heads))
    _mask(a.to(g_out.dtype), g_out, num_heads, channel, out=g_k)
    return out


@_qk_attention_backward.register_fake
def _(g_out, k, qs, num_heads, channel, tau, v_threshold, alpha, detach_reset):
    return k.new_empty((*k.shape[:-1], 2 * k.shape[-1]))


def _qk_backward(ctx, g_out, _):
    if g_out is None:
        return (None,) * 7
    stored, qs = ctx.saved_tensors
    num_heads, channel, tau, v_threshold, alpha, detach_reset = ctx.cfg
    k = unpack(stored, ctx.k_how)
    return (_qk_attention_backward(g_out.contiguous(), k, qs, num_heads, channel, tau,
                                   v_threshold, alpha, detach_reset),
            None, None, None, None, None, None)


_qk_attention.register_autograd(_qk_backward, setup_context=_qk_setup)


def qk_attention(qk: Tensor, num_heads: int, channel: bool, lif) -> Tensor:
    """Q-K attention core as one autograd node, on stacked spiking ``[q | k]``.

    Per head, Q summed over its channels (QKTA; ``channel=False``) or each channel summed over
    the tokens (QKCA), through ``lif`` (V_th 0.5: fires iff the count is >= 1,
    docs/original.md §1.4), masks K. Keeps K as bits and the Q sums for backward.

    Args:
        qk: spikes of the Q and K projections, concatenated on the channels.
        num_heads: number of heads h; must divide C.
        channel: QKCA (True) or QKTA (False).
        lif: the :class:`~qkformer.neuron.MultiStepLIF` whose parameters to use.

    Shape:
        - Input: ``[T, B, N, 2C]``
        - Output: spikes ``[T, B, N, C]``
    """
    out, _ = _qk_attention(qk, num_heads, channel, lif.tau, lif.v_threshold, lif.alpha,
                           lif.detach_reset)
    return out


def _heads_from_tokens(t: Tensor, num_heads: int, k: int, dtype: torch.dtype) -> Tensor:
    """Token-major [T, B, N, k*C] (k stacked tensors: 3 for q|k|v) -> head-major
    [k, T*B*h, N, d], contiguous, in ``dtype``: one copy, after which every product is a plain
    batched GEMM and the LIF runs on the head-major scores (T still leading)."""
    T, B, N, kC = t.shape
    d = kC // k // num_heads
    heads = torch.empty((k, T, B, num_heads, N, d), dtype=dtype, device=t.device)
    heads.copy_(t.view(T, B, N, k, num_heads, d).permute(3, 0, 1, 4, 2, 5))
    return heads.view(k, T * B * num_heads, N, d)


def _tokens_from_heads(t: Tensor, shape, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_heads_from_tokens`: [k, T*B*h, N, d] -> token-major ``shape``
    [T, B, N, k*C] in ``dtype``."""
    T, B, N, C = shape
    k = t.shape[0]
    h = t.shape[1] // (T * B)
    out = torch.empty((T, B, N, k, h, C // (k * h)), dtype=dtype, device=t.device)
    out.permute(3, 0, 1, 4, 2, 5).copy_(t.view(k, T, B, h, N, -1))
    return out.view(shape)


def _ssa_scores(heads: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """(q (kᵀ v)) * scale per head, head-major [T*B*h, N, d] (float; integer valued, so exact
    in any order), and kᵀ v."""
    q, k, v = heads
    kv = torch.bmm(k.transpose(1, 2), v)
    return torch.bmm(q, kv).mul_(scale), kv


def _lif_rows(x: Tensor, steps: int) -> Tensor:  # [T*G, N, d] -> [T, G, N*d] (LIF layout)
    return x.view(steps, -1, x.shape[1] * x.shape[2])


def _ssa_on_triton(qkv: Tensor, num_heads: int) -> bool:
    """The SSA core runs as one Triton kernel each way (one head's tokens fit a program)."""
    T, B, N, C3 = qkv.shape
    return _triton(qkv) and triton_units.ssa_blocks(N, C3 // 3 // num_heads) is not None


@kernel_op("qkformer::ssa_attention",
           traceable=lambda a: _traced_route(a["qkv"].device, a["qkv"].dtype))
def _ssa_attention(qkv: Tensor, num_heads: int, scale: float, tau: float, v_threshold: float,
                   alpha: float, detach_reset: bool) -> Tensor:
    T, B, N, C3 = qkv.shape
    if _ssa_on_triton(qkv, num_heads):
        return triton_units.ssa_forward(qkv.contiguous(), num_heads, scale, tau, v_threshold)
    with torch.autocast(qkv.device.type, enabled=False):  # the scores stay exact integers
        x, _ = _ssa_scores(_heads_from_tokens(qkv, num_heads, 3, _arith(qkv.dtype)), scale)
        s = _lif_only(_lif_rows(x, T), T, tau, v_threshold)
        return _tokens_from_heads(s.view(1, *x.shape), (T, B, N, C3 // 3), qkv.dtype)


@_ssa_attention.register_fake
def _(qkv, num_heads, scale, tau, v_threshold, alpha, detach_reset):
    T, B, N, C3 = qkv.shape
    return qkv.new_empty((T, B, N, C3 // 3))


def _ssa_setup(ctx, inputs, output):
    qkv, num_heads, scale, tau, v_threshold, alpha, detach_reset = inputs
    stored, ctx.qkv_how = pack(qkv, SPIKES)
    ctx.save_for_backward(stored)
    ctx.cfg = (num_heads, scale, tau, v_threshold, alpha, detach_reset)


@kernel_op("qkformer::ssa_attention_backward",
           traceable=lambda a: _traced_route(a["qkv"].device, a["qkv"].dtype))
def _ssa_attention_backward(g_s: Tensor, qkv: Tensor, num_heads: int, scale: float, tau: float,
                            v_threshold: float, alpha: float, detach_reset: bool) -> Tensor:
    T, B, N, C3 = qkv.shape
    if _ssa_on_triton(qkv, num_heads):
        return triton_units.ssa_backward(g_s.contiguous(), qkv.contiguous(), num_heads, scale,
                                         tau, v_threshold, alpha, detach_reset)
    A = _arith(qkv.dtype)
    with torch.autocast(qkv.device.type, enabled=False):
        heads = _heads_from_tokens(qkv, num_heads, 3, A)
        x, kv = _ssa_scores(heads, scale)  # recomputed: integer sums, so exactly
        g_sh = _heads_from_tokens(g_s, num_heads, 1, A)[0]
        g_x, _ = bn_lif_backward(_lif_rows(g_sh, T), _lif_rows(x, T), T, None, None,
                                 tau, v_threshold, alpha, detach_reset)
        gh = g_x.view(x.shape).mul_(scale)
        q, k, v = heads
        grads = torch.empty((3, *x.shape), dtype=A, device=x.device)
        torch.bmm(gh, kv.transpose(1, 2), out=grads[0])
        g_kv = torch.bmm(q.transpose(1, 2), gh)
        torch.bmm(v, g_kv.transpose(1, 2), out=grads[1])
        torch.bmm(k, g_kv, out=grads[2])
        return _tokens_from_heads(grads, (T, B, N, C3), qkv.dtype)


@_ssa_attention_backward.register_fake
def _(g_s, qkv, num_heads, scale, tau, v_threshold, alpha, detach_reset):
    return torch.empty_like(qkv)


def _ssa_backward(ctx, g_s):
    (stored,) = ctx.saved_tensors
    qkv = unpack(stored, ctx.qkv_how)
    return (_ssa_attention_backward(g_s.contiguous(), qkv, *ctx.cfg),
            None, None, None, None, None, None)


_ssa_attention.register_autograd(_ssa_backward, setup_context=_ssa_setup)


def ssa_attention(qkv: Tensor, num_heads: int, scale: float, lif) -> Tensor:
    """Spikformer's SSA core as one autograd node: ``lif((q (kᵀ v)) * scale)`` per head.

    The scores are sums of spikes, exact in any order, so the backward pass recomputes them;
    only ``[q | k | v]`` is kept, as bits.

    Args:
        qkv: spikes of the Q, K and V projections, concatenated on the channels.
        num_heads: number of heads h; must divide C.
        scale: the score scale (0.125 in SSA).
        lif: the :class:`~qkformer.neuron.MultiStepLIF` (``attn_lif``) whose parameters to use.

    Shape:
        - Input: ``[T, B, N, 3C]``
        - Output: spikes ``[T, B, N, C]``
    """
    return _ssa_attention(qkv, num_heads, scale, lif.tau, lif.v_threshold, lif.alpha,
                          lif.detach_reset)


# ---------------------------------------------------------------------------------------------
# the Triton route's self-check
def _triton_self_check(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run every Triton pass once on small problems against the torch route; None when they
    agree: spikes and packing exactly (the inputs lie on a 1/8 grid, so both routes charge the
    same numbers), gradients and statistics within rounding of the surrogate's exp."""
    gen = torch.Generator().manual_seed(0)
    A = _arith(dtype)
    rtol = 1e-10 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 1e-2)

    def grid(*shape, lo=-16, hi=17):  # values k / 8: exact in every float type
        return (torch.randint(lo, hi, shape, generator=gen) / 8).to(dtype).to(device)

    C, T = 5, 2
    scale = (torch.randint(1, 5, (C,), generator=gen) / 4).to(A).to(device)
    shift = (torch.randint(-4, 5, (C,), generator=gen) / 8).to(A).to(device)
    cases = [dict(y=grid(T * 3, 2, C), pool=False, bcast=False),
             dict(y=grid(3, 2, C), pool=False, bcast=True),
             dict(y=grid(T * 2, 5, 6, C), pool=True, bcast=False),
             dict(y=grid(2, 5, 4, C), pool=True, bcast=True)]
    lif = (2.0, 1.0)
    for case in cases:
        y, pool, bcast = case["y"], case["pool"], case["bcast"]
        out = {}
        for r in ("triton", "torch"):
            with forced_route(r):
                s = bn_lif_forward(y, T, scale, shift, *lif, pool, bcast)
                if "grad" not in case:  # one gradient for both routes
                    case["grad"] = grid(*s.shape)
                grad = case["grad"]
                gz, sums = bn_lif_backward(grad, y, T, scale, shift, *lif, 4.0, True, pool, bcast,
                                           sums=True)
                mean = y.reshape(-1, C).to(torch.float64).mean(0)
                invstd = torch.full((C,), 2.0, dtype=torch.float64, device=device)
                gy = _unit_input_grad(grad, y, mean, invstd, None, None, T, pool, bcast, True,
                                      True, *lif, 4.0, False, [True] * 5)[0] if r == "torch" else \
                    _unit_input_grad_triton(grad, y, mean, invstd, None, None, T, pool, bcast,
                                            True, True, *lif, 4.0, False, [True] * 5)[0]
                stats = (triton_units.colstats_coefficients(y.reshape(-1, C).contiguous(), True,
                                                            None, None, None, None, 1e-5)[:2]
                         if r == "triton" else batch_stats(y))
                bits = _unpack_now(*_pack_now(s, SPIKES))
            out[r] = (s, gz, sums, gy, stats, bits)
        (s1, gz1, sums1, gy1, st1, b1), (s2, gz2, sums2, gy2, st2, _) = out["triton"], out["torch"]
        where = f"{'pooled' if pool else 'plain'}{', repeated input' if bcast else ''}"
        if not torch.equal(s1, s2) or not torch.equal(b1, s2):
            return f"spikes or their packing differ from the torch route ({where})"
        for name, a, b in (("g_Z", gz1, gz2), ("BatchNorm sums", sums1, sums2),
                           ("input gradient", gy1.to(A), gy2.to(A)),
                           ("statistics", torch.stack(st1), torch.stack(st2))):
            if not torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-2):
                err = (a - b).abs().max().item()
                return f"{name} differs from the torch route by {err:.3g} ({where})"
    qkv = (grid(T, 1, 6, 3 * 8, lo=-3, hi=5) > 0).to(dtype)  # SSA, 2 heads of 4 channels
    g_ssa = grid(T, 1, 6, 8)
    ssa = {}
    for r in ("triton", "torch"):
        with forced_route(r):
            ssa[r] = (_ssa_attention(qkv, 2, 0.5, *lif, 4.0, True),
                      _ssa_attention_backward(g_ssa, qkv, 2, 0.5, *lif, 4.0, True))
    if not torch.equal(ssa["triton"][0], ssa["torch"][0]):
        return "the self-attention's spikes differ from the torch route"
    if not torch.allclose(ssa["triton"][1].to(A), ssa["torch"][1].to(A), rtol=rtol,
                          atol=rtol * 1e-2):
        return "the self-attention's gradient differs from the torch route"
    y8 = grid(T * 3, 8)  # channels a multiple of 8: the spiking pass writes the bits too
    g8, shape8 = _geometry(y8, T, False, False)
    with forced_route("triton"):
        s8 = torch.empty(shape8, dtype=dtype, device=device)
        bits8 = torch.empty(s8.numel() // 8, dtype=torch.uint8, device=device)
        triton_units.bn_lif_forward(y8, s8, T, g8, None, None, *lif, False, False, bits8)
        if not torch.equal(bits8, triton_units.pack(s8, "bits").data):
            return "the bits the spiking pass writes differ from its spikes packed"
    bad = grid(8)
    bad[3] = 0.5
    with forced_route("triton"):
        # the eager packing, also when a graph being traced asks for the verdict
        stored, how = _kept(*_pack_now(bad, SPIKES))
        kept = unpack(stored, how) if how is None else _unpack_now(stored, how)
    if how is not None or not torch.equal(kept, bad):
        return "a value that does not fit was not kept exactly"
    if triton_units.gemms_enabled():
        return _gemm_self_check(grid, rtol, dtype)
    return None


def _gemm_self_check(grid, rtol: float, dtype: torch.dtype) -> Optional[str]:
    """The GEMMs that take part in the unit (``QKFORMER_TRITON_GEMMS=1``) against torch's."""
    x, w, b = grid(40, 24, lo=0, hi=2) * 8, grid(16, 24), grid(16)  # x: spikes
    with forced_route("triton"):
        y, part = triton_units.linear_stats(x, w, b, torch.zeros_like(b))
        for fmt, data in (("bits", x), ("u8", x + x)):
            gw = triton_units.weight_grad_packed(y, triton_units.pack(data, fmt).data, fmt, 24)
            if not torch.allclose(gw.to(torch.float64), y.double().t() @ data.double(),
                                  rtol=rtol, atol=rtol):
                return f"the weight gradient from {fmt} differs from torch's product"
    exact = torch.addmm(b.double(), x.double(), w.double().t())
    if not torch.allclose(y.double(), exact, rtol=rtol, atol=rtol):
        return "the GEMM with statistics differs from torch's product"
    if not torch.allclose(part.sum(0), torch.stack([y.double().sum(0), y.double().square().sum(0)]),
                          rtol=rtol, atol=rtol):
        return "the statistics from the GEMM's epilogue differ from the sums of its output"
    return None
