"""Small tensor-layout helpers shared by the layers."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["per_frame", "encode_static"]


def per_frame(x: torch.Tensor, *modules: nn.Module) -> torch.Tensor:
    """Apply frame-wise modules (conv, BN, pool) to ``[T, B, ...]`` via the ``[T*B, ...]`` view.

    BatchNorm therefore pools its statistics over T, B and space, as in the original (docs/original.md Q10).
    """
    T, B = x.shape[:2]
    y = x.flatten(0, 1)
    for m in modules:
        y = m(y)
    return y.reshape(T, B, *y.shape[1:])


def encode_static(x: torch.Tensor, T: int) -> torch.Tensor:
    """Direct encoding: the same analog image at every one of T steps, ``[B,C,H,W] -> [T,B,C,H,W]``."""
    return x.unsqueeze(0).expand(T, *x.shape)
