"""Every released variant has exactly the original state_dict keys, shapes, order and size; the
builders speak the original constructors' vocabulary too."""
import functools
import json

import pytest
import timm
import torch

import qkformer
from conftest import MANIFESTS

PARAMS = {
    "qkformer_10_384": 16_473_688, "qkformer_10_512": 29_079_336, "qkformer_10_768": 64_962_760,
    "qkformer_cifar10": 6_706_234, "qkformer_cifar100": 6_740_884,
    "qkformer_cifar10_dvs": 1_504_138, "qkformer_dvs128_gesture": 1_999_371,
}


def _meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_state_dict_equals_manifest(reference, name):
    manifest = json.loads((reference / "manifests" / f"{MANIFESTS[name]}.json").read_text())
    expected = [(k, list(shape), dtype) for k, shape, dtype in manifest["state_dict"]]
    ours = [(k, list(v.shape), str(v.dtype)) for k, v in _meta_model(name).state_dict().items()]
    assert ours == expected  # same keys, same order, same shapes and dtypes
    assert len(ours) == manifest["num_state_dict_entries"]


@pytest.mark.parametrize("name,count", list(PARAMS.items()))
def test_parameter_count(name, count):
    assert sum(p.numel() for p in _meta_model(name).parameters()) == count


def test_registered_with_timm():
    listed = set(timm.list_models("qkformer_*"))
    assert set(qkformer.variant_names()) <= listed
    assert timm.models.get_pretrained_cfg("qkformer_10_768.in1k_384").crop_pct == 1.0
    m = _meta_model("qkformer_10_768.in1k_384")
    assert m.pretrained_cfg["input_size"] == (3, 384, 384)


def test_family_structure():
    m = _meta_model("qkformer_cifar10_dvs")
    assert [n for n, _ in m.named_children()] == ["patch_embed1", "stage1", "patch_embed2",
                                                  "stage2", "head"]
    assert m.patch_factor == 16 and m.T == 16
    assert _meta_model("qkformer_cifar10").patch_factor == 4
    assert _meta_model("qkformer_10_384").patch_factor == 16


def test_architecture_overrides():
    m = _meta_model("qkformer_10_384", T=2, embed_dims=(16, 32, 64), depths=(1, 1, 3),
                    num_heads=(1, 2, 4), mlp_ratio=2.0, attn_types=("qkca", "ssa", "qkta"),
                    num_classes=7, in_chans=1, img_size=64)
    assert len(m.stage3) == 3 and m.head.out_features == 7 and m.T == 2
    assert m.stage1[0].attn_name == "qkca" and m.stage2[0].attn_name == "attn"
    assert m.stage3[0].attn_name == "tssa" and m.stage3[0].mlp.fc1_conv.out_channels == 128
    assert m.patch_embed1.proj_conv.in_channels == 1
    with pytest.raises(ValueError, match="attn_types"):
        _meta_model("qkformer_10_384", attn_types=("qkta", "ssa"))
    with pytest.raises(ValueError, match="unknown attention"):
        _meta_model("qkformer_10_384", attn_types="sdsa")
    with pytest.raises(ValueError, match="divisible"):
        _meta_model("qkformer_10_384", num_heads=5)


