"""Gradient checkpointing (``set_grad_checkpointing``): bit-identical training, far less memory.

After a full optimizer step the weights, the gradients and every BatchNorm buffer equal a step
without checkpointing bit for bit (float64 and float32, both paths, every family, AMP too),
which also proves the running statistics are updated exactly once. DDP with checkpointing and a
resumed checkpointed run are in tests/test_training.py.
"""
import copy

import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401  (registers the variants with timm)
from conftest import saved_bytes

FAMILIES = {
    "imagenet": ("qkformer_10_384", dict(embed_dims=32, depths=(1, 1, 2), num_heads=2, T=2,
                                         num_classes=5), (3, 3, 32, 32)),
    "cifar": ("qkformer_cifar10", dict(embed_dims=32, depths=(1, 1, 2), num_heads=2, T=2,
                                       num_classes=5, legacy_ssa=False,
                                       attn_types=("qkta", "qkca", "ssa")), (3, 3, 16, 16)),
    "dvs": ("qkformer_cifar10_dvs", dict(embed_dims=32, num_heads=2, num_classes=5),
            (3, 3, 2, 32, 32)),
}


def _models(family, dtype, fast_path=True):
    name, kwargs, shape = FAMILIES[family]
    torch.manual_seed(0)
    plain = timm.create_model(name, fast_path=fast_path, **kwargs).to(dtype)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    x = (torch.poisson(torch.full(shape, 0.5), generator=g) if len(shape) == 5
         else torch.randn(shape, generator=g)).to(dtype)
    return plain, ckpt, x, torch.arange(shape[0]) % 5


def _step(model, x, y, amp=False, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_identical(a, b, res_a, res_b):
    assert torch.equal(res_a[0], res_b[0])
    assert all(torch.equal(g, h) for g, h in zip(res_a[1], res_b[1]))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    for (n, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(p, q), n  # running statistics and num_batches_tracked: updated once


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpointed_steps_are_bit_identical(family, fast_path, dtype):
    plain, ckpt, x, y = _models(family, dtype, fast_path)
    _assert_identical(plain, ckpt, _step(plain, x, y), _step(ckpt, x, y))
    assert int(ckpt.patch_embed1.proj_bn.num_batches_tracked) == 2


def test_checkpointed_amp_steps_are_bit_identical():
    plain, ckpt, x, y = _models("imagenet", torch.float32)
    _assert_identical(plain, ckpt, _step(plain, x, y, amp=True), _step(ckpt, x, y, amp=True))


def _saved_bytes(model, x):
    return saved_bytes(lambda: model(x))


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "reference"])
def test_checkpointing_keeps_only_layer_inputs(fast_path):
    plain, ckpt, x, _ = _models("cifar", torch.float32, fast_path)
    plain.train(), ckpt.train()
    inputs = []
    layers = [m for i, (embed, stage) in enumerate(ckpt.embeds_and_stages())
              for m in ([embed] if i else []) + list(stage)]
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append(a[0].numel())) for m in layers]
    kept = _saved_bytes(ckpt, x)
    for h in hooks:
        h.remove()
    # the image as it is (the first SPEDS), one byte per value of every other layer's input,
    # and the head's input and weight
    head = ckpt.head
    expect = x.numel() * 4 + sum(inputs) + x.shape[0] * head.in_features * 4 + head.weight.numel() * 4
    assert kept == expect
    full = _saved_bytes(plain, x)
    assert kept < full / 10, (kept, full)
    ckpt.set_grad_checkpointing(False)
    assert _saved_bytes(ckpt, x) == full


def test_checkpointing_is_off_in_eval_and_no_grad():
    plain, ckpt, x, _ = _models("dvs", torch.float64)
    plain.eval(), ckpt.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), ckpt(x))


@pytest.mark.slow
def test_checkpointing_under_torch_compile():
    torch._dynamo.reset()
    plain, ckpt, x, y = _models("cifar", torch.float32)
    compiled = torch.compile(ckpt, dynamic=False)
    res_c = _step(compiled, x, y, steps=1)
    res_p = _step(plain, x, y, steps=1)
    torch.testing.assert_close(res_c[0], res_p[0], rtol=1e-5, atol=1e-6)
    for g, h in zip(res_c[1], res_p[1]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    for (n, p), (_, q) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
