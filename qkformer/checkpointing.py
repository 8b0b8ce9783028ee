"""Gradient checkpointing for spiking layers (``model.set_grad_checkpointing(True)``).

A checkpointed layer runs its forward without autograd and keeps only its input, compactly
(:func:`qkformer.fused.pack`: the residual stream of QKFormer is small integer counts, one byte
each). The backward pass runs the layer again with autograd and backpropagates through that.

Two details make the result bit-identical to a run without checkpointing:

* BatchNorm running statistics (and ``num_batches_tracked``) are updated by the first forward
  only: the layer's buffers are put back after the recomputation, so they are updated exactly
  once per step (a plain re-run would update them twice);
* the recomputation runs under the autocast state of the first forward (backward runs outside
  any autocast block), so AMP recomputes the same values.

The layer's parameters are inputs of the autograd node, so their gradients reach ``.grad``
through the ordinary accumulation: DDP's hooks (and ``no_sync``) see them as usual.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import fused

__all__ = ["checkpoint_layer"]


def _run(module: nn.Module, x: torch.Tensor, steps: Optional[int]) -> torch.Tensor:
    return module(x) if steps is None else module(x, steps=steps)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, x_kind, steps, x, *params):
        ctx.module, ctx.steps, ctx.params = module, steps, params
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        with torch.no_grad():
            out = _run(module, x, steps)
        stored, ctx.x_how = fused.pack(x, x_kind)
        ctx.save_for_backward(stored)
        return out

    @staticmethod
    def backward(ctx, grad):
        (stored,) = ctx.saved_tensors
        x = fused.unpack(stored, ctx.x_how).detach()
        need_x = ctx.needs_input_grad[3]
        x.requires_grad_(need_x)
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        buffers = list(ctx.module.buffers())
        before = [b.clone() for b in buffers]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = _run(ctx.module, x, ctx.steps)
        wrt = ([x] if need_x else []) + params
        grads = list(torch.autograd.grad(out, wrt, grad, allow_unused=True)) if wrt else []
        with torch.no_grad():  # after the backward, which may read the buffers it saved
            for b, v in zip(buffers, before):
                b.copy_(v)
        gx = grads.pop(0) if need_x else None
        it = iter(grads)
        param_grads = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, gx, *param_grads)


def checkpoint_layer(module: nn.Module, x: torch.Tensor, x_kind: int,
                     steps: Optional[int] = None) -> torch.Tensor:
    """``module(x)`` (``module(x, steps=steps)`` when given) under gradient checkpointing.

    Args:
        x_kind: what ``x`` holds (:data:`qkformer.fused.COUNTS`, ``SPIKES`` or ``ANALOG``),
            which decides how compactly it is kept.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return _run(module, x, steps)
    return _Recompute.apply(module, x_kind, steps, x, *params)