def _manifest(reference, name):
    return json.loads((reference / "manifests" / f"{MANIFESTS[name]}.json").read_text())


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_original_constructor_vocabulary_builds_the_released_network(reference, name):
    """The original constructor's own kwargs (recorded in the manifest): ``depths`` as a total,
    ``embed_dims`` as the last width, ``mlp_ratios``, ``in_channels``, ``img_size_h/w`` and the
    ignored ``patch_size``, ``qkv_bias``, ``drop_path_rate``, ``sr_ratios``, ... build it."""
    manifest = _manifest(reference, name)
    kwargs = dict(manifest["constructor_kwargs"], norm_layer=functools.partial(torch.nn.LayerNorm,
                                                                               eps=1e-6))
    assert "depths" in kwargs and "mlp_ratios" in kwargs and "in_channels" in kwargs
    model = _meta_model(name, **kwargs)
    ours = [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    assert ours == [(k, list(s), d) for k, s, d in manifest["state_dict"]]
    assert model.img_size == kwargs["img_size_h"] and model.in_chans == kwargs["in_channels"]
    heads = {"imagenet": kwargs["num_heads"], "cifar": 8, "dvs": 16}[model.layout.name]
    assert [getattr(b, b.attn_name).num_heads for _, s in model.embeds_and_stages() for b in s] \
        == [heads] * sum(len(s) for _, s in model.embeds_and_stages())


def test_original_depth_totals_and_heads():
    stages = lambda m: [len(s) for _, s in m.embeds_and_stages()]  # noqa: E731
    assert stages(_meta_model("qkformer_10_384", depths=10)) == [1, 2, 7]
    assert stages(_meta_model("qkformer_10_384", depths=5)) == [1, 2, 2]
    assert stages(_meta_model("qkformer_cifar10", depths=4)) == [1, 1, 2]
    assert stages(_meta_model("qkformer_cifar10", depths=6)) == [1, 1, 4]
    assert stages(_meta_model("qkformer_cifar10_dvs", depths=9)) == [1, 1]  # ignored, as there
    assert stages(_meta_model("qkformer_10_384", depths=(2, 1, 1))) == [2, 1, 1]  # per stage
    m = _meta_model("qkformer_cifar10", embed_dims=(32, 64, 128), depths=(1, 1, 1), num_heads=2)
    assert m.stage3[0].ssa.num_heads == 2  # our vocabulary: num_heads is honoured
    with pytest.warns(UserWarning, match="num_heads=2 is ignored.*8 heads"):
        m = _meta_model("qkformer_cifar10", embed_dims=128, depths=4, num_heads=2)
    assert m.stage1[0].tssa.num_heads == 8 and m.embed_dims == (32, 64, 128)
    assert _meta_model("qkformer_10_384", depths=10, num_heads=2).stage3[0].attn.num_heads == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(depths=2), "at least 4"),
    (dict(depths=3), "at least 4"),
    (dict(embed_dims=-384), "positive integer"),
    (dict(embed_dims=(96, -192, 384)), "positive integer"),
    (dict(embed_dims=2), "too small"),
    (dict(depths=(1, 0, 7)), "positive integer"),
    (dict(depths=(1, 2)), "2 stages"),
    (dict(img_size_h=224, img_size_w=192), "non-square"),
    (dict(img_size=(224, 192)), "non-square"),
    (dict(img_size_h=224, img_size=288), "contradicts"),
    (dict(in_channels=2, in_chans=3), "contradicts"),
    (dict(mlp_ratios=4, mlp_ratio=2.0), "contradicts"),
    (dict(mlp_ratios=(4, 4, 2)), "one ratio"),
    (dict(mlp_ratios=-1), "positive number"),
    (dict(T=0), "positive integer"),
])
def test_invalid_or_contradictory_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _meta_model("qkformer_10_384", **kwargs)


def test_cifar_depth_total_lower_bound():
    with pytest.raises(ValueError, match="at least 3"):
        _meta_model("qkformer_cifar10", depths=2)


def test_equivalent_spellings_agree():
    a = _meta_model("qkformer_10_384", img_size_h=192, img_size_w=192, in_channels=1,
                    mlp_ratios=(2, 2, 2), embed_dims=64, depths=4, num_heads=2)
    b = _meta_model("qkformer_10_384", img_size=(192, 192), in_chans=1, mlp_ratio=2.0,
                    embed_dims=(16, 32, 64), depths=(1, 2, 1), num_heads=2)
    assert a.arch_args == b.arch_args
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(a) == shapes(b)


def test_training_size_follows_the_pretrained_tag():
    assert _meta_model("qkformer_10_768.in1k_384").img_size == 384
    assert _meta_model("qkformer_10_768.in1k_288", img_size=224).img_size == 224
    cfg = timm.models.get_pretrained_cfg("qkformer_10_768.in1k")
    assert not cfg.url and not cfg.hf_hub_id and "export-hub" in " ".join(cfg.notes)
