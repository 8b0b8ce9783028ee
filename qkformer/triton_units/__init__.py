"""The fused spiking unit's passes as Triton kernels: the fast path's route on CUDA.

Per unit and training step (``kernels.py`` has the kernels):

* forward: per-channel statistics (one pass over the conv output ``y``), the BatchNorm
  coefficients (a per-channel kernel), affine + [max-pool] + LIF (one pass writing the spikes);
* backward: recompute + LIF backward + the BatchNorm sums (one pass), the coefficients of the
  input gradient, and recompute + LIF backward + the input gradient (one pass writing it). The
  pooled unit writes the pooled gradient and the window argmax once and gathers them back.

The attention cores are one kernel each way: QKTA, and SSA (reading and writing the
token-major layouts, so that no head-major copy is made).

16-bit values stay 16-bit in memory; the arithmetic is float32 (float64 for float64 tensors) in
registers. Compact storage packs spikes to bits and counts to bytes with a device-side flag
for values that do not fit; :class:`Packed` resolves it without stalling the stream.

Triton is imported on the first question asked of this module. ``TRITON_INTERPRET=1`` (set
before this module is imported) runs the kernels on CPU tensors through Triton's interpreter:
that is how the tests check them without a GPU. ``QKFORMER_TRITON_UNITS=0`` turns the route
off. Whether a (device, dtype) may use it is decided by the caller's self-check
(:func:`verdict`), once, with one warning when it fails.
"""
from __future__ import annotations

import atexit
import inspect
import json
import math
import os
import threading
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..env import flag

__all__ = ["interpreting", "is_available", "unavailable_reason", "serves", "handles", "verdict",
           "describe", "launch_counts", "colstats_coefficients", "bn_lif_forward",
           "bn_lif_backward", "pool_lif_backward",
           "bn_affine", "running_update", "colstats", "bn_lif_forward_bn", "qk_token_forward", "qk_token_backward",
           "ssa_blocks", "ssa_forward", "ssa_backward",
           "pack", "unpack", "add_counts", "packed", "Packed", "linear_stats",
           "weight_grad_packed", "gemms_enabled", "DTYPES"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ENABLE_ENV = "QKFORMER_TRITON_UNITS"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"  # read as Triton reads it: once

_state: Dict[str, object] = {}  # "kernels", "reason" once probed
_verdicts: Dict[tuple, Optional[str]] = {}  # (device, dtype) -> None (passed) or why not
_launches: Dict[str, int] = {}
_lock = threading.Lock()


def interpreting() -> bool:
    """Kernels run through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``)."""
    return _INTERPRET


def _enabled() -> bool:
    return flag(_ENABLE_ENV, True)


def _kernels():
    if "probed" not in _state:
        with _lock:
            if "probed" not in _state:
                try:
                    from . import kernels
                    _state["kernels"], _state["reason"] = kernels, None
                except Exception as e:  # noqa: BLE001 - any import failure means: no route
                    _state["kernels"], _state["reason"] = None, f"{type(e).__name__}: {e}"
                _state["probed"] = True
    return _state["kernels"]


def is_available() -> bool:
    """Triton imports and the route is enabled (says nothing of a device: see :func:`handles`)."""
    return _enabled() and _kernels() is not None


def unavailable_reason() -> Optional[str]:
    if not _enabled():
        return f"{_ENABLE_ENV}=0"
    if _kernels() is None:
        return f"triton unavailable ({_state['reason']})"
    return None


def serves(device, dtype: torch.dtype) -> bool:
    """The kernels can run on tensors of ``dtype`` on ``device``: CUDA (CPU under the
    interpreter), a float type."""
    if dtype not in DTYPES or not is_available():
        return False
    kind = torch.device(device).type
    return (kind == "cuda" and torch.cuda.is_available()) or (_INTERPRET and kind == "cpu")


def handles(t: Tensor) -> bool:
    """:func:`serves` for ``t``'s device and dtype."""
    return serves(t.device, t.dtype)


def verdict(device: torch.device, dtype: torch.dtype, check: Callable[[torch.device, torch.dtype],
                                                                      Optional[str]]) -> bool:
    """Whether (device, dtype) may use the kernels: ``check`` (the caller's comparison with
    its torch route) runs once per key; a failure or an exception turns the route off for the
    key with one warning."""
    key = (str(torch.device(device)), dtype)
    if key not in _verdicts:
        _verdicts[key] = "self-check running"  # a check that calls back here sees 'no'
        try:
            problem = check(torch.device(device), dtype)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot launch is a failed check
            problem = f"{type(e).__name__}: {e}"
        _verdicts[key] = problem
        if problem is not None:
            warnings.warn(f"Triton units off on {key[0]} for {dtype}: {problem}; the fast path "
                          f"runs its torch ops there", RuntimeWarning, stacklevel=3)
    return _verdicts[key] is None


def describe(device) -> str:
    """One line: whether the kernels can serve ``device`` and, if not, why."""
    device = torch.device(device)
    reason = unavailable_reason()
    if reason is not None:
        return f"triton units: off ({reason})"
    if not serves(device, torch.float32):
        return ("triton units: off (no CUDA device)" if device.type == "cuda"
                else f"triton units: off (no kernels for {device.type} tensors)")
    failed = {str(k[1]).replace("torch.", ""): v for k, v in _verdicts.items()
              if k[0] == str(device) and v is not None}
    note = "; failed self-check: " + ", ".join(f"{d} ({v})" for d, v in failed.items()) if failed else ""
    mode = " through the interpreter" if _INTERPRET and device.type == "cpu" else ""
    return f"triton units: on{mode} (triton {_triton_version()}){note}"


def _triton_version() -> str:
    import triton

    return triton.__version__


def launch_counts() -> Dict[str, int]:
    """Kernel launches per kernel name since import (tests, benchmarks)."""
    return dict(_launches)


def _reset() -> None:
    _verdicts.clear()
    _launches.clear()


_TL_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
             torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32",
             torch.int64: "i64"}
