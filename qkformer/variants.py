"""The seven released configurations, registered with timm.

``timm.create_model('qkformer_10_768', T=4, pretrained=True,
pretrained_cfg_overlay=dict(file='checkpoint-191.pth'))`` builds HST-10-768 and strictly loads a
released checkpoint through :func:`qkformer.checkpoint.load_checkpoint` (safe unpickling).
Any architecture argument of :class:`HierarchicalSpikingTransformer` can be overridden, e.g.
``embed_dims=64, depths=(1, 1, 1)`` for a tiny test model of the same family.
"""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .model import HierarchicalSpikingTransformer

__all__ = ["VARIANTS", "variant_names"]  # builders are reached through timm.create_model

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# Architecture of each released model (docs/original.md §3.1). Parameter counts are checked in the tests.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "qkformer_10_384": dict(family="imagenet", embed_dims=(96, 192, 384), depths=(1, 2, 7),
                            num_heads=6, num_classes=1000, T=4, img_size=224),
    "qkformer_10_512": dict(family="imagenet", embed_dims=(128, 256, 512), depths=(1, 2, 7),
                            num_heads=8, num_classes=1000, T=4, img_size=224),
    "qkformer_10_768": dict(family="imagenet", embed_dims=(192, 384, 768), depths=(1, 2, 7),
                            num_heads=12, num_classes=1000, T=4, img_size=224),
    "qkformer_cifar10": dict(family="cifar", embed_dims=(96, 192, 384), depths=(1, 1, 2),
                             num_heads=8, num_classes=10, T=4, img_size=32),
    "qkformer_cifar100": dict(family="cifar", embed_dims=(96, 192, 384), depths=(1, 1, 2),
                              num_heads=8, num_classes=100, T=4, img_size=32),
    "qkformer_cifar10_dvs": dict(family="dvs", embed_dims=(128, 256), depths=(1, 1), num_heads=16,
                                 mlp_ratio=1.0, attn_types=("qkta", "ssa"), in_chans=2,
                                 num_classes=10, T=16, img_size=128),
    "qkformer_dvs128_gesture": dict(family="dvs", embed_dims=(128, 256), depths=(1, 1),
                                    num_heads=16, mlp_ratio=4.0, attn_types=("qkta", "ssa"),
                                    in_chans=2, num_classes=11, T=16, img_size=128),
}

# Released weights live on Google Drive / Baidu (no direct URL): pass them as a local file.
_RELEASE_NOTE = ("released checkpoint: download it from the links in the QKFormer README, then "
                 "create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")


def _cfg(num_classes=1000, size=224, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN,
         std=IMAGENET_DEFAULT_STD, in_chans=3, **kwargs):
    return dict(url="", num_classes=num_classes, input_size=(in_chans, size, size),
                crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std,
                first_conv="patch_embed1.proj_conv", classifier="head", notes=(_RELEASE_NOTE,),
                **kwargs)


default_cfgs = generate_default_cfgs({
    "qkformer_10_384.in1k": _cfg(),
    "qkformer_10_512.in1k": _cfg(),
    "qkformer_10_768.in1k": _cfg(),
    "qkformer_10_768.in1k_288": _cfg(size=288, crop_pct=1.0),
    "qkformer_10_768.in1k_384": _cfg(size=384, crop_pct=1.0),
    "qkformer_cifar10.untrained": _cfg(10, 32, 1.0, CIFAR_MEAN, CIFAR_STD),
    "qkformer_cifar100.untrained": _cfg(100, 32, 1.0, CIFAR_MEAN, CIFAR_STD),
    "qkformer_cifar10_dvs.untrained": _cfg(10, 128, 1.0, (0.0, 0.0), (1.0, 1.0), in_chans=2),
    "qkformer_dvs128_gesture.untrained": _cfg(11, 128, 1.0, (0.0, 0.0), (1.0, 1.0), in_chans=2),
})


def _expand_widths(kwargs: Dict[str, Any], n_stages: int) -> None:
    """``embed_dims=E`` (the original's single width) -> stage widths E/2^(n-1), ..., E/2, E."""
    e = kwargs.get("embed_dims")
    if isinstance(e, int):
        kwargs["embed_dims"] = tuple(e // 2 ** (n_stages - 1 - i) for i in range(n_stages))


def _create(variant: str, pretrained: bool = False, **kwargs) -> HierarchicalSpikingTransformer:
    model_args = {**VARIANTS[variant], **kwargs}
    depths = model_args["depths"]
    _expand_widths(model_args, len(depths) if isinstance(depths, (tuple, list)) else 3)
    model = build_model_with_cfg(HierarchicalSpikingTransformer, variant, pretrained=False,
                                 **model_args)
    if pretrained:
        from .checkpoint import load_checkpoint

        file = model.pretrained_cfg.get("file")
        if not file:
            raise ValueError(f"{variant}: no pretrained file given; {_RELEASE_NOTE}")
        load_checkpoint(model, file, strict=True)
    return model


def variant_names():
    return tuple(VARIANTS)


@register_model
def qkformer_10_384(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """HST-10-384, ImageNet (16.47M)."""
    return _create("qkformer_10_384", pretrained, **kwargs)


@register_model
def qkformer_10_512(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """HST-10-512, ImageNet (29.08M)."""
    return _create("qkformer_10_512", pretrained, **kwargs)


@register_model
def qkformer_10_768(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """HST-10-768, ImageNet (64.96M); pretrained tags in1k (224), in1k_288, in1k_384."""
    return _create("qkformer_10_768", pretrained, **kwargs)


@register_model
def qkformer_cifar10(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """HST-4-384, CIFAR-10 (6.71M)."""
    return _create("qkformer_cifar10", pretrained, **kwargs)


@register_model
def qkformer_cifar100(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """HST-4-384, CIFAR-100 (6.74M)."""
    return _create("qkformer_cifar100", pretrained, **kwargs)


@register_model
def qkformer_cifar10_dvs(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """Two-stage DVS model, mlp_ratio 1, CIFAR10-DVS (1.50M)."""
    return _create("qkformer_cifar10_dvs", pretrained, **kwargs)


@register_model
def qkformer_dvs128_gesture(pretrained=False, **kwargs) -> HierarchicalSpikingTransformer:
    """Two-stage DVS model, mlp_ratio 4, DVS128 Gesture (2.00M)."""
    return _create("qkformer_dvs128_gesture", pretrained, **kwargs)
