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

import math

import torch
from torch import nn

__all__ = ["MultiStepLIF", "lif_multistep", "LIFTorchFunction", "resolve_backend"]

BACKENDS = ("auto", "torch", "cupy")


# Elements per block of the CPU loop: the few temporaries of a block stay in the L2 cache while
# the T steps run over it, so each element crosses the memory bus about once per pass instead of
# once per elementwise op. On CUDA one block covers the whole tensor.
CPU_BLOCK = 1 << 17


def _blocks(n: int, device: torch.device):
    step = n if device.type != "cpu" else CPU_BLOCK
    for a in range(0, n, max(step, 1)):
        yield a, min(a + step, n)


def lif_forward_torch(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool = True):
    """Forward over the leading time axis. Returns ``(spikes, h_seq)``; ``h_seq`` is the charged
    potential before reset (None unless ``save_h``). The membrane after reset is
    ``h_seq * (1 - spikes)``.

    Each block runs the same per-neuron loop as the CUDA kernel (qkformer/cuda/lif_kernel.cu):
    charge, compare, reset, for t = 0 .. T-1.
    """
    T = x.shape[0]
    x2 = x.reshape(T, -1)
    n = x2.shape[1]
    spikes = torch.empty_like(x2)
    h_seq = torch.empty_like(x2) if save_h else None
    step = min(n, CPU_BLOCK) if x.device.type == "cpu" else n
    v_buf = x2.new_empty(step)
    h_buf = None if save_h else x2.new_empty(step)
    # v + (x - v) * (1/tau) equals v + (x - v) / tau bit for bit when 1/tau is a power of two
    # (tau = 2 everywhere in QKFormer); otherwise divide, as spikingjelly's torch backend does.
    exact_inverse = math.log2(tau).is_integer()
    for a, b in _blocks(n, x.device):
        v = v_buf[: b - a]
        for t in range(T):
            h = h_seq[t, a:b] if save_h else h_buf[: b - a]
            if t == 0:  # V_0 = 0
                torch.div(x2[t, a:b], tau, out=h)
            else:
                torch.sub(x2[t, a:b], v, out=h)
                if exact_inverse:
                    torch.add(v, h, alpha=1.0 / tau, out=h)
                else:
                    h.div_(tau).add_(v)
            s = spikes[t, a:b]
            torch.ge(h, v_threshold, out=s)
            torch.addcmul(h, h, s, value=-1.0, out=v)  # hard reset: V = H - H*S
    return spikes.view_as(x), h_seq


def lif_backward_torch(grad_spikes: torch.Tensor, h_seq: torch.Tensor, tau: float,
                       v_threshold: float, alpha: float, detach_reset: bool) -> torch.Tensor:
    """BPTT through the recursion, running t = T-1 .. 0, block by block like the forward.

    g_H(t) = g_S(t) sg'(t) + g_H(t+1) (1 - 1/tau) dV_t/dH_t,   g_X(t) = g_H(t) / tau
    with sg' = alpha sig (1 - sig), sig = sigmoid(alpha (H - V_th)) (spikingjelly's Sigmoid),
    and dV/dH = 1 - S (detach_reset) or 1 - S - H sg' (reset differentiated through S).
    """
    T = h_seq.shape[0]
    g_s = grad_spikes.reshape(T, -1)
    n = h_seq.shape[1]
    grad_x = torch.empty_like(h_seq)
    step = min(n, CPU_BLOCK) if h_seq.device.type == "cpu" else n
    carry_buf, sg_buf, gh_buf = (h_seq.new_empty(step) for _ in range(3))
    decay = 1.0 - 1.0 / tau
    for a, b in _blocks(n, h_seq.device):
        carry, sg, g_h = carry_buf[: b - a], sg_buf[: b - a], gh_buf[: b - a]
        for t in range(T - 1, -1, -1):
            h = h_seq[t, a:b]
            torch.sub(h, v_threshold, out=sg)
            sg.mul_(alpha).sigmoid_()
            torch.addcmul(sg, sg, sg, value=-1.0, out=sg)  # sig (1 - sig)
            sg.mul_(alpha)
            torch.mul(g_s[t, a:b], sg, out=g_h)
            if t < T - 1:  # carry = g_H(t+1) (1 - 1/tau), times dV_t/dH_t
                if not detach_reset:
                    g_h.addcmul_(carry, h * sg, value=-1.0)
                carry.masked_fill_(h >= v_threshold, 0.0)
                g_h.add_(carry)
            torch.div(g_h, tau, out=grad_x[t, a:b])
            torch.mul(g_h, decay, out=carry)
    return grad_x


class LIFTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tau, v_threshold, alpha, detach_reset):
        spikes, h_seq = lif_forward_torch(x, tau, v_threshold, save_h=x.requires_grad)
        if h_seq is not None:
            ctx.save_for_backward(h_seq)
        ctx.params = (tau, v_threshold, alpha, detach_reset)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        (h_seq,) = ctx.saved_tensors
        tau, v_threshold, alpha, detach_reset = ctx.params
        grad_x = lif_backward_torch(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset)
        return grad_x.view_as(grad_spikes), None, None, None, None


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
