"""Input validation, input encodings, precision and legacy/fixed SSA at the model level."""
import pytest
import timm
import torch

import qkformer  # noqa: F401  (registers the models with timm when this file runs alone)

TINY = dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, num_classes=4, T=2)


@pytest.fixture(scope="module")
def models():
    return {
        "imagenet": timm.create_model("qkformer_10_384", **TINY, img_size=32).eval(),
        "cifar": timm.create_model("qkformer_cifar10", **TINY, img_size=8).eval(),
        "dvs": timm.create_model("qkformer_cifar10_dvs", embed_dims=32, num_heads=4,
                                 num_classes=4).eval(),
    }


def test_input_validation(models):
    with pytest.raises(ValueError, match=r"expected an image batch \[B, 3, H, W\]"):
        models["imagenet"](torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        models["imagenet"](torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        models["imagenet"](torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match="multiples of 4"):
        models["cifar"](torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"event frames \[B, T, 2, H, W\]"):
        models["dvs"](torch.randn(2, 2, 32, 32))
    with pytest.raises(ValueError, match="expected 2 input channels, got 3"):
        models["dvs"](torch.randn(1, 3, 3, 32, 32))


def test_shapes_and_resolutions(models):
    with torch.no_grad():
        for size in (32, 48, 64):  # ImageNet family: any multiple of 16 (224/288/384 at scale)
            assert models["imagenet"](torch.randn(2, 3, size, size)).shape == (2, 4)
        assert models["imagenet"](torch.randn(1, 3, 32, 48)).shape == (1, 4)  # non-square
        assert models["cifar"](torch.randn(3, 3, 8, 8)).shape == (3, 4)
        # DVS: T comes from the data
        assert models["dvs"](torch.randn(2, 5, 2, 32, 32).relu()).shape == (2, 4)


def test_static_encoding_repeats_the_image(models):
    m = models["cifar"]
    x = torch.randn(2, 3, 8, 8)
    enc = m.encode(x)
    assert enc.shape == (2, 2, 3, 8, 8) and torch.equal(enc[0], x) and torch.equal(enc[1], x)


@pytest.mark.parametrize("family", ["imagenet", "cifar", "dvs"])
def test_float64_and_bf16_autocast(models, family):
    m = models[family]
    x = torch.randn(2, 3, 32, 32) if family == "imagenet" else torch.randn(2, 3, 8, 8)
    if family == "dvs":
        x = torch.poisson(torch.full((2, 3, 2, 32, 32), 0.5))
    with torch.no_grad():
        ref = m(x)
        d = m.double()(x.double())
        m.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = m(x)
    assert d.dtype == torch.float64 and torch.isfinite(d).all()
    torch.testing.assert_close(d.float(), ref, rtol=0, atol=1e-4)
    assert b.dtype == torch.bfloat16 and torch.isfinite(b.float()).all()


def test_training_step_under_bf16_autocast(models):
    m = timm.create_model("qkformer_cifar10", **TINY, img_size=8).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    grads = {name: p.grad for name, p in m.named_parameters() if p.requires_grad}
    assert grads and not [name for name, g in grads.items() if g is None]
    assert not [name for name, g in grads.items() if not torch.isfinite(g).all()]
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 master weights
    # the gradient reaches both ends of the network through every spiking stage
    for name in ("head.weight", "head.bias", "patch_embed1.proj_conv.weight",
                 "patch_embed1.proj_bn.weight"):
        assert grads[name].abs().sum() > 0, name
    # and most parameters (a few units may receive no spikes at this tiny size)
    assert sum(bool(g.abs().sum() > 0) for g in grads.values()) >= 0.9 * len(grads)


def test_legacy_switch_at_model_level():
    legacy = timm.create_model("qkformer_cifar10", **TINY, img_size=8).eval()
    fixed = timm.create_model("qkformer_cifar10", **TINY, img_size=8, legacy_ssa=False).eval()
    fixed.load_state_dict(legacy.state_dict())
    for bn in legacy.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.bias.data.uniform_(0, 1)
    fixed.load_state_dict(legacy.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        alone = torch.cat([fixed(xi[None]) for xi in x])
        torch.testing.assert_close(fixed(x), alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(legacy(x[:1]), fixed(x[:1]), rtol=0, atol=0)
        assert not torch.allclose(legacy(x), fixed(x))
        legacy.set_legacy_ssa(False)
        torch.testing.assert_close(legacy(x), fixed(x), rtol=0, atol=0)
