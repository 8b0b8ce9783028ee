"""Multistep leaky integrate-and-fire neuron (docs/original.md §1).

Semantics are those of spikingjelly 0.0.0.0.12/14 ``MultiStepLIFNode(tau=2, decay_input=True,
v_reset=0, detach_reset=True)`` with the ``Sigmoid(alpha=4)`` surrogate:

    H_t = V_{t-1} + (X_t - V_{t-1}) / tau        charge (decay_input, v_reset = 0)
    S_t = 1[H_t - V_th >= 0]                     fire
    V_t = H_t * (1 - S_t)                        hard reset to 0

Unlike spikingjelly the module is stateless: every call starts from V_0 = 0, which is exactly what
the original achieved by calling ``reset_net`` after each batch. Nothing needs resetting, and the
batch size may change from one call to the next.

Two backends share one algorithm. ``torch`` runs a loop over T in plain tensor ops
(``qkformer.lif_loops``) with a hand-written BPTT backward (no per-step autograd graph: that graph
is what makes the reference neuron slow and memory-hungry). ``cupy`` runs the same loop inside one
CUDA thread per neuron (``qkformer.cuda``), after a self-check against the torch loops on first
use per device and dtype, and falls back to them when the check or a launch fails. Both save only
H (the charged potential) for the backward pass; spikes and the surrogate derivative are
recomputed from it.

Layers: :func:`lif_forward` / :func:`lif_backward` pick the backend and run it, without autograd
(for layers that fuse the neuron into their own autograd Function). :func:`lif_multistep` and
:class:`MultiStepLIF` add autograd. For ``torch.compile`` the pair is also registered as the custom
ops ``qkformer::lif_forward`` / ``qkformer::lif_backward`` (fake kernels, autograd formula saving
only H), so a compiled graph holds one opaque node per neuron and does not break at it. Eager
calls skip the dispatcher and use a plain autograd Function with the same formula: the custom-op
autograd wrapper costs tens of microseconds of Python per call, which is the whole budget of a
small kernel launch on a GPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cuda as lif_cuda
from .lif_loops import lif_backward_torch, lif_forward_torch

__all__ = ["MultiStepLIF", "lif_multistep", "lif_forward", "lif_backward", "resolve_backend",
           "describe_backend", "lif_forward_torch", "lif_backward_torch", "BACKENDS"]

BACKENDS = ("auto", "torch", "cupy")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown LIF backend {backend!r}; expected one of {BACKENDS}")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"LIF input must be [T, ...] with at least 2 dims, "
                         f"got shape {tuple(x.shape)}")


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that serves ``x``: 'cupy' where the CUDA kernel is to be tried ('auto' on a
    CUDA tensor when CuPy works), else 'torch'. The kernel may still hand a call back to the torch
    loops (dtype without a kernel, failed self-check or launch: see ``qkformer.cuda``)."""
    _check_backend(backend)
    if backend == "torch":
        return "torch"
    if not lif_cuda.handles(x):
        if backend == "cupy":
            raise RuntimeError(f"LIF backend 'cupy' needs a CUDA tensor, got one on {x.device}")
        return "torch"
    if backend == "cupy":
        lif_cuda.require_available()  # raises with the real reason
        return "cupy"
    if lif_cuda.is_available():
        return "cupy"
    if lif_cuda.kernel_required():
        raise RuntimeError(f"{lif_cuda.REQUIRE_ENV} is set but the LIF CUDA kernel is unavailable: "
                           f"{lif_cuda.unavailable_reason()}")
    return "torch"


def describe_backend(device) -> str:
    """One line for the logs: the backend 'auto' uses on ``device`` and, if not the kernel, why."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"LIF backend: torch ({device.type.upper()} tensors)"
    if not lif_cuda.is_available():
        return f"LIF backend: torch, since {lif_cuda.unavailable_reason()}"
    check = ("self-check against the torch backend on first use per dtype"
             if lif_cuda.selfcheck_enabled() else f"self-check skipped: {lif_cuda.SELFCHECK_ENV}=0")
    return f"LIF backend: cupy (fused CUDA kernel; {check})"


def _forward(x, tau, v_threshold, save_h, backend):
    """(spikes shaped like ``x``, H in the serving backend's layout or None). Grad mode off."""
    if resolve_backend(backend, x) == "cupy":
        out = lif_cuda.forward(x, tau, v_threshold, save_h, strict=backend == "cupy")
        if out is not None:
            return out
    return lif_forward_torch(x, tau, v_threshold, save_h)


def _backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset, backend):
    """Input gradient in ``h_seq``'s or the [T, N] layout (the caller views it). Grad mode off."""
    if grad_spikes.dtype != h_seq.dtype:
        grad_spikes = grad_spikes.to(h_seq.dtype)
    if resolve_backend(backend, h_seq) == "cupy":
        grad_x = lif_cuda.backward(grad_spikes.reshape(h_seq.shape), h_seq, tau, v_threshold,
                                   alpha, detach_reset, strict=backend == "cupy")
        if grad_x is not None:
            return grad_x
    if h_seq.dim() != 2:
        h_seq = h_seq.reshape(h_seq.shape[0], -1)
    return lif_backward_torch(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset)