_variants: set = set()  # with QKFORMER_TRITON_RECORD: every (kernel, signature, constants) run


def _record(kernel, name: str, args: tuple, meta: dict) -> None:
    """Note the variant launched (argument types, compile-time constants), so that the tests
    can compile every variant the model runs for a GPU target without one."""
    values = dict(zip(kernel.arg_names, args), **meta)
    sig, consts = {}, {}
    for name_, param in inspect.signature(kernel.fn).parameters.items():
        v = values[name_]
        if "constexpr" in str(param.annotation):
            consts[name_] = v if isinstance(v, (bool, int, float)) else str(v)
        elif isinstance(v, torch.Tensor):
            sig[name_] = "*" + _TL_TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name_] = "i1"
        elif isinstance(v, int):
            sig[name_] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[name_] = "fp32"
    _variants.add((name, tuple(sig.items()), tuple(sorted(consts.items()))))


def recorded_variants() -> list:
    return sorted(_variants)


@atexit.register
def _write_variants() -> None:
    path = os.environ.get("QKFORMER_TRITON_RECORD")
    if path and _variants:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(recorded_variants(), f)


def _launch(name: str, grid: tuple, *args, **meta) -> None:
    kernel = getattr(_kernels(), name)
    if os.environ.get("QKFORMER_TRITON_RECORD"):
        _record(kernel, name, args, meta)
    if _tracing():  # inside a triton_op being traced: the launch becomes a node of the graph
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)
    _launches[name] = _launches.get(name, 0) + 1


_MODES = torch._C._TorchDispatchModeKey


def _tracing() -> bool:
    """A graph is being traced (fake or functional tensors): launches go through
    ``wrap_triton`` and nothing may be cached across calls. (A quarter of a microsecond.)"""
    return (torch._C._get_dispatch_mode(_MODES.FAKE) is not None
            or torch._C._get_dispatch_mode(_MODES.FUNCTIONAL) is not None)


