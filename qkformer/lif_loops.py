"""The torch backend's loops of the multistep LIF neuron (no autograd: see ``qkformer.neuron``).

``lif_forward_torch`` and ``lif_backward_torch`` are the reference arithmetic of this package:
the CUDA kernel (``qkformer/cuda/lif_kernel.cu``) mirrors them per neuron, its self-check runs
against them, and types without a kernel (float64) run them on any device. They live in their
own module so that both ``qkformer.neuron`` (the generic layer) and ``qkformer.cuda`` (one
backend) import them without importing each other.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

__all__ = ["CPU_BLOCK", "lif_forward_torch", "lif_backward_torch"]


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
    ``h_seq - h_seq * spikes``.

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
            # Hard reset V = H - H*S, which is H (1 - S) for every finite H and NaN for H = +inf
            # (inf - inf), like spikingjelly's: an overflowed input poisons the neuron from the
            # next step on instead of being silently reset. (For H = -inf this V is NaN where
            # spikingjelly's is -inf; the next H is NaN either way, so spikes, H and gradients
            # agree.) The kernel computes the same expression.
            torch.addcmul(h, h, s, value=-1.0, out=v)

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
