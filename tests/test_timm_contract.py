"""The timm model contract, for every registered variant (``timm.list_models('qkformer*')``).

forward_features takes the raw input and returns the unpooled last-stage spikes; forward_head
pools and classifies, so that forward_head(forward_features(x)) == forward(x); pre_logits,
get_classifier / reset_classifier; feature_info, features_only / out_indices (firing maps
[B, C_i, H_i, W_i]) and forward_intermediates (spike maps [T, B, C_i, H_i, W_i]);
group_matcher with timm's layer decay, no_weight_decay with timm's optimizer factory, and
set_grad_checkpointing (a real change of what is kept, not a placeholder).
"""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_layer_decay

import qkformer  # noqa: F401  (registers the variants with timm)
from conftest import saved_bytes

VARIANTS = timm.list_models("qkformer*")


def _small(name):
    """The variant at a reduced width (same family, same structure), eval-sized input."""
    kwargs = dict(embed_dims=32, num_heads=2, num_classes=7)
    if "dvs" in name:
        shape = (2, 2, 2, 32, 32)  # [B, T, 2, H, W] events
    else:
        kwargs["T"] = 2
        shape = (2, 3, 32, 32)
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.rand(shape) * 2 if "dvs" not in name else torch.poisson(torch.full(shape, 0.5))
    return model, x


def test_every_variant_is_listed():
    assert len(VARIANTS) == 7 and set(qkformer.variant_names()) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_features_head_and_classifier(name):
    model, x = _small(name)
    with torch.no_grad():
        feats = model.forward_features(x)
        T = x.shape[1] if "dvs" in name else model.T
        C, r = model.feature_info[-1]["num_chs"], model.feature_info[-1]["reduction"]
        assert feats.shape == (T, x.shape[0], C, 32 // r, 32 // r)
        assert torch.equal(model.forward_head(feats), model(x))
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (x.shape[0], model.num_features)
    assert model.get_classifier() is model.head and model.head.out_features == 7
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (x.shape[0], 3)
    model.reset_classifier(0)
    assert model(x).shape == (x.shape[0], model.num_features)


@pytest.mark.parametrize("name", VARIANTS)
def test_intermediates_and_features_only(name):
    model, x = _small(name)
    n = len(model.feature_info)
    with torch.no_grad():
        last, maps = model.forward_intermediates(x)
        assert len(maps) == n and torch.equal(last, maps[-1])
        with model.reference_path():  # the same maps, computed layer by layer
            _, ref_maps = model.forward_intermediates(x)
        for a, b in zip(maps, ref_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        rates = model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        for spikes, rate, info in zip(maps, rates, model.feature_info):
            assert rate.shape == (x.shape[0], info["num_chs"], 32 // info["reduction"],
                                  32 // info["reduction"])
            torch.testing.assert_close(rate, spikes.mean(0))
        picked = model.forward_intermediates(x, indices=[0], intermediates_only=True)
        assert len(picked) == 1 and torch.equal(picked[0], maps[0])
    # timm's own feature extraction wrapper: one map per stage, or the chosen ones
    kwargs = dict(embed_dims=32, num_heads=2)
    if "dvs" not in name:
        kwargs["T"] = 2
    backbone = timm.create_model(name, features_only=True, **kwargs).eval()
    with torch.no_grad():
        out = backbone(x)
    assert [o.shape[1] for o in out] == backbone.feature_info.channels()
    assert [32 // o.shape[-1] for o in out] == backbone.feature_info.reduction()
    assert all(o.dim() == 4 and o.min() >= 0 for o in out)
    last_only = timm.create_model(name, features_only=True, out_indices=(-1,), **kwargs)
    assert len(last_only.feature_info.channels()) == 1


@pytest.mark.parametrize("name", VARIANTS)
def test_layer_decay_groups_and_weight_decay(name):
    model, _ = _small(name)
    last = len(model.feature_info)
    # the original's ImageNet groups: everything before the last stage, then it and the head
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scales = {}
    for g in groups:
        for p in g["params"]:
            scales[id(p)] = g["lr_scale"]
    for pname, p in model.named_parameters():
        top = pname.startswith((f"stage{last}.", "head."))
        assert scales[id(p)] == (1.0 if top else 0.5), pname
    assert model.no_weight_decay() == set()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    for g in opt.param_groups:  # 1-D parameters (BN, biases) are exempt, as in the original
        assert all((p.ndim <= 1) == (g["weight_decay"] == 0.0) for p in g["params"])
    coarse = model.group_matcher(coarse=True)
    assert set(coarse) == {"stem", "blocks"}


@pytest.mark.parametrize("name", VARIANTS)
def test_grad_checkpointing_is_real(name):
    model, x = _small(name)
    model.train()
    full = saved_bytes(lambda: model(x))
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and saved_bytes(lambda: model(x)) < full / 5
    model.set_grad_checkpointing(False)
    assert saved_bytes(lambda: model(x)) == full