# --------------------------------------------------------------------------------------------
# sizes
def _arith(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_arith(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, cap: int) -> int:
    return max(1, min(cap, 1 << max(0, int(n) - 1).bit_length()))


def _programs(device: torch.device) -> int:
    """How many programs a reduction over rows is split into (per block of channels)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter runs programs one after another


def _row_split(R: int, n_col_blocks: int, block_r: int, device) -> Tuple[int, int]:
    """(programs, rows per program) for R rows: enough programs to fill the device, each a
    whole number of row tiles."""
    tiles = max(1, math.ceil(R / block_r))
    n = max(1, min(tiles, _programs(device) // max(1, n_col_blocks)))
    rows = math.ceil(tiles / n) * block_r
    return max(1, math.ceil(R / rows)), rows


def _tiles(C: int, dtype: torch.dtype) -> Tuple[int, int]:
    block_c = _pow2(C, 64)
    wide = 2 if dtype == torch.float64 else 1
    return max(1, 2048 // wide // block_c), block_c


_BLOCK = 1024
_unused: Dict[tuple, Tensor] = {}


_constants: Dict[tuple, Tensor] = {}


def _constant(value: float, device: torch.device) -> Tensor:
    """``value`` as a float64 scalar on ``device``, copied there once."""
    key = (device, float(value))
    if _tracing():
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    if key not in _constants:
        _constants[key] = torch.tensor(float(value), dtype=torch.float64, device=device)
    return _constants[key]


def _or_unused(t: Optional[Tensor], like: Tensor) -> Tensor:
    """``t``, or for a pointer argument the kernel does not read, one cached element of
    ``like``'s dtype and device (so that nothing large is passed in its place)."""
    if t is not None:
        return t
    if _tracing():
        return like.new_zeros(1)
    key = (like.device, like.dtype)
    if key not in _unused:
        _unused[key] = torch.zeros(1, dtype=like.dtype, device=like.device)
    return _unused[key]


def _lif_consts(tau: float):
    exact = math.frexp(tau)[0] == 0.5  # a power of two: x / tau == x * (1 / tau)
    return dict(tau=float(tau), inv_tau=1.0 / tau), exact


# --------------------------------------------------------------------------------------------
# launchers (inputs contiguous; the caller checks shapes and dtypes)
Running = Tuple[List[Tuple[Tensor, Tensor, Optional[Tensor]]], float, int]
"""BatchNorm buffers a statistics kernel updates in place, as ``nn.BatchNorm`` does: ([(running
mean, running var, batch counter or None)] of 1 to 3 BatchNorms of equal width side by side on
the channels, momentum, n: the values each statistic was taken over)."""

def colstats(y2: Tensor) -> Tuple[Tensor, Tensor]:
    """Partial sums of ``y2`` [R, C] for BatchNorm's batch statistics: ``(part [P, 2, C]
    float64, ref)``, the sums of d = y - ref and d^2 per program (ref: the first row, which
    keeps E[d^2] - E[d]^2 free of cancellation). One launch."""
    R, C = y2.shape
    block_r, block_c = _tiles(C, y2.dtype)
    n_cb = math.ceil(C / block_c)
    n_parts, rows = _row_split(R, n_cb, block_r, y2.device)
    part = torch.empty((n_parts, 2, C), dtype=torch.float64, device=y2.device)
    ref = y2[0]
    _launch("colstats_kernel", (n_parts, n_cb), y2, ref, part, R, C, rows, BLOCK_R=block_r,
            BLOCK_C=block_c, A=_tl_arith(y2.dtype))
    return part, ref


def _running_inputs(running: Optional[Running], device: torch.device) -> Tuple[tuple, dict]:
    """The kernels' arguments for updating the running statistics (none: ``running`` None)."""
    f64 = _or_unused(None, torch.empty(0, dtype=torch.float64, device=device))
    if running is None:
        return (f64,) * 9 + (f64, 1, 1), dict(RUNNING=0, COUNT=False)
    groups, momentum, n = running
    if not 1 <= len(groups) <= 3 or len({rm.numel() for rm, _, _ in groups}) != 1:
        raise ValueError("running statistics: 1 to 3 BatchNorms of equal width")
    count = groups[0][2] is not None
    pointers = [t if t is not None else f64 for g in groups for t in g]
    pointers += [pointers[0]] * (9 - len(pointers))
    return ((*pointers, _constant(momentum, device), groups[0][0].numel(), int(n)),
            dict(RUNNING=len(groups), COUNT=count))


def _bn_inputs(y2: Tensor, batch: bool, running_mean, running_var, gamma, beta, eps: float,
               running: Optional[Running] = None, stats: Optional[Tuple[Tensor, Tensor]] = None):
    """The statistics arguments shared by the kernels that compute BatchNorm's coefficients
    (and with ``running`` update the running statistics). ``stats``: the partial sums and
    their reference as :func:`colstats` returns them, already taken (by :func:`linear_stats`)."""
    R, C = y2.shape
    f64 = dict(dtype=torch.float64, device=y2.device)
    if stats is not None and not batch:
        raise ValueError("BatchNorm statistics given for a unit on running statistics")
    part, ref = (stats if stats is not None else colstats(y2) if batch
                 else (_or_unused(None, y2.new_empty(0, **f64)), _or_unused(None, y2)))
    outputs = tuple(torch.empty(C, **f64) for _ in range(3))  # mean, var, invstd
    run_args, run_flags = _running_inputs(running, y2.device)
    args = (part, part.shape[0] if batch else 0, int(max(R, 1)), ref,
            *(_or_unused(t, outputs[0]) for t in (running_mean, running_var, gamma, beta)),
            _constant(eps, y2.device), *outputs, *run_args)
    flags = dict(BATCH=batch, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
                 **run_flags)
    return args, flags, outputs


def colstats_coefficients(y2: Tensor, batch: bool, running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], gamma: Optional[Tensor],
                          beta: Optional[Tensor], eps: float, running: Optional[Running] = None):
    """BatchNorm of ``y2`` [R, C]: ``(mean, var, invstd)`` float64 and ``(scale, shift)`` in the
    arithmetic type, from the batch (``batch``) or the running statistics; with ``running`` the
    running statistics updated (:data:`Running`). Two launches (one without ``batch``)."""
    C = y2.shape[1]
    A = _arith(y2.dtype)
    args, flags, outputs = _bn_inputs(y2, batch, running_mean, running_var, gamma, beta, eps,
                                      running)
    scale, shift = (torch.empty(C, dtype=A, device=y2.device) for _ in range(2))
    block_c = _pow2(C, 64)
    _launch("bn_coefficients_kernel", (math.ceil(C / block_c),), *args, scale, shift, C,
            **flags, BLOCK_C=block_c, A=_tl_arith(y2.dtype))
    return (*outputs, scale, shift)


def bn_lif_forward_bn(y: Tensor, s: Tensor, steps: int, geometry: dict, batch: bool,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      gamma: Optional[Tensor], beta: Optional[Tensor], eps: float,
                      tau: float, v_threshold: float, bcast: bool,
                      bits: Optional[Tensor] = None, running: Optional[Running] = None,
                      stats: Optional[Tuple[Tensor, Tensor]] = None):
    """The unpooled unit's forward with its BatchNorm: spikes into ``s`` (and packed into
    ``bits``, see :func:`spike_bits_supported`) and ``(mean, var, invstd)`` float64 returned,
    the coefficients computed in the spiking pass, which with ``running`` also updates the
    running statistics (:data:`Running`). Two launches with batch statistics (the statistics
    pass, then this), one without, or with the ``stats`` a GEMM's epilogue took
    (:func:`linear_stats`)."""
    g = geometry
    M, C = g["M"], g["C"]
    args, flags, outputs = _bn_inputs(y.view(-1, C), batch, running_mean, running_var, gamma,
                                      beta, eps, running, stats)
    _forward_pass(y, s, steps, M, C, None, None, bcast, tau, v_threshold, (args, flags), bits)
    return outputs


def spike_bits_supported(channels: int) -> bool:
    """Whether the unpooled spiking pass can also write its spikes as bits (whole bytes per
    row: the channels a multiple of 8)."""
    return channels % 8 == 0


