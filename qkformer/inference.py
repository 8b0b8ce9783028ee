"""Inference-time preparation: BatchNorm folded into the convolution before it, no autograd state.

Every BatchNorm in QKFormer directly follows a 1x1 or 3x3 convolution, in a spiking unit
(:mod:`qkformer.unit`: the q/k/v/proj projections of the attentions, the two MLP layers, the
SPEDS main path units and the SPEDS shortcut). In eval mode such a BN is an affine map per output channel,
so it can be absorbed into the convolution's weight and bias. That is exact up to float rounding;
where a max-pool sits between the BN and the LIF (some SPEDS units), the BN still directly follows
the convolution, so the pool sees the same values.

The folded model is a separate deep copy meant only for inference. Its ``state_dict`` no longer
matches the training layout (the BN entries are gone, bias-free convolutions gain a bias) and
must not be saved as or loaded into a checkpoint: keep the unfolded model for that.

    from qkformer.inference import prepare_for_inference
    fast = prepare_for_inference(model)              # folded, eval, no grad
    fast = prepare_for_inference(model, compile=True)  # ... and torch.compile'd
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .unit import spiking_units

__all__ = ["conv_bn_pairs", "fold_batchnorm", "prepare_for_inference"]

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def conv_bn_pairs(model: nn.Module) -> List[Tuple[nn.Module, str, str]]:
    """``(owner, conv_attr, bn_attr)`` for every BN that directly follows a convolution: the
    BatchNorm of every :class:`~qkformer.unit.SpikingUnit` whose BN keeps running statistics
    (a BN without them uses batch statistics in eval and cannot be folded)."""
    pairs = []
    for unit in spiking_units(model):
        conv, bn = unit.conv, unit.bn
        if (isinstance(conv, _CONVS) and isinstance(bn, _BNS)
                and conv.out_channels == bn.num_features and bn.track_running_stats
                and bn.running_mean is not None):
            pairs.append((unit.owner, f"{unit.name}_conv", f"{unit.name}_bn"))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every conv -> BN pair folded into the conv.

    The BN modules are replaced by :class:`torch.nn.Identity`. The original model is untouched.
    A BN that does not directly follow a convolution would be left in place with a warning (none
    does in QKFormer's layers).
    """
    folded = copy.deepcopy(model).eval()
    for owner, conv_attr, bn_attr in conv_bn_pairs(folded):
        conv, bn = getattr(owner, conv_attr), getattr(owner, bn_attr)
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                            bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        setattr(owner, bn_attr, nn.Identity())
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        warnings.warn(f"BatchNorm not folded (no convolution directly before it): {left}")
    return folded


def prepare_for_inference(model: nn.Module, compile: bool = False, **compile_kwargs) -> nn.Module:
    """Folded (:func:`fold_batchnorm`), eval mode, ``requires_grad_(False)``; optionally compiled
    with ``torch.compile(model, **compile_kwargs)``. Run it under ``torch.inference_mode()`` or
    ``torch.no_grad()`` as usual; with no parameter requiring grad no autograd graph is built
    even without."""
    folded = fold_batchnorm(model)
    folded.requires_grad_(False)
    if compile:
        folded = torch.compile(folded, **compile_kwargs)
    return folded
