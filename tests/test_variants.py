"""Every released variant has exactly the original state_dict keys, shapes, order and size."""
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