def _forward_pass(y: Tensor, s: Tensor, steps: int, M: int, C: int, scale: Optional[Tensor],
                  shift: Optional[Tensor], bcast: bool, tau: float, v_threshold: float,
                  bn: Optional[tuple] = None, bits: Optional[Tensor] = None) -> None:
    """The unpooled spiking pass: the affine ``scale``/``shift`` (or none), or with ``bn`` =
    (arguments, flags) of :func:`_bn_inputs` BatchNorm's, computed in the kernel; with ``bits``
    (uint8 [steps M C / 8]) the spikes packed as :func:`pack` packs them too."""
    if bits is not None and (not spike_bits_supported(C) or bits.numel() * 8 != s.numel()):
        raise ValueError(f"bn_lif_forward: {bits.numel()} bytes cannot hold {s.numel()} spikes "
                         f"of {C} channels as bits")
    consts, exact = _lif_consts(tau)
    block_r, block_c = _tiles(C, y.dtype)
    n_cb = math.ceil(C / block_c)
    n_parts, rows = _row_split(M, n_cb, block_r, y.device)
    if bn is None:
        f64 = _or_unused(None, y.new_empty(0, dtype=torch.float64))
        nothing = _or_unused(None, y)
        run_args, run_flags = _running_inputs(None, y.device)
        bn = ((f64, 0, 1, nothing, f64, f64, f64, f64, f64, f64, f64, f64, *run_args),
              dict(BATCH=False, HAS_GAMMA=False, HAS_BETA=False, **run_flags))
        affine, from_bn = scale is not None, False
    else:
        affine, from_bn = True, True
    args, flags = bn
    _launch("bn_lif_fwd_kernel", (n_parts, n_cb), y, s,
            _or_unused(bits, y.new_empty(0, dtype=torch.uint8)), _or_unused(scale, y),
            _or_unused(shift, y), *args, steps, M, C, 0 if bcast else M * C, rows, **consts,
            v_th=float(v_threshold), AFFINE=affine, FROM_BN=from_bn, **flags,
            BITS=bits is not None, EXACT=exact, BLOCK_R=block_r, BLOCK_C=block_c,
            A=_tl_arith(y.dtype))


def bn_lif_forward(y: Tensor, s: Tensor, steps: int, geometry: dict, scale: Optional[Tensor],
                   shift: Optional[Tensor], tau: float, v_threshold: float, pool: bool,
                   bcast: bool, bits: Optional[Tensor] = None) -> None:
    """Spikes of LIF(pool?(y scale + shift)) into ``s`` (see ``qkformer.fused.bn_lif_forward``),
    and unpooled, with ``bits``, packed there too."""
    consts, exact = _lif_consts(tau)
    A = _tl_arith(y.dtype)
    sc, sh = _or_unused(scale, y), _or_unused(shift, y)
    g = geometry
    if pool:
        if bits is not None:
            raise ValueError("bn_lif_forward: the pooled pass writes no bits")
        n_out = g["B"] * g["Ho"] * g["Wo"] * g["C"]
        y_step = 0 if bcast else g["B"] * g["H"] * g["W"] * g["C"]
        _launch("bn_pool_lif_fwd_kernel", (math.ceil(n_out / _BLOCK),), y, s, sc, sh, steps,
                g["B"], g["H"], g["W"], g["C"], g["Ho"], g["Wo"], y_step, **consts,
                v_th=float(v_threshold), AFFINE=scale is not None, EXACT=exact, BLOCK=_BLOCK, A=A)
        return
    _forward_pass(y, s, steps, g["M"], g["C"], scale, shift, bcast, tau, v_threshold, None, bits)


def bn_lif_backward(grad: Tensor, y: Tensor, steps: int, geometry: dict, scale: Optional[Tensor],
                    shift: Optional[Tensor], tau: float, v_threshold: float, alpha: float,
                    detach_reset: bool, bcast: bool, sums: bool, out: Optional[Tensor] = None,
                    bn: Optional[tuple] = None, apply: Optional[tuple] = None,
                    bias_grad: Optional[Tensor] = None) -> Optional[Tensor]:
    """One backward pass of the unpooled unit over ``y`` [steps or 1, M, C]. One launch.

    The affine is ``scale``/``shift``, or with ``bn`` = (gamma, beta, mean, invstd) BatchNorm's
    (gamma and beta may be None), computed in the kernel. ``sums``: returns the per-program
    partial sums ``[P, 2, C]`` of g_Z and g_Z y (nothing is written). Else writes ``out``: g_Z,
    or with ``apply`` = (partial sums of the first pass, n, rep, batch statistics?, g_gamma out,
    g_beta out) the BatchNorm input gradient, and the gradients of gamma and beta into the given
    tensors (None: not wanted); and with ``bias_grad`` (C) the column sums of ``out`` (the
    gradient of the convolution's bias), summed as ``out`` holds them."""
    consts, exact = _lif_consts(tau)
    g = geometry
    M, C = g["M"], g["C"]
    block_r, block_c = _tiles(C, y.dtype)
    n_cb = math.ceil(C / block_c)
    n_parts, rows = _row_split(M, n_cb, block_r, y.device)
    part = (torch.empty((n_parts, 2, C), dtype=torch.float64, device=y.device) if sums
            else _or_unused(None, y))
    gamma, beta, mean, invstd = bn if bn is not None else (None,) * 4
    first, n, rep, batch, g_gamma, g_beta = apply if apply is not None else (None, 1, 1, False,
                                                                             None, None)
    if apply is not None and bn is None:
        raise ValueError("bn_lif_backward: the input gradient needs the BatchNorm (bn=...)")
    f64 = _or_unused(None, torch.empty(0, dtype=torch.float64, device=y.device))
    if bias_grad is not None and (sums or out is None):
        raise ValueError("bn_lif_backward: the bias gradient is summed from what a pass writes")
    bias_part = (torch.empty((n_parts, C), dtype=torch.float64, device=y.device)
                 if bias_grad is not None else f64)
    done = (_flag(y.device, n_cb) if bias_grad is not None
            else _or_unused(None, torch.empty(0, dtype=torch.int32, device=y.device)))
    _launch("bn_lif_bwd_kernel", (n_parts, n_cb), grad, y, _or_unused(out, y), part,
            _or_unused(scale, y), _or_unused(shift, y), _or_unused(gamma, y),
            _or_unused(beta, y), _or_unused(mean, f64), _or_unused(invstd, f64),
            _or_unused(first, f64), first.shape[0] if first is not None else 0, float(n),
            float(rep), _or_unused(g_gamma, y), _or_unused(g_beta, y), bias_part, done,
            _or_unused(bias_grad, y), M, C,
            0 if bcast else M * C, rows, **consts, v_th=float(v_threshold), alpha=float(alpha),
            decay=1.0 - 1.0 / tau, STEPS=steps, BCAST=bcast,
            AFFINE=scale is not None or bn is not None, FROM_BN=bn is not None,
            HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, SUMS=sums, WRITE=not sums,
            APPLY=apply is not None, FULL_BN=apply is not None and batch,
            WANT_GAMMA=g_gamma is not None, WANT_BETA=g_beta is not None,
            NEED_Y=sums or (apply is not None and batch), BIAS=bias_grad is not None,
            EXACT=exact, DETACH=bool(detach_reset), BLOCK_R=block_r, BLOCK_C=block_c,
            A=_tl_arith(y.dtype))
    return part if sums else None


