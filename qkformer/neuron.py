"""Multistep leaky integrate-and-fire neuron (docs/original.md §1).

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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["MultiStepLIF", "lif_multistep", "LIFTorchFunction", "resolve_backend"]

BACKENDS = ("auto", "torch", "cupy")


# The CPU loop walks the neurons in blocks: a block's few temporaries stay in the L2 cache while
# the T steps run over it, so each element crosses the memory bus about once per pass instead of
# once per elementwise op. Blocks are below ATen's grain size (32768), so every op runs inline on
# its calling thread, and blocks are shared out to one Python thread per intra-op thread (ATen
# releases the GIL). This avoids an OpenMP fork/join per small op, which collapses when another
# process (a DataLoader worker, say) holds a core. On CUDA one block covers the whole tensor.
CPU_BLOCK = 1 << 15
_pool: Optional[ThreadPoolExecutor] = None


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _for_blocks(n: int, device: torch.device, body: Callable[[int, int, int], None]) -> None:
    """Call ``body(a, b, worker)`` over the blocks [a, b) of ``range(n)``."""
    global _pool
    if device.type != "cpu":
        body(0, n, 0)
        return
    blocks = [(a, min(a + CPU_BLOCK, n)) for a in range(0, n, CPU_BLOCK)]
    workers = min(torch.get_num_threads(), len(blocks))
    if workers <= 1:
        for a, b in blocks:
            body(a, b, 0)
        return
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="qkformer-lif")

    def run(w: int) -> None:
        with torch.no_grad():  # grad mode is thread-local; out= ops must not record
            for a, b in blocks[w::workers]:
                body(a, b, w)

    for f in [_pool.submit(run, w) for w in range(workers)]:
        f.result()


def _scratch(like: torch.Tensor, n: int, count: int, workers: int):
    """``count`` buffers of one block per worker, allocated once per call."""
    size = min(n, CPU_BLOCK) if like.device.type == "cpu" else n
    return [[like.new_empty(size) for _ in range(count)] for _ in range(workers)]


def lif_forward_torch(x: torch.Tensor, tau: float, v_threshold: float, save_h: bool = True):
    """Forward over the leading time axis. Returns ``(spikes, h_seq)``; ``h_seq`` ([T, N]) is the
    charged potential before reset (None unless ``save_h``). The membrane after reset is
    ``h_seq * (1 - spikes)``.

    Each block runs the same per-neuron loop as the CUDA kernel (qkformer/cuda/lif_kernel.cu):
    charge, compare, reset, for t = 0 .. T-1.
    """
    T = x.shape[0]
    x2 = x.reshape(T, -1)
    n = x2.shape[1]
    spikes = torch.empty_like(x2)
    h_seq = torch.empty_like(x2) if save_h else None
    scratch = _scratch(x2, n, 2, torch.get_num_threads())
    # v + (x - v) * (1/tau) equals v + (x - v) / tau bit for bit when 1/tau is a power of two
    # (tau = 2 everywhere in QKFormer); otherwise divide, as spikingjelly's torch backend does.
    exact_inverse = math.log2(tau).is_integer()

    def block(a: int, b: int, w: int) -> None:
        v, h_tmp = (buf[: b - a] for buf in scratch[w])
        for t in range(T):
            h = h_seq[t, a:b] if save_h else h_tmp
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

    _for_blocks(n, x.device, block)
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
    scratch = _scratch(h_seq, n, 3, torch.get_num_threads())
    decay = 1.0 - 1.0 / tau

    def block(a: int, b: int, w: int) -> None:
        if detach_reset:
            # The recursion written for g_X = g_H / tau directly: 7 tensor ops per step instead
            # of 11, no carry buffer, and the same sums as spikingjelly's autograd graph:
            # g_X(t) = (alpha/tau) g_S(t) sig (1 - sig) + (1 - 1/tau) (1 - S_t) g_X(t+1)
            sig, live = scratch[w][0][: b - a], scratch[w][1][: b - a]
            for t in range(T - 1, -1, -1):
                h, g_x = h_seq[t, a:b], grad_x[t, a:b]
                torch.sub(h, v_threshold, out=sig)
                sig.mul_(alpha).sigmoid_()
                # g_S sig (1 - sig) in one fused op
                torch.ops.aten.sigmoid_backward.grad_input(g_s[t, a:b], sig, grad_input=g_x)
                if t < T - 1:
                    torch.lt(h, v_threshold, out=live)  # 1 - S_t
                    g_x.addcmul_(live, grad_x[t + 1, a:b], value=decay * tau / alpha)
                g_x.mul_(alpha / tau)
            return
        carry, sg, g_h = (buf[: b - a] for buf in scratch[w])
        for t in range(T - 1, -1, -1):
            h = h_seq[t, a:b]
            torch.sub(h, v_threshold, out=sg)
            sg.mul_(alpha).sigmoid_()
            torch.addcmul(sg, sg, sg, value=-1.0, out=sg)  # sig (1 - sig)
            sg.mul_(alpha)
            torch.mul(g_s[t, a:b], sg, out=g_h)
            if t < T - 1:  # carry = g_H(t+1) (1 - 1/tau), times dV_t/dH_t = 1 - S - H sg'
                g_h.addcmul_(carry, h * sg, value=-1.0)
                carry.masked_fill_(h >= v_threshold, 0.0)
                g_h.add_(carry)
            torch.div(g_h, tau, out=grad_x[t, a:b])
            torch.mul(g_h, decay, out=carry)

    _for_blocks(n, h_seq.device, block)
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
