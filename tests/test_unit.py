"""The spiking unit (qkformer.unit): one definition of conv -> BN -> [pool] -> LIF read from the
layer's own modules, for both paths, BN folding and the analysis tools."""
import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401
from qkformer.attention import QKTokenAttention, SpikingSelfAttention
from qkformer.inference import conv_bn_pairs
from qkformer.layers import SPEDS, ConvUnit
from qkformer.unit import SpikingUnit, spiking_units
from conftest import fire_bn


def _tokens(module, x):
    module.token_major = True
    try:
        return module(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
    finally:
        module.token_major = False


def test_every_batchnorm_belongs_to_one_unit():
    model = timm.create_model("qkformer_10_384", embed_dims=32, depths=(1, 1, 2), num_heads=2, T=1)
    bns = {id(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    units = list(spiking_units(model))
    assert {id(u.bn) for u in units} == bns and len(units) == len(bns)
    assert len(conv_bn_pairs(model)) == len(bns)
    for u in units:  # the unit names the modules the state_dict keys come from
        assert getattr(u.owner, f"{u.name}_conv") is u.conv and u.lif is getattr(u.owner, f"{u.name}_lif")


@pytest.mark.parametrize("change, match", [
    (lambda s: setattr(s, "stem_pool", nn.MaxPool2d(2, 2)), "MaxPool2d"),
    (lambda s: setattr(s.stem_conv, "dilation", (2, 2)), "dilation"),
    (lambda s: setattr(s.stem_conv, "padding", (0, 0)), "padding"),
])
def test_the_fused_path_refuses_what_it_cannot_express(change, match):
    speds = SPEDS(2, 8, [ConvUnit("stem", pool="stem_pool")], shortcut_from=-1, shortcut_stride=2)
    x = torch.rand(2, 1, 2, 8, 8)
    _tokens(speds, x)  # as built: fine
    change(speds)
    with pytest.raises(ValueError, match=match):
        _tokens(speds, x)


@pytest.mark.parametrize("cls", [QKTokenAttention, SpikingSelfAttention])
def test_projections_with_different_batchnorm_settings_are_not_stacked(cls):
    """q/k(/v) run as one GEMM only where their units agree; a different eps on k must still
    give the reference path's result (stacking would apply q's eps to k)."""
    torch.manual_seed(0)
    attn = (cls(16, 2, legacy_proj_lif=False) if cls is SpikingSelfAttention else cls(16, 2)).double()
    fire_bn(attn)
    attn.k_bn.eps = 0.5
    x = torch.poisson(torch.full((2, 2, 16, 4, 4), 0.7, dtype=torch.float64))
    attn.train()
    ref = attn(x)
    got = _tokens(attn, x)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert ref.abs().sum() > 0


def test_units_follow_deepcopy():
    import copy
    speds = SPEDS(2, 8, [ConvUnit("stem", pool="stem_pool")])
    clone = copy.deepcopy(speds)
    assert clone.main[0].owner is clone and clone.shortcut.conv is clone.proj_res_conv
    assert isinstance(clone.main[0], SpikingUnit) and clone.main[0].pool is clone.stem_pool