def pool_lif_backward(grad: Tensor, y: Tensor, steps: int, geometry: dict,
                      scale: Optional[Tensor], shift: Optional[Tensor], tau: float,
                      v_threshold: float, alpha: float, detach_reset: bool, bcast: bool,
                      out: Optional[Tensor] = None, sums: bool = False,
                      apply: Optional[tuple] = None) -> Optional[Tensor]:
    """Backward of the pooled unit: the pooled map's g_Z (one launch), then passes that gather
    it back to the pre-pool map ([steps or 1, B, H, W, C]): into ``out`` (its dtype) g_Z, or
    with ``apply`` = (gamma, mean, invstd, n, rep, batch statistics?, g_gamma out, g_beta out)
    the BatchNorm input gradient and the gradients of gamma and beta (None: not wanted).
    Returns the per-program partial sums ``[P, 2, C]`` of g_Z and g_Z y with ``sums`` (in the
    pass that writes g_Z) or ``apply`` (a pass of their own before it), else None."""
    consts, exact = _lif_consts(tau)
    g = geometry
    B, H, W, C, Ho, Wo = g["B"], g["H"], g["W"], g["C"], g["Ho"], g["Wo"]
    A = _arith(y.dtype)
    n_out = B * Ho * Wo * C
    gp = torch.empty((steps, n_out), dtype=A, device=y.device)
    arg = torch.empty((steps, n_out), dtype=torch.int8, device=y.device)
    y_step = 0 if bcast else B * H * W * C
    _launch("pool_lif_bwd_kernel", (math.ceil(n_out / _BLOCK),), grad, y, gp, arg,
            _or_unused(scale, y), _or_unused(shift, y), B, H, W, C, Ho,
            Wo, y_step, **consts, v_th=float(v_threshold), alpha=float(alpha),
            decay=1.0 - 1.0 / tau, STEPS=steps, AFFINE=scale is not None, EXACT=exact,
            DETACH=bool(detach_reset), BLOCK=_BLOCK, A=_tl_arith(y.dtype))
    block_r, block_c = _tiles(C, y.dtype)
    n_cb = math.ceil(C / block_c)
    n_parts, rows = _row_split(B * H * W, n_cb, block_r, y.device)
    f64 = _or_unused(None, torch.empty(0, dtype=torch.float64, device=y.device))

    def scatter(write: bool, with_sums: bool, first: Optional[Tensor] = None) -> Tensor:
        part = (torch.empty((n_parts, 2, C), dtype=torch.float64, device=y.device) if with_sums
                else f64)
        gamma, mean, invstd, n, rep, batch, g_gamma, g_beta = (
            apply if first is not None else (None, None, None, 1, 1, False, None, None))
        _launch("pool_scatter_kernel", (n_parts, n_cb), gp, arg, y, _or_unused(out, y), part,
                _or_unused(first, f64), first.shape[0] if first is not None else 0,
                _or_unused(mean, f64), _or_unused(invstd, f64), _or_unused(gamma, y),
                float(n), float(rep), _or_unused(g_gamma, y), _or_unused(g_beta, y), B, H, W, C,
                Ho, Wo, y_step, rows, STEPS=steps, BCAST=bcast, SUMS=with_sums, WRITE=write,
                APPLY=first is not None, FULL_BN=first is not None and batch,
                HAS_GAMMA=gamma is not None, WANT_GAMMA=g_gamma is not None,
                WANT_BETA=g_beta is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                A=_tl_arith(y.dtype))
        return part

    if apply is None:
        part = scatter(out is not None, sums)
        return part if sums else None
    part = scatter(False, True)
    scatter(True, False, part)
    return part