def lif_forward(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool,
                backend: str = "auto"):
    """Multistep LIF forward pass without autograd, for layers with their own backward.

    Returns the spikes of ``x`` (starting from V_0 = 0) and, if ``save_h``, the charged
    potentials H that :func:`lif_backward` needs, else None. Both are contiguous and of
    ``x``'s dtype; neither requires grad.

    Args:
        x: the input current, time on the first axis.
        tau: membrane time constant.
        v_threshold: firing threshold V_th.
        save_h: also return H (only the backward pass needs it).
        backend: 'auto', 'torch' or 'cupy' (see :func:`resolve_backend`).

    Shape:
        - Input: ``[T, *]``
        - Output: ``(spikes, H)``, each ``[T, *]`` like ``x`` (H None unless ``save_h``)
    """
    _check_input(x)
    if x.requires_grad:  # the loops write with out=, which autograd refuses on such inputs
        x = x.detach()
    spikes, h_seq = _forward(x, tau, v_threshold, save_h, backend)
    if h_seq is not None and h_seq.shape != x.shape:
        h_seq = h_seq.view(x.shape)
    return spikes, h_seq


def lif_backward(grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float, v_threshold: float,
                 alpha: float, detach_reset: bool, backend: str = "auto") -> torch.Tensor:
    """Multistep LIF backward pass (BPTT with the sigmoid surrogate) without autograd.

    The input gradient is computed from the gradient of the spikes and the H that
    :func:`lif_forward` saved (docs/original.md §1.3); spikes are recomputed from H. The result
    is contiguous, of ``h_seq``'s dtype.

    Args:
        grad_spikes: gradient of the spikes, in any layout with ``h_seq``'s number of elements.
        h_seq: the charged potentials saved by :func:`lif_forward`.
        tau: membrane time constant.
        v_threshold: firing threshold V_th.
        alpha: slope of the sigmoid surrogate.
        detach_reset: treat the spike inside the reset as a constant.
        backend: 'auto', 'torch' or 'cupy' (see :func:`resolve_backend`).

    Shape:
        - Input: ``grad_spikes`` any shape with ``h_seq.numel()`` elements; ``h_seq`` ``[T, *]``
        - Output: shaped like ``grad_spikes``
    """
    _check_input(h_seq)
    grad_spikes, h_seq = grad_spikes.detach(), h_seq.detach()
    grad_x = _backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset, backend)
    return grad_x.view(grad_spikes.shape)


# ------------------------------------------------------------------------------------ eager


class _LIFFunction(torch.autograd.Function):
    """Eager autograd: spikes out, only H saved (in the layout its backend produced)."""

    @staticmethod
    def forward(ctx, x, tau, v_threshold, alpha, detach_reset, backend, save_h):
        spikes, h_seq = _forward(x, tau, v_threshold, save_h, backend)
        if h_seq is not None:
            ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, alpha, detach_reset, backend)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        # The BPTT formula is not itself differentiable: under create_graph, mark the result so
        # that a double backward fails instead of being silently wrong. Only then: the marking
        # costs as much Python as the rest of this function.
        if torch.is_grad_enabled():
            return _backward_once(ctx, grad_spikes)
        return _backward_body(ctx, grad_spikes)


def _backward_body(ctx, grad_spikes):
    (h_seq,) = ctx.saved_tensors
    grad_x = _backward(grad_spikes, h_seq, *ctx.params).view(grad_spikes.shape)
    return grad_x, None, None, None, None, None, None


_backward_once = once_differentiable(_backward_body)


# --------------------------------------------------------------------- custom ops (compile)


