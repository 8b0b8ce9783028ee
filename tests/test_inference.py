"""BatchNorm folding and the inference path (qkformer.inference), and torch.compile of the model."""
import copy

import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401  (registers the models)
from qkformer.inference import conv_bn_pairs, fold_batchnorm, prepare_for_inference
from qkformer.neuron import MultiStepLIF
from conftest import fire_bn

# One tiny model per family; together they cover QKTA, SSA, the MLP and every SPEDS layout
# (including the units with a max-pool between BN and LIF).
TINY = {
    "cifar": ("qkformer_cifar10", dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, num_classes=4,
                                       T=2), (3, 3, 16, 16)),
    "imagenet": ("qkformer_10_384", dict(embed_dims=32, depths=(1, 1, 1), num_heads=2,
                                         num_classes=4, T=2), (3, 3, 32, 32)),
    "dvs": ("qkformer_cifar10_dvs", dict(embed_dims=32, num_heads=2, num_classes=4),
            (3, 2, 2, 32, 32)),
}


def _tiny(family: str, dtype=torch.float64, fast_path: bool = False):
    name, kwargs, shape = TINY[family]
    torch.manual_seed(0)
    model = timm.create_model(name, fast_path=fast_path, **kwargs).to(dtype)
    fire_bn(model)
    x = torch.rand(shape, dtype=dtype) * 2
    return model.eval(), x


def _record_lif(model: nn.Module):
    """Forward hooks storing (input, output) of every LIF, in call order."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
             for m in model.modules() if isinstance(m, MultiStepLIF)]
    return seen, hooks


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("family", list(TINY))
def test_folded_matches_unfolded_float64(family):
    model, x = _tiny(family)
    n_bn = _bn_count(model)
    assert len(conv_bn_pairs(model)) == n_bn  # every BN directly follows a convolution
    folded = fold_batchnorm(model)
    assert _bn_count(folded) == 0 and _bn_count(model) == n_bn  # the original is untouched
    assert not folded.training

    ref_seen, ref_hooks = _record_lif(model)
    new_seen, new_hooks = _record_lif(folded)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    for h in ref_hooks + new_hooks:
        h.remove()

    assert len(ref_seen) == len(new_seen) > 0
    rates = []
    for (ref_in, ref_s), (new_in, new_s) in zip(ref_seen, new_seen):
        # membrane inputs equal up to float64 rounding, spikes identical
        torch.testing.assert_close(new_in, ref_in, rtol=1e-9, atol=1e-9)
        assert torch.equal(new_s, ref_s)
        rates.append(ref_s.mean().item())
    assert 0 < sum(rates) / len(rates) < 1 and max(rates) > 0.05  # neurons do fire
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", list(TINY))
def test_folded_fast_path_matches_reference_float64(family):
    # the fast path runs a folded model's units without BatchNorm (Identity in its place)
    model, x = _tiny(family, fast_path=True)
    reference = copy.deepcopy(model)
    reference.set_fast_path(False)
    folded = fold_batchnorm(model)
    assert folded.fast_path
    with torch.no_grad():
        expected = reference(x)
        assert reference.forward_head(reference.forward_features(x), pre_logits=True).max() > 0.05
        torch.testing.assert_close(folded(x), expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-12)


def test_folding_is_close_in_float32():
    # In float32 a membrane input may land on the other side of a threshold after folding, so
    # only the pre-LIF values are compared (the float64 test above checks spikes).
    model, x = _tiny("cifar", torch.float32)
    folded = fold_batchnorm(model)
    conv, bn = model.stage1[0].mlp.mlp1_conv, model.stage1[0].mlp.mlp1_bn
    h = torch.rand(4, conv.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded.stage1[0].mlp.mlp1_conv(h), bn(conv(h)),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast_path", [False, True])
def test_prepare_for_inference(fast_path):
    model, x = _tiny("dvs", fast_path=fast_path)
    model.train()
    fast = prepare_for_inference(model)
    assert model.training  # the original keeps its mode and its BN
    assert not fast.training and _bn_count(fast) == 0
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    out = fast(x)  # no torch.no_grad(): nothing requires grad, so no graph is built
    assert out.grad_fn is None and not out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval()(x), rtol=1e-9, atol=1e-12)


def test_fold_keeps_bias_free_convs_working():
    # SPEDS and q/k/v convs have no bias; folding gives them one
    model, _ = _tiny("cifar")
    folded = fold_batchnorm(model)
    assert model.patch_embed1.proj_conv.bias is None
    assert folded.patch_embed1.proj_conv.bias is not None
    assert isinstance(folded.patch_embed1.proj_bn, nn.Identity)
    assert "patch_embed1.proj_bn.running_mean" not in folded.state_dict()


@pytest.mark.slow
def test_torch_compile_train_and_eval_match_eager():
    """torch.compile (inductor) of a tiny two-stage model (QKTA + SSA): a train step's loss and
    gradients, and the eval logits (plain and folded), match eager execution."""
    torch._dynamo.reset()  # no guards or automatic-dynamic state left over from other tests
    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1), num_heads=2,
                              attn_types=("qkta", "ssa"), num_classes=4, T=2)
    ref = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])

    compiled = torch.compile(model, dynamic=False)
    loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)

    model.eval(), ref.eval()
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
        fast = prepare_for_inference(ref, compile=True, dynamic=False)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
