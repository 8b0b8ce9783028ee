"""Spiking attention: Q-K token attention, Q-K channel attention and Spikformer's SSA (docs/original.md §2.2-2.5).

All three take and return ``[T, B, C, H, W]``. The 1x1 projections are ``Conv1d`` on the
``T*B``-flattened ``[T*B, C, N]`` view, as in the original (the released weights are 3-D).
Heads own contiguous channel groups: head i owns channels ``i*d .. i*d + d - 1``.

With ``token_major = True`` (set by the model's fast path) they take and return
``[T, B, H, W, C]`` instead and run as fused units (:mod:`qkformer.fused`): the projections that
read the same input are one GEMM with their weights stacked, each conv -> BN -> LIF is one node.
"""
from __future__ import annotations

import torch
from torch import nn

from . import fused
from .neuron import MultiStepLIF
from .unit import SpikingUnit, fused_units

__all__ = ["QKAttentionBase", "QKTokenAttention", "QKChannelAttention", "SpikingSelfAttention",
           "ATTENTION_TYPES"]


def _add_branch(owner: nn.Module, name: str, dim: int, bias: bool,
                v_threshold: float = 1.0) -> SpikingUnit:
    return SpikingUnit.add_to(owner, name, nn.Conv1d(dim, dim, kernel_size=1, bias=bias),
                              nn.BatchNorm1d(dim), MultiStepLIF(v_threshold=v_threshold))