@torch.library.custom_op("qkformer::lif_forward", mutates_args=())
def _lif_forward_op(x: torch.Tensor, tau: float, v_threshold: float, alpha: float,
                    detach_reset: bool, save_h: bool,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(spikes, H) with H empty unless ``save_h``; alpha and detach_reset only shape the
    backward, which gets them from here."""
    spikes, h_seq = lif_forward(x, tau, v_threshold, save_h, backend)
    return spikes, (h_seq if h_seq is not None else x.new_empty(0))


@_lif_forward_op.register_fake
def _(x, tau, v_threshold, alpha, detach_reset, save_h, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape if save_h else (0,))


@torch.library.custom_op("qkformer::lif_backward", mutates_args=())
def _lif_backward_op(grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float,
                     v_threshold: float, alpha: float, detach_reset: bool,
                     backend: str) -> torch.Tensor:
    return lif_backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset, backend)


@_lif_backward_op.register_fake
def _(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset, backend):
    return h_seq.new_empty(grad_spikes.shape)


def _setup_context(ctx, inputs, output):
    _, tau, v_threshold, alpha, detach_reset, _, backend = inputs
    h_seq = output[1]
    ctx.mark_non_differentiable(h_seq)
    ctx.set_materialize_grads(False)  # no zero tensor the size of H for its gradient
    ctx.save_for_backward(h_seq)
    ctx.params = (tau, v_threshold, alpha, detach_reset, backend)


@once_differentiable
def _op_backward(ctx, grad_spikes, _grad_h):
    if grad_spikes is None:
        return (None,) * 7
    (h_seq,) = ctx.saved_tensors
    if h_seq.numel() != grad_spikes.numel():
        raise RuntimeError("qkformer::lif_forward ran with save_h=False: no H to differentiate")
    grad_x = torch.ops.qkformer.lif_backward(grad_spikes, h_seq, *ctx.params)
    return grad_x, None, None, None, None, None, None


_lif_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


# -------------------------------------------------------------------------------- public API


def lif_multistep(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                  detach_reset: bool = True, backend: str = "auto") -> torch.Tensor:
    """Functional multistep LIF over the first axis of ``x``, starting from V = 0.

    The functional form of :class:`MultiStepLIF`, with autograd: only H is saved for the
    backward pass, and only when ``x`` requires grad. Under ``torch.compile`` it is the custom
    op ``qkformer::lif_forward``, one opaque node.

    Args:
        x: the input current, time on the first axis.
        tau: membrane time constant. Default: 2.0
        v_threshold: firing threshold V_th (a spike when H >= V_th). Default: 1.0
        alpha: slope of the sigmoid surrogate gradient. Default: 4.0
        detach_reset: treat the spike inside the reset as a constant in the backward pass.
            Default: True
        backend: 'auto', 'torch' or 'cupy' (see :func:`resolve_backend`). Default: 'auto'

    Shape:
        - Input: ``[T, *]``
        - Output: ``[T, *]``, spikes in {0, 1} of the input's dtype
    """
    _check_input(x)
    _check_backend(backend)
    # Inside Function.forward grad mode is off and needs_input_grad ignores no_grad: decide here.
    save_h = torch.is_grad_enabled() and x.requires_grad
    params = (float(tau), float(v_threshold), float(alpha), bool(detach_reset))
    if torch.compiler.is_compiling():
        return torch.ops.qkformer.lif_forward(x, *params, save_h, backend)[0]
    return _LIFFunction.apply(x, *params, backend, save_h)


class MultiStepLIF(nn.Module):
    """Stateless multistep leaky integrate-and-fire neuron (docs/original.md §1).

    Charges with H_t = V_{t-1} + (X_t - V_{t-1}) / tau, fires S_t = 1[H_t >= V_th] and resets
    hard to 0, over the first axis of the input, starting from V_0 = 0 on every call. The
    backward pass uses the sigmoid surrogate with slope ``alpha``. Holds no parameters or
    buffers, so it adds nothing to a state_dict (as in the original).

    Args:
        tau: membrane time constant. Default: 2.0
        v_threshold: firing threshold V_th; 0.5 for the attention neurons (on Q-K attention's
            counts that is an OR, docs/original.md §1.4). Default: 1.0
        detach_reset: treat the spike inside the reset as a constant in the backward pass.
            Default: True
        alpha: slope of the sigmoid surrogate gradient. Default: 4.0
        backend: 'auto' (the CUDA kernel where it works, else the torch loops), 'torch' or
            'cupy'. Default: 'auto'

    Shape:
        - Input: ``[T, *]``, time first
        - Output: ``[T, *]``, spikes in {0, 1}, same shape and dtype as the input
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, detach_reset: bool = True,
                 alpha: float = 4.0, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)
        self.detach_reset = bool(detach_reset)
        self.alpha = float(alpha)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lif_multistep(x, self.tau, self.v_threshold, self.alpha, self.detach_reset,
                             self.backend)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, v_threshold={self.v_threshold}, detach_reset={self.detach_reset}, "
                f"alpha={self.alpha}, backend={self.backend!r}")
