"""The hierarchical spiking transformer, assembled from a family layout and per-stage settings.

The three families of the original code (ImageNet, CIFAR, DVS; docs/original.md §3) differ only in the data
of :class:`FamilyLayout`: SPEDS unit chains and names, MLP/attention attribute names, and the
order modules are registered in (which is the state_dict order).

Data flow: image ``[B, C, H, W]`` -> repeated T times, or events ``[B, T, C, H, W]`` -> permuted;
then ``[T, B, C, H, W]`` through SPEDS-1, stage 1, SPEDS-2, stage 2, ... ; mean over tokens, mean
over T, linear head.

Two paths compute the same function. The *reference path* is the original's computation, layer
by layer. The *fast path* (default) keeps activations token-major, ``[T, B, H, W, C]``, so every
1x1 projection is one GEMM over all tokens, fuses each conv -> BN -> [pool] -> LIF into one node
that keeps its input as bits or bytes for backward (:mod:`qkformer.fused`), and convolves a
static image once instead of T times. The tests hold the two equal in float64.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices

from . import fused
from .checkpointing import checkpoint_layer
from .functional import encode_static
from .layers import SPEDS, ConvUnit, SpikingBlock

__all__ = ["FamilyLayout", "FAMILIES", "HierarchicalSpikingTransformer"]


@dataclass(frozen=True)
class FamilyLayout:
    name: str
    stem: Tuple[ConvUnit, ...]      # SPEDS-1 main path (widths relative to stage-1 width)
    stem_shortcut_from: int          # index of the stem unit whose spikes feed the shortcut
    stem_shortcut_stride: int
    down: Tuple[ConvUnit, ...]       # SPEDS-2/3 main path (shortcut from the raw input, stride 2)
    mlp_prefix: str                  # 'fc' -> fc1_conv ..., 'mlp' -> mlp1_conv ...
    ssa_name: str                    # attribute of the SSA module: 'attn' or 'ssa'
    interleaved: bool                # DVS registers patch_embed1, stage1, patch_embed2, ...
    events: bool                     # input is [B, T, C, H, W] event frames (T from the data)


FAMILIES = {
    "imagenet": FamilyLayout(
        name="imagenet",
        stem=(ConvUnit("proj", 2, "proj_maxpool"), ConvUnit("proj1", 1, "proj1_maxpool"),
              ConvUnit("proj2", 1)),
        stem_shortcut_from=0, stem_shortcut_stride=2,
        down=(ConvUnit("proj3", 1, "proj3_maxpool"), ConvUnit("proj4", 1)),
        mlp_prefix="fc", ssa_name="attn", interleaved=False, events=False),
    "cifar": FamilyLayout(
        name="cifar",
        stem=(ConvUnit("proj", 2), ConvUnit("proj1", 1)),
        stem_shortcut_from=0, stem_shortcut_stride=1,
        down=(ConvUnit("proj3", 1), ConvUnit("proj4", 1, "proj4_maxpool")),
        mlp_prefix="mlp", ssa_name="ssa", interleaved=False, events=False),
    "dvs": FamilyLayout(
        name="dvs",
        stem=(ConvUnit("proj", 8), ConvUnit("proj1", 4, "maxpool1"),
              ConvUnit("proj2", 2, "maxpool2"), ConvUnit("proj3", 1, "maxpool3")),
        stem_shortcut_from=1, stem_shortcut_stride=4,
        down=(ConvUnit("proj", 1), ConvUnit("proj4", 1, "proj4_maxpool")),
        mlp_prefix="mlp", ssa_name="ssa", interleaved=True, events=True),
}


def _per_stage(value, n: int, what: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{what} needs {n} entries (one per stage), got {values}")
    return values


class HierarchicalSpikingTransformer(nn.Module):
    """QKFormer, the hierarchical spiking transformer.

    Each stage i is a SPEDS patch embedding (``patch_embed<i>``) followed by ``depths[i]``
    spiking blocks (``stage<i>``); the head averages the last stage's spikes over the tokens
    and then over T, and applies a linear classifier. Static images are fed unchanged at each
    of T steps (direct encoding, docs/original.md §2.6). ``embed_dims``, ``depths``,
    ``num_heads`` and ``attn_types`` are per stage (a single value is used for every stage).

    Args:
        family: 'imagenet', 'cifar' or 'dvs' (or a :class:`FamilyLayout`). Default: 'imagenet'
        embed_dims: channels of each stage. Default: (96, 192, 384)
        depths: blocks per stage. Default: (1, 2, 7)
        num_heads: attention heads per stage. Default: 6
        mlp_ratio: MLP hidden width as a multiple of the stage width. Default: 4.0
        attn_types: 'qkta', 'qkca' or 'ssa' per stage. Default: ('qkta', 'qkta', 'ssa')
        in_chans: input channels (3 for RGB, 2 for event polarities). Default: 3
        num_classes: classes of the head; 0 leaves no head (``nn.Identity``). Default: 1000
        T: time steps for static input (ignored for event input, whose T comes from the data).
            Default: 4
        img_size: the training resolution, recorded for data configs; any size that is a
            multiple of :attr:`patch_factor` works at inference. Default: 224
        legacy_ssa: reproduce the SSA ``proj_lif`` batch coupling (docs/original.md §2.5).
            Default True, as the released checkpoints were evaluated with it; False gives
            per-sample outputs.
        fast_path: run the fused token-major fast path (default) or the reference path
            (layer by layer as the original; module hooks see every neuron). Same state_dict.

    Shape:
        - Input: images ``[B, in_chans, H, W]``, or event frames ``[B, T, in_chans, H, W]``
          (DVS family); H and W positive multiples of :attr:`patch_factor`
        - Output: logits ``[B, num_classes]`` (``[B, embed_dims[-1]]`` without a head)
    """

    def __init__(self, family="imagenet", embed_dims: Sequence[int] = (96, 192, 384),
                 depths: Sequence[int] = (1, 2, 7), num_heads=6, mlp_ratio: float = 4.0,
                 attn_types: Sequence[str] = ("qkta", "qkta", "ssa"), in_chans: int = 3,
                 num_classes: int = 1000, T: int = 4, img_size: int = 224,
                 legacy_ssa: bool = True, fast_path: bool = True):
        super().__init__()
        layout = FAMILIES[family] if isinstance(family, str) else family
        n = len(embed_dims)
        depths = _per_stage(depths, n, "depths")
        num_heads = _per_stage(num_heads, n, "num_heads")
        attn_types = _per_stage(attn_types, n, "attn_types")
        self.layout, self.T, self.in_chans, self.img_size = layout, T, in_chans, img_size
        self.num_stages, self.embed_dims = n, tuple(embed_dims)
        self.num_classes, self.num_features = num_classes, embed_dims[-1]
        self.head_hidden_size = self.num_features

        def embed(i):
            if i == 0:
                return SPEDS(in_chans, embed_dims[0], layout.stem, layout.stem_shortcut_from,
                             layout.stem_shortcut_stride)
            return SPEDS(embed_dims[i - 1], embed_dims[i], layout.down, -1, 2)

        def stage(i):
            return nn.ModuleList(
                SpikingBlock(embed_dims[i], num_heads[i], mlp_ratio, attn_types[i], layout.ssa_name,
                             layout.mlp_prefix, legacy_ssa) for _ in range(depths[i]))

        # Registration order is the state_dict order of the original (matters for optimizer state).
        order = ([("patch_embed", i) for i in range(n)] + [("stage", i) for i in range(n)]
                 if not layout.interleaved else
                 [(kind, i) for i in range(n) for kind in ("patch_embed", "stage")])
        for kind, i in order:
            self.add_module(f"{kind}{i + 1}", embed(i) if kind == "patch_embed" else stage(i))
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.patch_factor = self.patch_embed1.downsample * 2 ** (n - 1)
        self.feature_info = [dict(num_chs=embed_dims[i],
                                  reduction=self.patch_embed1.downsample * 2 ** i,
                                  module=f"stage{i + 1}") for i in range(n)]
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        self.set_fast_path(fast_path)

    @staticmethod
    def _init_weights(m: nn.Module):
        # Only Linear layers are re-initialised; convs and BN keep PyTorch defaults (docs/original.md §2.7).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- settings ------------------------------------------------------------------------------
    def embeds_and_stages(self):
        for i in range(1, self.num_stages + 1):
            yield getattr(self, f"patch_embed{i}"), getattr(self, f"stage{i}")

    def set_legacy_ssa(self, legacy: bool) -> None:
        """Switch every SSA ``proj_lif`` between the original batch coupling and the fix."""
        for m in self.modules():
            if hasattr(m, "legacy_proj_lif"):
                m.legacy_proj_lif = legacy

    def set_fast_path(self, enabled: bool = True) -> None:
        """Fused token-major fast path (True) or the layer-by-layer reference path (False)."""
        self.fast_path = bool(enabled)
        for m in self.modules():
            if hasattr(m, "token_major"):
                m.token_major = self.fast_path

    @contextlib.contextmanager
    def reference_path(self):
        """Run layer by layer (the reference path) inside the block, e.g. for tools whose forward
        hooks must see every neuron and convolution; the previous path is restored after."""
        previous = self.fast_path
        self.set_fast_path(False)
        try:
            yield self
        finally:
            self.set_fast_path(previous)

    def _path_for(self, x: torch.Tensor):
        """The reference path where the fast path is not the faster one
        (:func:`qkformer.fused.fast_path_ready`: off the CPU), else the path as set."""
        if self.fast_path and not fused.fast_path_ready(x.device):
            return self.reference_path()
        return contextlib.nullcontext()

    # -- timm model contract -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups. ``coarse``: one per stage (its SPEDS with its blocks). Otherwise the
        groups of the original's ImageNet layer-wise lr decay (docs/original.md Q17): everything
        before the last stage, then the last stage with the head, which is what timm's
        ``param_groups_layer_decay`` (``--layer-decay``) then scales."""
        if coarse:
            return dict(stem=r"^patch_embed1\.", blocks=r"^(?:patch_embed|stage)(\d+)\.")
        last = self.num_stages
        return dict(stem=rf"^(?:patch_embed\d+|stage(?!{last}\.)\d+)\.",
                    blocks=rf"^(?:stage{last}|head)\.")

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # No position embeddings or tokens; timm already exempts every 1-D parameter (BN, biases),
        # which is the original recipe.
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing (:mod:`qkformer.checkpointing`): each SPEDS embedding and each
        block keeps only its input (one byte per value) and recomputes its inside during
        backward. Gradients and BatchNorm buffers stay bit-identical; a step costs one more
        forward pass."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    # -- forward -------------------------------------------------------------------------------
    def validate(self, x: torch.Tensor) -> torch.Tensor:
        """Check rank, channels and size of a raw input; returns it unchanged."""
        if self.layout.events:
            if x.dim() != 5:
                raise ValueError(f"expected event frames [B, T, {self.in_chans}, H, W], "
                                 f"got shape {tuple(x.shape)}")
            channels, (H, W) = x.shape[2], x.shape[-2:]
        else:
            if x.dim() != 4:
                raise ValueError(f"expected an image batch [B, {self.in_chans}, H, W], "
                                 f"got shape {tuple(x.shape)}")
            channels, (H, W) = x.shape[1], x.shape[-2:]
        if channels != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {channels} "
                             f"(input shape {tuple(x.shape)})")
        f = self.patch_factor
        if H % f or W % f or H == 0 or W == 0:
            down = (max(f, H // f * f), max(f, W // f * f))
            up = (max(f, -(-H // f) * f), max(f, -(-W // f) * f))
            nearest = " or ".join(f"{h}x{w}" for h, w in dict.fromkeys((down, up)))
            raise ValueError(f"input size {H}x{W} is not supported: height and width must be "
                             f"positive multiples of {f} for this architecture "
                             f"(nearest: {nearest})")
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input and bring it to ``[T, B, C, H, W]`` (the reference layout)."""
        x = self.validate(x)
        return x.transpose(0, 1) if self.layout.events else encode_static(x, self.T)

    def _stem_input(self, x: torch.Tensor):
        """Raw input -> (input of SPEDS-1, steps). The fast path passes a static image once
        with ``steps=T``; events and the reference path pass all T frames."""
        x = self.validate(x)
        if not self.fast_path:
            return self.encode(x), None
        if self.layout.events:
            return x.permute(1, 0, 3, 4, 2).contiguous(), None
        return x.permute(0, 2, 3, 1).contiguous(), self.T

    def _stage_outputs(self, x: torch.Tensor, steps: Optional[int]):
        checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for i, (embed, stage) in enumerate(self.embeds_and_stages()):
            first = i == 0 and steps is not None
            if checkpoint:  # a static image is kept as it is; events and residuals are counts
                kind = fused.ANALOG if i == 0 and not self.layout.events else fused.COUNTS
                x = checkpoint_layer(embed, x, kind, steps if first else None)
            else:
                x = embed(x, steps=steps) if first else embed(x)
            for block in stage:
                x = checkpoint_layer(block, x, fused.COUNTS) if checkpoint else block(x)
            yield x

    def _spike_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A stage output as ``[T, B, C, H, W]`` (a view of the fast path's token-major tensor)."""
        return x.permute(0, 1, 4, 2, 3) if self.fast_path else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output, unpooled: the residual stream after its last block.

        Args:
            x: the raw input, as for :meth:`forward`.

        Shape:
            - Input: ``[B, in_chans, H, W]``, or events ``[B, T, in_chans, H, W]``
            - Output: ``[T, B, embed_dims[-1], H / r, W / r]`` with r = :attr:`patch_factor`:
              integer spike counts (a permuted view of the token-major tensor on the fast path)
        """
        with self._path_for(x):
            x, steps = self._stem_input(x)
            for x in self._stage_outputs(x, steps):
                pass
            return self._spike_layout(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Mean over the tokens, then over T, then the linear head.

        Args:
            x: the output of :meth:`forward_features`.
            pre_logits: return the pooled features instead of the logits. Default: False

        Shape:
            - Input: ``[T, B, num_features, H', W']``
            - Output: ``[B, num_classes]``, or ``[B, num_features]`` with ``pre_logits``
        """
        if x.stride(2) == 1:  # a view of the token-major layout: the mean taken there gives a
            x = x.permute(0, 1, 3, 4, 2).flatten(2, 3).mean(2).mean(0)  # token-major gradient
        else:
            x = x.flatten(3).mean(3).mean(0)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, in_chans, H, W]`` or events
        ``[B, T, in_chans, H, W]``: :meth:`forward_features`, then :meth:`forward_head`."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "TNCHW", intermediates_only: bool = False):
        """Stage outputs for dense heads.

        Args:
            indices: stages to return (an int n: the last n; default all).
            output_fmt: ``'TNCHW'`` (default): the spike maps ``[T, B, C_i, H_i, W_i]``, for
                spiking heads; ``'NCHW'`` / ``'NHWC'``: firing rates (spikes averaged over T),
                ``[B, C_i, H_i, W_i]`` / ``[B, H_i, W_i, C_i]``, for ordinary heads (this is what
                ``timm.create_model(..., features_only=True)`` returns).
            norm: ignored (the model has no final norm).
            stop_early: stop after the last requested stage.
            intermediates_only: return the list only.

        Returns:
            ``(last-stage spikes [T, B, C, H, W], [maps])``, or ``[maps]``.
        """
        fmt = getattr(output_fmt, "value", output_fmt)
        if fmt not in ("TNCHW", "NCHW", "NHWC"):
            raise ValueError(f"output_fmt {fmt!r}: expected 'TNCHW', 'NCHW' or 'NHWC'")
        take, max_index = feature_take_indices(self.num_stages, indices)
        with self._path_for(x):
            x, steps = self._stem_input(x)
            maps = []
            for i, x in enumerate(self._stage_outputs(x, steps)):
                if i in take:
                    spikes = self._spike_layout(x)
                    maps.append(spikes if fmt == "TNCHW" else spikes.mean(0) if fmt == "NCHW"
                                else spikes.mean(0).permute(0, 2, 3, 1))
                if stop_early and i >= max_index:
                    break
            if intermediates_only:
                return maps
            return self._spike_layout(x), maps

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the head); returns the indices."""
        take, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            delattr(self, f"patch_embed{i + 1}")
            delattr(self, f"stage{i + 1}")
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:self.num_stages]
        if prune_head:
            self.reset_classifier(0)
        return take