def bn_affine(gamma: Optional[Tensor], beta: Optional[Tensor], mean: Tensor, invstd: Tensor,
              dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(scale, shift) of BatchNorm as an affine map, in the arithmetic type of ``dtype``: one
    launch."""
    C = mean.numel()
    A = _arith(dtype)
    scale, shift = (torch.empty(C, dtype=A, device=mean.device) for _ in range(2))
    block_c = _pow2(C, 256)
    _launch("bn_affine_kernel", (math.ceil(C / block_c),), _or_unused(gamma, mean),
            _or_unused(beta, mean), mean, invstd, scale, shift, C, HAS_GAMMA=gamma is not None,
            HAS_BETA=beta is not None, BLOCK_C=block_c, A=_tl_arith(dtype))
    return scale, shift


def running_update(running_mean: Tensor, running_var: Tensor, count: Optional[Tensor],
                   mean: Tensor, var: Tensor, momentum: float, n: int) -> None:
    """In place, as ``nn.BatchNorm`` updates its buffers: ``running = (1 - momentum) running +
    momentum batch`` with the variance unbiased (n / (n - 1)), and ``count`` + 1 when given.
    One launch."""
    C = running_mean.numel()
    block_c = _pow2(C, 256)
    _launch("running_update_kernel", (math.ceil(C / block_c),), running_mean, running_var,
            _or_unused(count, running_mean), mean, var, _constant(momentum, mean.device), int(n),
            C, COUNT=count is not None, BLOCK_C=block_c)


def qk_token_forward(qk: Tensor, num_heads: int, tau: float, v_threshold: float
                     ) -> Tuple[Tensor, Tensor]:
    """QKTA on stacked spikes ``qk`` [T, B, N, 2C]: (out [T, B, N, C], the per-head Q sums
    [T, B, N, h] in the arithmetic type). One launch."""
    T, B, N, C2 = qk.shape
    C, R = C2 // 2, B * N
    D = C // num_heads
    consts, exact = _lif_consts(tau)
    out = qk.new_empty((T, B, N, C))
    qs = torch.empty((T, B, N, num_heads), dtype=_arith(qk.dtype), device=qk.device)
    block_d = _pow2(D, 1 << 16)
    block_r = max(1, 4096 // block_d)
    _launch("qk_token_fwd_kernel", (math.ceil(R / block_r), num_heads), qk, out, qs, R, C,
            num_heads, D, **consts, v_th=float(v_threshold), STEPS=T, EXACT=exact,
            BLOCK_R=block_r, BLOCK_D=block_d, A=_tl_arith(qk.dtype))
    return out, qs


def qk_token_backward(g_out: Tensor, k: Tensor, qs: Tensor, tau: float, v_threshold: float,
                      alpha: float, detach_reset: bool) -> Tensor:
    """Backward of :func:`qk_token_forward`: [g_q | g_k] [T, B, N, 2C] in ``k``'s dtype. One
    launch."""
    T, B, N, C = k.shape
    H = qs.shape[-1]
    R, D = B * N, C // H
    consts, exact = _lif_consts(tau)
    out = k.new_empty((T, B, N, 2 * C))
    block_d = _pow2(D, 1 << 16)
    block_r = max(1, 2048 // block_d)
    _launch("qk_token_bwd_kernel", (math.ceil(R / block_r), H), g_out, k, qs, out, R, C, H, D,
            **consts, v_th=float(v_threshold), alpha=float(alpha), decay=1.0 - 1.0 / tau,
            STEPS=T, EXACT=exact, DETACH=bool(detach_reset), BLOCK_R=block_r, BLOCK_D=block_d,
            A=_tl_arith(k.dtype))
    return out


_SSA_TILE = {"forward": 4096, "backward": 2048}  # elements of a [tokens, channels] tile
_SSA_MAX_HEAD = 128


def ssa_blocks(tokens: int, head_dim: int, direction: str = "forward"
               ) -> Optional[Tuple[int, int]]:
    """(BLOCK_N, BLOCK_D) of an SSA kernel: a head's channels in one tile, its tokens in
    blocks (the backward pass keeps T tiles of charges in registers, hence smaller blocks);
    None for heads wider than the kernels take, or for more tokens than TF32 holds kᵀ v of
    exactly (the caller then takes the torch route)."""
    if head_dim > _SSA_MAX_HEAD or tokens > 2048:
        return None
    block_d = max(16, _pow2(head_dim, _SSA_MAX_HEAD))
    return max(16, _pow2(tokens, _SSA_TILE[direction] // block_d)), block_d


def ssa_forward(qkv: Tensor, num_heads: int, scale: float, tau: float,
                v_threshold: float) -> Tensor:
    """SSA on stacked spikes ``qkv`` [T, B, N, 3C] (contiguous): LIF((q (kᵀ v)) scale) per
    head, [T, B, N, C]. One launch."""
    T, B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    block_n, block_d = ssa_blocks(N, D)
    consts, exact = _lif_consts(tau)
    out = qkv.new_empty((T, B, N, C))
    _launch("ssa_fwd_kernel", (B, num_heads, math.ceil(N / block_n)), qkv, out,
            _constant(scale, qkv.device), B, N, C, D, **consts, v_th=float(v_threshold),
            STEPS=T, EXACT=exact, BLOCK_N=block_n, BLOCK_D=block_d, A=_tl_arith(qkv.dtype))
    return out


def ssa_backward(g_out: Tensor, qkv: Tensor, num_heads: int, scale: float, tau: float,
                 v_threshold: float, alpha: float, detach_reset: bool) -> Tensor:
    """Backward of :func:`ssa_forward`: [g_q | g_k | g_v] [T, B, N, 3C] in ``qkv``'s dtype,
    from ``g_out`` [T, B, N, C] (both contiguous). One launch where a head's tokens fit one
    block, else two (the second sums the blocks' shares of g_kv)."""
    T, B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    block_n, block_d = ssa_blocks(N, D, "backward")
    n_blocks = math.ceil(N / block_n)
    consts, exact = _lif_consts(tau)
    out = torch.empty_like(qkv)
    A = _arith(qkv.dtype)
    part = (torch.empty((B, num_heads, n_blocks, T, D, D), dtype=A, device=qkv.device)
            if n_blocks > 1 else _or_unused(None, torch.empty(0, dtype=A, device=qkv.device)))
    grid = (B, num_heads, n_blocks)
    _launch("ssa_bwd_kernel", grid, g_out, qkv, out, part, _constant(scale, qkv.device), B, N,
            C, D, n_blocks, **consts, v_th=float(v_threshold), alpha=float(alpha),
            decay=1.0 - 1.0 / tau, STEPS=T, EXACT=exact, DETACH=bool(detach_reset),
            WHOLE=n_blocks == 1, BLOCK_N=block_n, BLOCK_D=block_d, A=_tl_arith(qkv.dtype))
    if n_blocks > 1:
        _launch("ssa_bwd_kv_kernel", grid, qkv, out, part, B, N, C, D, n_blocks, STEPS=T,
                BLOCK_N=block_n, BLOCK_D=block_d, A=_tl_arith(qkv.dtype))
    return out


# --------------------------------------------------------------------------------------------
# compact storage with a device-side check
class Packed:
    """A packed tensor whose check (did every value fit?) lives on the device.

    The original stays referenced until the check is known on the host, which never waits
    for it: on CUDA the flag is copied to pinned memory behind an event, and :meth:`resolved`
    only asks whether the event has passed. Until then (or when a value did not fit) the
    original is what :meth:`stored` hands to the backward pass, so results are exact either way.
    """

    __slots__ = ("data", "flag", "_host", "_event", "original", "_ok")

    def __init__(self, data: Tensor, flag: Tensor, original: Tensor):
        self.data, self.flag, self.original = data, flag, original
        self._ok: Optional[bool] = None
        self._host = self._event = None
        if flag.device.type == "cuda":
            self._host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:  # the interpreter ran the kernel already: the flag is known
            self._ok = int(flag) == 0
            self._settle()

    def _settle(self) -> None:
        if self._ok:
            self.original = None  # the packed copy is exact: let the original go

    def resolved(self) -> bool:
        """The check is known on the host (asks without waiting)."""
        if self._ok is None and self._event is not None and self._event.query():
            self._ok = int(self._host[0]) == 0
            self._settle()
        return self._ok is not None

    def fits(self) -> bool:
        """Known to fit (False also while unknown)."""
        return self.resolved() and bool(self._ok)


_pending: List[Packed] = []


def _poll() -> None:
    """Resolve the checks that the device has finished (releases originals; never waits)."""
    _pending[:] = [p for p in _pending if not p.resolved()]


_flags: Dict[torch.device, list] = {}  # device -> [buffer of zeroed flags, next free index]
_FLAGS = 1024


def _flag(device: torch.device, n: int = 1) -> Tensor:
    """``n`` zeroed int32 flags or counters, from a block zeroed in one launch (each used
    once)."""
    ring = _flags.get(device)
    if n > _FLAGS or _tracing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    if ring is None or ring[1] + n > _FLAGS:
        ring = _flags[device] = [torch.zeros(_FLAGS, dtype=torch.int32, device=device), 0]
    ring[1] += n
    return ring[0][ring[1] - n:ring[1]]


def pack(x: Tensor, fmt: str) -> Packed:
    """Pack contiguous ``x`` to ``fmt`` 'bits' (values 0/1) or 'u8' (integers 0-255)."""
    return packed(*pack_flagged(x, fmt), x)


def pack_flagged(x: Tensor, fmt: str) -> Tuple[Tensor, Tensor]:
    """:func:`pack`'s launch: the packed data and the device-side flag (nonzero: a value did
    not fit), without a record that waits for the host."""
    flat = x.reshape(-1)
    n = flat.numel()
    flag = _flag(x.device)
    if fmt == "bits":
        out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
        block = 256
        _launch("to_bits_kernel", (math.ceil(out.numel() / block),), flat, out, flag, n,
                BLOCK=block, A=_tl_arith(x.dtype))
    else:
        out = torch.empty(n, dtype=torch.uint8, device=x.device)
        _launch("to_u8_kernel", (math.ceil(n / _BLOCK),), flat, out, flag, n, BLOCK=_BLOCK,
                A=_tl_arith(x.dtype))
    return out, flag


# --------------------------------------------------------------------------------------------
# GEMMs that take part in the unit. Not on the default route: whether they beat cuBLAS with a
# separate pass at the unit's shapes is measured by benchmarks/gpu_gemm_fusion.py on a GPU.
def gemms_enabled() -> bool:
    """``QKFORMER_TRITON_GEMMS=1``: the unit's 1x1 projections run as these GEMMs (off by
    default until a GPU has shown that they pay)."""
    return flag("QKFORMER_TRITON_GEMMS", False)


def _tl_storage(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def _gemm(a: Tensor, a_strides, a_packed: int, b: Tensor, b_strides, b_packed: int, I: int,
          J: int, K: int, dtype: torch.dtype, bias: Optional[Tensor] = None,
          ref: Optional[Tensor] = None, splits: int = 1) -> Tuple[Tensor, Optional[Tensor]]:
    """C = A B (see gemm_kernel) in ``dtype``: ``(C [I, J], part [P, 2, J] or None)``; with
    ``splits`` > 1 the K range is split over programs whose float partial products are added
    in split order (one more launch)."""
    device = a.device
    block_i = 128 if I >= 128 else max(16, _pow2(I, 128))
    block_j = max(16, _pow2(J, 128))
    block_k = 32 if dtype in (torch.float16, torch.bfloat16) else 16
    splits = max(1, min(splits, math.ceil(K / block_k)))
    k_per = math.ceil(math.ceil(K / splits) / block_k) * block_k
    splits = math.ceil(K / k_per)
    A = _arith(dtype)
    out = torch.empty((splits, I, J) if splits > 1 else (I, J),
                      dtype=A if splits > 1 else dtype, device=device)
    n_i = math.ceil(I / block_i)
    part = (torch.empty((n_i, 2, J), dtype=torch.float64, device=device) if ref is not None
            else None)
    like = torch.empty(0, dtype=dtype, device=device)
    _launch("gemm_kernel", (n_i, math.ceil(J / block_j), splits), a, b, out,
            _or_unused(bias, like), _or_unused(ref, like),
            _or_unused(part, torch.empty(0, dtype=torch.float64, device=device)), I, J, K, k_per,
            *a_strides, *b_strides, A_PACKED=a_packed, B_PACKED=b_packed, BIAS=bias is not None,
            STATS=ref is not None, IEEE=dtype in (torch.float32, torch.float64),
            BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_K=block_k, T=_tl_storage(dtype),
            A=_tl_arith(dtype))
    if splits > 1:
        out = out.sum(0).to(dtype)
    return out, part


def linear_stats(x2: Tensor, weight: Tensor, bias: Optional[Tensor],
                 ref: Tensor) -> Tuple[Tensor, Tensor]:
    """``y = x2 weightᵀ (+ bias)`` for x2 [M, K] and weight [N, K], with BatchNorm's partial
    sums of y about ``ref`` [N] from the GEMM's epilogue: ``(y, part)``, part as
    :func:`colstats` returns it. One launch."""
    M, K = x2.shape
    N = weight.shape[0]
    if x2.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("linear_stats: x2 and weight need contiguous rows")
    y, part = _gemm(x2, (x2.stride(0), 1), 0, weight, (1, weight.stride(0)), 0, M, N, K,
                    x2.dtype, bias=bias, ref=ref)
    return y, part


def weight_grad_packed(g2: Tensor, data: Tensor, fmt: str, K: int) -> Tensor:
    """``g2ᵀ X`` for g2 [M, N] and X [M, K] as :func:`pack` stored it (``fmt`` 'bits' or
    'u8'): the weight gradient of a projection of spikes or counts without unpacking them.
    Split over the M rows to fill the device."""
    M, N = g2.shape
    per_byte = 8 if fmt == "bits" else 1
    if g2.stride(1) != 1 or data.numel() * per_byte < M * K:
        raise ValueError(f"weight_grad_packed: g2 needs contiguous rows and the {fmt} of M K "
                         f"values")
    splits = max(1, _programs(g2.device) // (math.ceil(N / 128) * math.ceil(K / 128)))
    packed = 1 if fmt == "bits" else 2
    if g2.dtype == torch.float64:  # Triton has no float64 MMA for an operand made in registers
        data, packed = unpack(data, fmt, M * K, torch.float64), 0
    gw, _ = _gemm(g2, (1, g2.stride(0)), 0, data, (K, 1), packed, N, K, M, g2.dtype,
                  splits=splits)
    return gw


def add_counts(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``a + b`` (contiguous, of one shape and dtype), and the sum as bytes with its check flag
    (``packed(data, flag, sum)`` is then what ``pack(a + b, 'u8')`` returns), in one launch."""
    n = a.numel()
    out = torch.empty_like(a)
    data = torch.empty(n, dtype=torch.uint8, device=a.device)
    flag = _flag(a.device)
    _launch("add_u8_kernel", (math.ceil(n / _BLOCK),), a, b, out, data, flag, n, BLOCK=_BLOCK,
            A=_tl_arith(a.dtype))
    return out, data, flag


def packed(data: Tensor, flag: Tensor, original: Tensor) -> Packed:
    """The :class:`Packed` record of ``original`` packed into ``data`` with the check ``flag``
    (pending until the host has seen it)."""
    _poll()
    record = Packed(data, flag, original)
    if not record.resolved():
        _pending.append(record)
    return record


def unpack(data: Tensor, fmt: str, n: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`pack`: ``n`` values of ``dtype`` (flat)."""
    _poll()
    out = torch.empty(n, dtype=dtype, device=data.device)
    name = "from_bits_kernel" if fmt == "bits" else "from_u8_kernel"
    _launch(name, (math.ceil(n / _BLOCK),), data, out, n, BLOCK=_BLOCK)
    return out
