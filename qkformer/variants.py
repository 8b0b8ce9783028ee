"""The seven released configurations, registered with timm.

Pretrained weights load through timm's own path (``build_model_with_cfg`` -> ``load_pretrained``
with :func:`qkformer.checkpoint.checkpoint_filter_fn`) from any of three sources::

    timm.create_model('qkformer_10_768', pretrained=True,
                      pretrained_cfg_overlay=dict(file='checkpoint-191.pth'))   # a released file
    timm.create_model('local-dir:/models/qkformer_10_768', pretrained=True)     # export-hub folder
    timm.create_model('hf-hub:org/qkformer_10_768', pretrained=True)             # the same, uploaded

Any architecture argument of :class:`HierarchicalSpikingTransformer` can be overridden, e.g.
``embed_dims=64, depths=(1, 1, 1)`` for a tiny test model of the same family. The original
constructors' vocabulary is accepted too (see :func:`resolve_model_args`), so a config written
for the authors' code builds the same network.
"""
from __future__ import annotations

import functools
import inspect
import numbers
import pickle
import warnings
from typing import Any, Dict, Optional, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model,
                         resolve_pretrained_cfg)

from .model import HierarchicalSpikingTransformer

__all__ = ["VARIANTS", "variant_names", "resolve_model_args"]  # builders: via timm.create_model

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

# The authors' weights sit behind Google Drive/Baidu links (no direct download), so no cfg has a
# url or hf_hub_id: the weights are always a local file, or a folder made by export-hub.
_WEIGHTS_NOTE = ("no download URL: pass a released checkpoint with pretrained_cfg_overlay="
                 "dict(file=PATH), or load a folder written by `python -m qkformer.checkpoint "
                 "export-hub` as 'local-dir:DIR' or, once uploaded, 'hf-hub:ORG/NAME'")
_PAPER = "QKFormer: Hierarchical Spiking Transformer using Q-K Attention"


def _cfg(num_classes=1000, size=224, crop_pct=0.875, mean=IMAGENET_DEFAULT_MEAN,
         std=IMAGENET_DEFAULT_STD, in_chans=3, released=True, description="", **kwargs):
    origin = ("the authors' release (ImageNet checkpoints, linked from their README)" if released
              else "no released checkpoint: train one (see the README)")
    return dict(url="", num_classes=num_classes, input_size=(in_chans, size, size),
                crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std,
                first_conv="patch_embed1.proj_conv", classifier="head", description=description,
                paper_name=_PAPER, paper_ids="arXiv:2403.16552",
                origin_url="https://arxiv.org/abs/2403.16552",
                notes=(f"weights: {origin}", _WEIGHTS_NOTE), **kwargs)


def _small(num_classes, size, mean, std, in_chans=3, description=""):
    return _cfg(num_classes, size, 1.0, mean, std, in_chans, released=False, description=description)


default_cfgs = generate_default_cfgs({
    "qkformer_10_384.in1k": _cfg(description="HST-10-384, ImageNet-1k, 224 x 224, T=4"),
    "qkformer_10_512.in1k": _cfg(description="HST-10-512, ImageNet-1k, 224 x 224, T=4"),
    "qkformer_10_768.in1k": _cfg(description="HST-10-768, ImageNet-1k, 224 x 224, T=4"),
    "qkformer_10_768.in1k_288": _cfg(size=288, crop_pct=1.0,
                                     description="HST-10-768, ImageNet-1k, 288 x 288, T=4"),
    "qkformer_10_768.in1k_384": _cfg(size=384, crop_pct=1.0,
                                     description="HST-10-768, ImageNet-1k, 384 x 384, T=4"),
    "qkformer_cifar10.untrained": _small(10, 32, CIFAR_MEAN, CIFAR_STD,
                                         description="HST-4-384, CIFAR-10, T=4"),
    "qkformer_cifar100.untrained": _small(100, 32, CIFAR_MEAN, CIFAR_STD,
                                          description="HST-4-384, CIFAR-100, T=4"),
    "qkformer_cifar10_dvs.untrained": _small(10, 128, (0.0, 0.0), (1.0, 1.0), 2,
                                             description="two-stage DVS model, CIFAR10-DVS, T=16"),
    "qkformer_dvs128_gesture.untrained": _small(11, 128, (0.0, 0.0), (1.0, 1.0), 2,
                                                description="two-stage DVS model, DVS128 Gesture, T=16"),
})