class QKAttentionBase(nn.Module):
    """Shared body of QKTA and QKCA: spiking Q and K, a binary mask from Q, mask K, project.

    Q and K are 1x1 conv -> BN -> LIF projections of the input; Q summed per head goes
    through ``attn_lif`` (V_th 0.5, an OR on counts: docs/original.md §1.4) to a binary vector
    that masks K; the result goes through the ``proj`` conv -> BN -> LIF. Cost is O(N*C) in time
    and memory: there is no N x N or d x d product, only a sum and a mask. Subclasses choose the
    axis Q is summed over (``sum_dim`` of the ``[T, B, h, d, N]`` view).

    Args:
        dim: channels C of input and output; ``q_conv``, ``k_conv`` and ``proj_conv`` are
            ``Conv1d(dim, dim, 1)``.
        num_heads: number of heads h; must divide ``dim``.

    Shape:
        - Input: ``[T, B, C, H, W]`` (spike counts of the residual stream); token-major
          ``[T, B, H, W, C]`` when ``token_major``
        - Output: spikes of the input's shape and layout
    """

    sum_dim: int

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        _add_branch(self, "q", dim, bias=False)
        _add_branch(self, "k", dim, bias=False)
        # The mask neuron sees integer counts; at V_th = 0.5 it fires iff the count is >= 1
        # (docs/original.md §1.4), but keeps the LIF surrogate gradient.
        self.attn_lif = MultiStepLIF(v_threshold=0.5)
        _add_branch(self, "proj", dim, bias=True)
        self.token_major = False

    def attention_mask(self, q: torch.Tensor) -> torch.Tensor:
        """Binary attention vector from spiking Q ``[T, B, h, d, N]``: ``[T, B, h, 1, N]``
        (QKTA) or ``[T, B, h, d, 1]`` (QKCA)."""
        return self.attn_lif(q.sum(dim=self.sum_dim, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_major:
            return self.forward_tokens(x)
        T, B, C, H, W = x.shape
        x = x.flatten(3)
        heads = (T, B, self.num_heads, C // self.num_heads, H * W)
        units = self.spiking_units
        q = units["q"](x).reshape(heads)
        k = units["k"](x).reshape(heads)
        x = (self.attention_mask(q) * k).reshape(T, B, C, H * W)
        return units["proj"](x).reshape(T, B, C, H, W)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, H, W, C]`` -> ``[T, B, H, W, C]``, fused."""
        T, B, H, W, C = x.shape
        x = x.reshape(T, B, H * W, C)
        units = self.spiking_units
        qk = fused_units([units["q"], units["k"]], x, fused.COUNTS, T)
        x = fused.qk_attention(qk, self.num_heads, self.sum_dim == 4, self.attn_lif)
        return units["proj"].fused(x, T, fused.SPIKES).reshape(T, B, H, W, C)


class QKTokenAttention(QKAttentionBase):
    """Q-K token attention, QKTA (docs/original.md §2.2; attribute ``tssa``).

    Per head, Q summed over the head's d channels gives a token vector A in {0,1}^N, which
    selects the tokens of K: output ``proj(A ⊙ K)``. Linear in N.

    Args:
        dim: channels C of input and output.
        num_heads: number of heads h; must divide ``dim``.

    Shape:
        - Input: ``[T, B, C, H, W]``; token-major ``[T, B, H, W, C]`` when ``token_major``
        - Output: spikes of the input's shape and layout
    """

    sum_dim = 3


class QKChannelAttention(QKAttentionBase):
    """Q-K channel attention, QKCA (paper eq. for the channel form; absent from the original code).

    Our reading of the paper: per head, sum Q over the N tokens -> channel vector A in {0,1}^d,
    through the same V_th = 0.5 LIF as QKTA; output A ⊙ K masks K's channels. Any Q spike in a
    channel therefore opens that channel of K for every token. Parameters and names are those of
    QKTA, so the two are interchangeable in a state_dict.

    Args:
        dim: channels C of input and output.
        num_heads: number of heads h; must divide ``dim``.

    Shape:
        - Input: ``[T, B, C, H, W]``; token-major ``[T, B, H, W, C]`` when ``token_major``
        - Output: spikes of the input's shape and layout
    """

    sum_dim = 4


class SpikingSelfAttention(nn.Module):
    """Spikformer's spiking self-attention, SSA (docs/original.md §2.3).

    Per head x = (Q · (Kᵀ · V)) · 0.125 with spiking Q, K, V (1x1 conv -> BN -> LIF), then
    ``attn_lif`` (V_th 0.5) and the ``proj`` conv -> BN -> LIF. No softmax: Q, K and V are
    non-negative spikes.

    Args:
        dim: channels C of input and output.
        num_heads: number of heads h; must divide ``dim``.
        legacy_proj_lif: reproduce the original's batch-coupling bug (docs/original.md §2.5, Q1):
            ``proj_lif`` sees ``[T*B, C*N]`` and treats the t-major T*B axis as time, so the
            membrane runs on from one sample into the next. The released checkpoints'
            accuracies were measured with it. ``False`` gives the intended per-sample LIF over
            T. The two agree when B = 1. Default: True
        kv_first: compute q·(kᵀ·v) (the original's order, linear in N) rather than (q·kᵀ)·v
            (equal in value, quadratic in N). The fused path always uses the former.
            Default: True

    Shape:
        - Input: ``[T, B, C, H, W]``; token-major ``[T, B, H, W, C]`` when ``token_major``
        - Output: spikes of the input's shape and layout
    """

    scale = 0.125  # constant for every head width (docs/original.md Q3)

    def __init__(self, dim: int, num_heads: int, legacy_proj_lif: bool = True,
                 kv_first: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.legacy_proj_lif = legacy_proj_lif
        # q·(kᵀ·v) (the original's order: a d x d intermediate, linear in N) or (q·kᵀ)·v (the
        # N x N token-token matrix, equal in value; kept to measure the quadratic cost, Fig. 3b)
        self.kv_first = kv_first
        _add_branch(self, "q", dim, bias=False)
        _add_branch(self, "k", dim, bias=False)
        _add_branch(self, "v", dim, bias=False)
        self.attn_lif = MultiStepLIF(v_threshold=0.5)
        _add_branch(self, "proj", dim, bias=True)
        self.token_major = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_major:
            return self.forward_tokens(x)
        T, B, C, H, W = x.shape
        N, h = H * W, self.num_heads
        x = x.flatten(3)

        def to_heads(t):  # [T, B, C, N] -> [T, B, h, N, d]
            return t.transpose(2, 3).reshape(T, B, N, h, C // h).permute(0, 1, 3, 2, 4)

        units = self.spiking_units
        q, k, v = (to_heads(units[n](x)) for n in ("q", "k", "v"))
        kt = k.transpose(-2, -1)
        x = (q @ (kt @ v) if self.kv_first else (q @ kt) @ v) * self.scale
        x = self.attn_lif(x.transpose(3, 4).reshape(T, B, C, N))
        x = units["proj"].conv_bn(x)
        if self.legacy_proj_lif:
            x = self.proj_lif(x.reshape(T * B, C * N))
        else:
            x = self.proj_lif(x)
        # (H, W), not the original's (W, H) relabel (docs/original.md Q2): identical for square maps.
        return x.reshape(T, B, C, H, W)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, H, W, C]`` -> ``[T, B, H, W, C]``, fused. The score order is always
        q·(kᵀ·v): integer sums, so equal to (q·kᵀ)·v exactly."""
        T, B, H, W, C = x.shape
        x = x.reshape(T, B, H * W, C)
        units = self.spiking_units
        qkv = fused_units([units["q"], units["k"], units["v"]], x, fused.COUNTS, T)
        x = fused.ssa_attention(qkv, self.num_heads, self.scale, self.attn_lif)
        steps = T * B if self.legacy_proj_lif else T  # legacy: the T*B axis is the LIF's time
        return units["proj"].fused(x, steps, fused.SPIKES).reshape(T, B, H, W, C)


ATTENTION_TYPES = {
    "qkta": QKTokenAttention,
    "qkca": QKChannelAttention,
    "ssa": SpikingSelfAttention,
}
