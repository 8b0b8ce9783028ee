"""The hierarchical spiking transformer, assembled from a family layout and per-stage settings.

The three families of the original code (ImageNet, CIFAR, DVS; docs/original.md §3) differ only in the data
of :class:`FamilyLayout`: SPEDS unit chains and names, MLP/attention attribute names, and the
order modules are registered in (which is the state_dict order).

Data flow: image ``[B, C, H, W]`` -> repeated T times, or events ``[B, T, C, H, W]`` -> permuted;
then ``[T, B, C, H, W]`` through SPEDS-1, stage 1, SPEDS-2, stage 2, ... ; mean over tokens, mean
over T, linear head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import nn
from timm.layers import trunc_normal_

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
    """QKFormer. ``embed_dims``, ``depths``, ``num_heads`` and ``attn_types`` are per stage.

    Args:
        family: 'imagenet', 'cifar' or 'dvs' (or a :class:`FamilyLayout`).
        T: time steps for static input (ignored for event input, whose T comes from the data).
        legacy_ssa: reproduce the SSA ``proj_lif`` batch coupling (docs/original.md §2.5). Default True, as
            the released checkpoints were evaluated with it; False gives per-sample outputs.
        img_size: the training resolution, recorded for data configs; any size that is a
            multiple of :attr:`patch_factor` works at inference.
    """

    def __init__(self, family="imagenet", embed_dims: Sequence[int] = (96, 192, 384),
                 depths: Sequence[int] = (1, 2, 7), num_heads=6, mlp_ratio: float = 4.0,
                 attn_types: Sequence[str] = ("qkta", "qkta", "ssa"), in_chans: int = 3,
                 num_classes: int = 1000, T: int = 4, img_size: int = 224,
                 legacy_ssa: bool = True):
        super().__init__()
        layout = FAMILIES[family] if isinstance(family, str) else family
        n = len(embed_dims)
        depths = _per_stage(depths, n, "depths")
        num_heads = _per_stage(num_heads, n, "num_heads")
        attn_types = _per_stage(attn_types, n, "attn_types")
        self.layout, self.T, self.in_chans, self.img_size = layout, T, in_chans, img_size
        self.num_stages, self.embed_dims = n, tuple(embed_dims)
        self.num_classes, self.num_features = num_classes, embed_dims[-1]

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
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        # Only Linear layers are re-initialised; convs and BN keep PyTorch defaults (docs/original.md §2.7).
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -- helpers -------------------------------------------------------------------------------
    def embeds_and_stages(self):
        for i in range(1, self.num_stages + 1):
            yield getattr(self, f"patch_embed{i}"), getattr(self, f"stage{i}")

    def set_legacy_ssa(self, legacy: bool) -> None:
        """Switch every SSA ``proj_lif`` between the original batch coupling and the fix."""
        for m in self.modules():
            if hasattr(m, "legacy_proj_lif"):
                m.legacy_proj_lif = legacy

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    # -- forward -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input and bring it to ``[T, B, C, H, W]``."""
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
        return x.transpose(0, 1) if self.layout.events else encode_static(x, self.T)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> token-averaged last-stage spikes ``[T, B, C]``."""
        for embed, stage in self.embeds_and_stages():
            x = embed(x)
            for block in stage:
                x = block(x)
        return x.flatten(3).mean(3)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(0)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(self.encode(x)))