# -- the original constructors' vocabulary (docs/original.md §3, quirks Q5-Q7) -----------------
# Names of the original signature that mean the same as ours.
_RENAMED = {"in_channels": "in_chans", "mlp_ratios": "mlp_ratio"}
# Accepted and never used by the original (Q5): no dropout, stochastic depth, qkv bias, custom
# scale, norm layer or spatial reduction exists in the network, and the patch grid is fixed by
# the family's SPEDS layout.
_IGNORED = ("patch_size", "qkv_bias", "qk_scale", "drop_rate", "attn_drop_rate", "drop_path_rate",
            "norm_layer", "sr_ratios")
# A call that uses any of these (or an int ``depths``) was written for the original, so it gets
# the original's semantics in full, including the hard-coded heads (Q7). drop_rate and
# drop_path_rate are left out because timm's own train script passes them to every model.
_ORIGINAL_ONLY = {"in_channels", "mlp_ratios", "img_size_h", "img_size_w", "patch_size",
                  "qkv_bias", "qk_scale", "norm_layer", "sr_ratios", "attn_drop_rate"}
# Blocks of the stages before the last, when ``depths`` is the original's total (Q6); DVS has a
# fixed 1/1 and ignores ``depths``.
_LEADING_DEPTHS = {"imagenet": (1, 2), "cifar": (1, 1)}
_FORCED_HEADS = {"cifar": 8, "dvs": 16}
_ARCH_KEYS = ("family", "embed_dims", "depths", "num_heads", "mlp_ratio", "attn_types", "in_chans",
              "num_classes", "T", "img_size", "legacy_ssa")


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _stage_ints(value, what: str):
    if isinstance(value, (list, tuple)):
        return tuple(_positive_int(v, f"every entry of {what}") for v in value)
    return _positive_int(value, what)


def _same(kwargs: Dict[str, Any], ours: str, value, theirs: str) -> None:
    if ours in kwargs and kwargs[ours] != value:
        raise ValueError(f"{theirs}={value!r} contradicts {ours}={kwargs[ours]!r}; give one of them")
    kwargs[ours] = value


def _square_size(value, what: str = "img_size") -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what} must be one size or (height, width), got {value!r}")
        h, w = (_positive_int(v, what) for v in value)
        if h != w:
            # The original supports only square maps (its SSA reshapes to (W, H), Q2), and the
            # builders record one training size; non-square inputs still run at inference.
            raise ValueError(f"{what}={tuple(value)}: a non-square training size is not supported "
                             f"(the model records one square size; any input whose sides are "
                             f"multiples of its reduction runs at inference)")
        return h
    return _positive_int(value, what)


