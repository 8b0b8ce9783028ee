"""Multistep leaky integrate-and-fire neuron (SPEC §1).

Semantics are those of spikingjelly 0.0.0.0.12/14 ``MultiStepLIFNode(tau=2, decay_input=True,
v_reset=0, detach_reset=True)`` with the ``Sigmoid(alpha=4)`` surrogate:

    H_t = V_{t-1} + (X_t - V_{t-1}) / tau        charge (decay_input, v_reset = 0)
    S_t = 1[H_t - V_th >= 0]                     fire
    V_t = H_t * (1 - S_t)                        hard reset to 0

Unlike spikingjelly the module is stateless: every call starts from V_0 = 0, which is exactly what
the original achieved by calling ``reset_net`` after each batch. Nothing needs resetting, and the
batch size may change from one call to the next.

Two backends share one algorithm. ``torch`` runs a loop over T in plain tensor ops inside a single
autograd Function with a hand-written BPTT backward (no per-step autograd graph: that graph is
what makes the reference neuron slow and memory-hungry). ``cupy`` runs the same loop inside one
CUDA thread per neuron (see ``qkformer/cuda``). Both save only H (the charged potential) for the
backward pass; spikes and the surrogate derivative are recomputed from it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MultiStepLIF", "lif_multistep", "LIFTorchFunction", "resolve_backend"]

BACKENDS = ("auto", "torch", "cupy")


def _surrogate_grad(h: torch.Tensor, v_threshold: float, alpha: float) -> torch.Tensor:
    # d/du Heaviside ~ alpha * sigmoid(alpha u) * (1 - sigmoid(alpha u)), as spikingjelly's Sigmoid
    sg = ((h - v_threshold) * alpha).sigmoid()
    return (1.0 - sg) * sg * alpha


def lif_forward_torch(x: torch.Tensor, tau: float, v_threshold: float):
    """Forward over the leading time axis. Returns (spikes, h_seq, v_seq).

    The loop body mirrors the CUDA kernel: one read of X_t, one charge, one compare, one reset.
    """
    spikes = torch.empty_like(x)
    h_seq = torch.empty_like(x)
    v_seq = torch.empty_like(x)
    v = torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        # (x - v) / tau, not (x - v) * (1/tau): bit-identical to spikingjelly's torch backend for
        # any tau (they coincide for tau = 2, the value every QKFormer neuron uses).
        h = v + (x[t] - v) / tau
        h_seq[t] = h
        fired = h >= v_threshold
        spikes[t] = fired
        v = h.masked_fill(fired, 0.0)
        v_seq[t] = v
    return spikes, h_seq, v_seq


def lif_backward_torch(grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float,
                       v_threshold: float, alpha: float, detach_reset: bool) -> torch.Tensor:
    """BPTT through the recursion, running t = T-1 .. 0.

    g_H(t) = g_S(t) sg'(t) + g_H(t+1) (1 - 1/tau) dV_t/dH_t,   g_X(t) = g_H(t) / tau
    with dV/dH = 1 - S (detach_reset) or 1 - S - H sg' (reset differentiated through S).
    """
    sg = _surrogate_grad(h_seq, v_threshold, alpha)
    keep = (h_seq < v_threshold).to(h_seq.dtype)  # 1 - S
    dv_dh = keep if detach_reset else keep - h_seq * sg
    grad_s_term = grad_spikes * sg  # the non-recurrent part, for all t at once
    decay = 1.0 - 1.0 / tau
    grad_x = torch.empty_like(h_seq)
    carry = None  # g_H(t+1) * (1 - 1/tau)
    for t in range(h_seq.shape[0] - 1, -1, -1):
        g_h = grad_s_term[t] if carry is None else grad_s_term[t] + carry * dv_dh[t]
        grad_x[t] = g_h / tau
        carry = g_h * decay
    return grad_x


class LIFTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tau, v_threshold, alpha, detach_reset):
        spikes, h_seq, _ = lif_forward_torch(x, tau, v_threshold)
        if x.requires_grad:
            ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, alpha, detach_reset)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors
        tau, v_threshold, alpha, detach_reset = ctx.params
        grad_x = lif_backward_torch(grad_spikes.contiguous(), h_seq, tau, v_threshold, alpha,
                                    detach_reset)
        return grad_x, None, None, None, None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Pick the backend for ``x``. 'auto' means the CUDA kernel on a CUDA tensor when CuPy works."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown LIF backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    if not x.is_cuda:
        if backend == "cupy":
            raise RuntimeError(f"LIF backend 'cupy' needs a CUDA tensor, got one on {x.device}")
        return "torch"
    from qkformer import cuda as lif_cuda

    if backend == "cupy":
        lif_cuda.require_available()  # raises with the real reason
        return "cupy"
    return "cupy" if lif_cuda.is_available() else "torch"


def lif_multistep(x: torch.Tensor, tau: float = 2.0, v_threshold: float = 1.0, alpha: float = 4.0,
                  detach_reset: bool = True, backend: str = "auto") -> torch.Tensor:
    """Functional multistep LIF over the first axis of ``x`` ([T, ...]), starting from V = 0."""
    if x.dim() < 2:
        raise ValueError(f"LIF input must be [T, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if resolve_backend(backend, x) == "cupy":
        from qkformer import cuda as lif_cuda

        return lif_cuda.LIFCupyFunction.apply(x, tau, v_threshold, alpha, detach_reset)
    return LIFTorchFunction.apply(x, tau, v_threshold, alpha, detach_reset)


class MultiStepLIF(nn.Module):
    """Stateless multistep LIF neuron. Input ``[T, ...]``; output spikes, same shape and dtype.

    Holds no parameters or buffers, so it adds nothing to a state_dict (as in the original).
    """

    def __init__(self, tau: float = 2.0, v_threshold: float = 1.0, detach_reset: bool = True,
                 alpha: float = 4.0, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown LIF backend {backend!r}; expected one of {BACKENDS}")
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