def _expand_widths(embed_dims, n_stages: int):
    """``embed_dims=E`` (the original's single width) -> stage widths E/2^(n-1), ..., E/2, E."""
    if isinstance(embed_dims, (list, tuple)):
        return _stage_ints(embed_dims, "embed_dims")
    e = _positive_int(embed_dims, "embed_dims")
    if e >> (n_stages - 1) < 1:
        raise ValueError(f"embed_dims={e} is too small for {n_stages} stages (the first stage "
                         f"gets embed_dims / {2 ** (n_stages - 1)})")
    return tuple(e // 2 ** (n_stages - 1 - i) for i in range(n_stages))


def resolve_model_args(variant: str, kwargs: Dict[str, Any],
                       img_size_default: Optional[int] = None) -> Dict[str, Any]:
    """The constructor arguments of ``variant`` with ``kwargs`` applied, in our vocabulary.

    Pops every architecture argument (ours and the original's) out of ``kwargs``; what is left
    is for ``build_model_with_cfg``. Besides per-stage tuples, the original's forms work:
    ``embed_dims`` as the last-stage width, ``depths`` as the total block count (ImageNet
    1/2/(d-3), CIFAR 1/1/(d-2), DVS fixed 1/1), ``mlp_ratios``, ``in_channels``,
    ``img_size_h``/``img_size_w``, and the arguments the original accepts and ignores
    (``patch_size``, ``qkv_bias``, ``qk_scale``, ``drop_rate``, ``attn_drop_rate``,
    ``drop_path_rate``, ``norm_layer``, ``sr_ratios``). In such a call the CIFAR and DVS models
    use 8 and 16 heads whatever ``num_heads`` says, as the original does. The ``pretrained_cfg``
    left-overs that timm 0.6 passed into the original's constructor are timm's own arguments
    here and reach ``build_model_with_cfg`` untouched.
    """
    base = VARIANTS[variant]
    family = kwargs.get("family", base["family"])
    total = kwargs.get("depths")
    original_style = bool(_ORIGINAL_ONLY & kwargs.keys()) or (
        isinstance(total, numbers.Integral) and not isinstance(total, bool))
    given = {k: kwargs.pop(k) for k in _ARCH_KEYS if k in kwargs}
    for theirs, ours in _RENAMED.items():
        if theirs in kwargs:
            _same(given, ours, kwargs.pop(theirs), theirs)
    if "img_size" in given:
        given["img_size"] = _square_size(given["img_size"])
    h, w = kwargs.pop("img_size_h", None), kwargs.pop("img_size_w", None)
    if h is not None or w is not None:
        size = _square_size((h if h is not None else w, w if w is not None else h),
                            "(img_size_h, img_size_w)")
        _same(given, "img_size", size, "img_size_h/img_size_w")
    for k in _IGNORED:
        kwargs.pop(k, None)

    args = {**base, "img_size": img_size_default or base["img_size"], **given}
    depths = args["depths"]
    if isinstance(depths, (list, tuple)):
        depths = _stage_ints(depths, "depths")
    elif family == "dvs":
        depths = (1, 1)  # the original's DVS model ignores its depths argument
    elif family in _LEADING_DEPTHS:
        total, lead = _positive_int(depths, "depths"), _LEADING_DEPTHS[family]
        if total - sum(lead) < 1:
            split = "/".join(map(str, lead))
            raise ValueError(
                f"depths={total} is the original's total block count, split {split}/(depths-"
                f"{sum(lead)}) in the {family} family, so it must be at least {sum(lead) + 1}; "
                f"give per-stage depths (a tuple) for other layouts")
        depths = (*lead, total - sum(lead))
    else:  # a custom FamilyLayout: an int means the same depth in every stage
        depths = _positive_int(depths, "depths")
    widths = args["embed_dims"]
    if isinstance(widths, (list, tuple)):
        n_stages = len(widths)
    elif isinstance(depths, tuple):
        n_stages = len(depths)
    else:
        n_stages = len(base["embed_dims"])
    args["embed_dims"] = _expand_widths(widths, n_stages)
    if isinstance(depths, tuple) and len(depths) != n_stages:
        raise ValueError(f"depths {depths} gives {len(depths)} stages but embed_dims "
                         f"{args['embed_dims']} gives {n_stages}")
    args["depths"] = depths
    if original_style and family in _FORCED_HEADS:
        forced = _FORCED_HEADS[family]
        heads = given.get("num_heads", forced)
        if set(heads if isinstance(heads, (list, tuple)) else (heads,)) != {forced}:
            warnings.warn(f"{variant}: num_heads={given['num_heads']!r} is ignored, as in the "
                          f"original {family} model, which always uses {forced} heads", UserWarning,
                          stacklevel=2)
        args["num_heads"] = forced
    args["num_heads"] = _stage_ints(args["num_heads"], "num_heads")
    ratio = args.get("mlp_ratio", 4.0)
    if isinstance(ratio, (list, tuple)):  # the original takes one ratio for every stage
        if len(set(ratio)) != 1:
            raise ValueError(f"mlp_ratio(s)={ratio!r}: one ratio is used for every stage")
        ratio = ratio[0]
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {ratio!r}")
    args["mlp_ratio"] = float(ratio)
    args["img_size"] = _square_size(args["img_size"])
    args["in_chans"] = _positive_int(args.get("in_chans", 3), "in_chans")
    args["T"] = _positive_int(args["T"], "T")
    # every constructor argument explicit, so that a config.json written from them rebuilds
    # this network even if a default changes later
    for k, p in inspect.signature(HierarchicalSpikingTransformer).parameters.items():
        if k in _ARCH_KEYS and p.default is not p.empty:
            args.setdefault(k, p.default)
    if isinstance(args.get("attn_types"), list):
        args["attn_types"] = tuple(args["attn_types"])
    return {k: args[k] for k in _ARCH_KEYS if k in args}


def _square_cfg_size(cfg) -> int:
    h, w = cfg.input_size[-2:]
    return h if h == w else None


def _weights_overlay(variant: str, cfg, overlay, num_classes: int):
    """The overlay to hand timm so that ``load_pretrained`` finds the weights.

    Same priority as timm: a ``local-dir:``/``hf-hub:`` source, then ``state_dict``, ``file``,
    ``hf_hub_id``, ``url``. A file is read here, by our reader (allow-listed unpickling, typed
    errors, every released layout), and handed over as the cfg's in-memory ``state_dict``;
    timm's own readers would give an untyped error and, depending on the timm version, may
    not allow-list ``argparse.Namespace`` or may unpickle without ``weights_only``.

    timm drops the classifier when the model's ``num_classes`` differs from the cfg's (a new
    head for fine-tuning). A file whose head has exactly the class count the model asks for
    is described as such, so that its head loads; any other head is checked against the cfg
    (strict mismatch, or dropped when the model asks for a new class count).
    """
    from . import checkpoint as ckpt

    if cfg.source in ("hf-hub", "local-dir") or cfg.state_dict:
        return overlay
    if cfg.file:
        # EMA weights win when present, as in timm's own file loading
        state_dict = ckpt.extract_state_dict(ckpt.read_checkpoint(cfg.file), use_ema=None)
        overlay = {**(overlay or {}), "state_dict": state_dict}
        head = state_dict.get(f"{cfg.classifier}.bias") if isinstance(cfg.classifier, str) else None
        if "num_classes" not in overlay and head is not None and head.shape == (num_classes,):
            overlay["num_classes"] = num_classes
        return overlay
    if cfg.hf_hub_id or cfg.url:
        return overlay
    raise ValueError(f"{variant}: pretrained=True but no weights given ({_WEIGHTS_NOTE})")


def _create(variant: str, pretrained: bool = False, **kwargs) -> HierarchicalSpikingTransformer:
    # imported here, not with the package, so that `python -m qkformer.checkpoint` does not find
    # the module already loaded (runpy warns about that)
    from . import checkpoint as ckpt

    strict = kwargs.pop("pretrained_strict", True)
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"),
                                 kwargs.get("pretrained_cfg_overlay"))
    # The training resolution defaults to the tag's (e.g. 384 for qkformer_10_768.in1k_384).
    model_args = resolve_model_args(variant, kwargs, _square_cfg_size(cfg))
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _weights_overlay(
            variant, cfg, kwargs.get("pretrained_cfg_overlay"), model_args["num_classes"])
    try:
        model = build_model_with_cfg(
            HierarchicalSpikingTransformer, variant, pretrained=pretrained,
            pretrained_filter_fn=functools.partial(ckpt.checkpoint_filter_fn, strict=strict),
            pretrained_strict=strict,
            # features_only: timm's FeatureGetterNet over forward_intermediates, one map per stage
            feature_cfg=dict(feature_cls="getter",
                             out_indices=tuple(range(len(model_args["embed_dims"])))),
            **model_args, **kwargs)
    except RuntimeError as e:
        # timm's readers (local-dir:, hf-hub:) refuse such pickles with weights_only=True; say
        # so with our type, like a file read by read_checkpoint
        if isinstance(e.__cause__, pickle.UnpicklingError):
            raise ckpt.UnsafeCheckpointError(
                f"refusing to load the pretrained weights of {variant}: loading them could "
                f"execute arbitrary code ({e})") from e
        raise
    # an in-memory state_dict handed to timm must not stay alive (and unserialisable) in the cfg
    model.pretrained_cfg.pop("state_dict", None)
    # What rebuilds exactly this network: timm records its factory kwargs on top of these (same
    # network, maybe in the original's vocabulary); export-hub writes arch_args alone.
    model.arch_args = model_args
    model._model_args = dict(model_args)
    return model


def variant_names() -> Tuple[str, ...]:
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
