"""QKTA, QKCA and SSA: semantics, the legacy proj_lif switch, and linear memory in N."""
import pytest
import torch

from qkformer.attention import QKChannelAttention, QKTokenAttention, SpikingSelfAttention
from qkformer.neuron import lif_multistep


def _spikes(*shape, p=0.3):
    return (torch.rand(shape) < p).float()


def _randomise_bn(module):
    # BN affine params that make neurons fire in eval mode with default running stats.
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.weight.data.uniform_(0.5, 2.0)
            m.bias.data.uniform_(0.0, 1.0)
    return module.eval()


def test_qkta_mask_is_or_over_head_channels():
    attn = _randomise_bn(QKTokenAttention(16, num_heads=4))
    x = _spikes(3, 2, 16, 4, 4)
    with torch.no_grad():
        T, B = 3, 2
        q = attn.q_lif(attn.q_bn(attn.q_conv(x.flatten(3).flatten(0, 1))).reshape(T, B, 16, 16))
        q = q.reshape(T, B, 4, 4, 16)
        mask = attn.attention_mask(q)
    assert mask.shape == (T, B, 4, 1, 16)
    # docs/original.md §1.4: at V_th 0.5 on integer counts the LIF is exactly 1[count >= 1]
    assert torch.equal(mask, (q.sum(3, keepdim=True) >= 1).float())
    assert attn(x).shape == x.shape


def test_qkca_channel_mask_shapes():
    attn = _randomise_bn(QKChannelAttention(16, num_heads=4))
    x = _spikes(2, 3, 16, 4, 8)  # non-square map
    with torch.no_grad():
        out = attn(x)
        q = torch.rand(2, 3, 4, 4, 32).round()
        mask = attn.attention_mask(q)
    assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    assert mask.shape == (2, 3, 4, 4, 1)  # one gate per channel of each head
    assert torch.equal(mask, (q.sum(4, keepdim=True) >= 1).float())


def _ssa_pair(dim=16, heads=2):
    legacy = _randomise_bn(SpikingSelfAttention(dim, heads, legacy_proj_lif=True))
    fixed = SpikingSelfAttention(dim, heads, legacy_proj_lif=False).eval()
    fixed.load_state_dict(legacy.state_dict())
    return legacy, fixed


def test_ssa_legacy_equals_fixed_at_batch_one():
    legacy, fixed = _ssa_pair()
    x = _spikes(4, 1, 16, 3, 3, p=0.5)
    with torch.no_grad():
        assert torch.equal(legacy(x), fixed(x))


def test_ssa_legacy_couples_the_batch_exactly_as_specified():
    legacy, fixed = _ssa_pair()
    x = _spikes(4, 3, 16, 3, 3, p=0.5)
    with torch.no_grad():
        out_legacy, out_fixed = legacy(x), fixed(x)
        alone = torch.cat([fixed(x[:, b:b + 1]) for b in range(3)], dim=1)
        # fixed = per sample: independent of the batch
        assert torch.equal(out_fixed, alone)
        assert not torch.equal(out_legacy, out_fixed)
        # legacy = one LIF over the t-major T*B sequence, fed by the same proj conv/BN input
        fixed.proj_lif.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        captured = []
        fixed(x)
        pre = captured[0]  # [T, B, C, N]
        chained = lif_multistep(pre.reshape(4 * 3, -1)).reshape(out_legacy.shape)
        assert torch.equal(out_legacy, chained)
        # and it is the first sample of each step after t = 0 ... that carries the state over:
        assert torch.equal(out_legacy[0, 0], out_fixed[0, 0])


def test_ssa_scale_and_product_order():
    attn = SpikingSelfAttention(8, 2)
    assert attn.scale == 0.125  # constant for every head width (docs/original.md Q3)


def _saved_bytes(module, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return total


@pytest.mark.parametrize("cls", [QKTokenAttention, QKChannelAttention])
def test_qk_attention_memory_is_linear_in_tokens(cls):
    attn = cls(16, num_heads=4).train()
    n1, n2, n3 = (_saved_bytes(attn, _spikes(2, 2, 16, s, s).requires_grad_()) for s in (8, 16, 32))
    # saved activations = a + b*N exactly (N = 64, 256, 1024): no N^2 term
    assert n3 - n2 == 4 * (n2 - n1) and n2 > n1


def test_ssa_input_checks():
    with pytest.raises(ValueError, match="divisible"):
        SpikingSelfAttention(10, 4)


def test_ssa_product_orders_agree():
    a = _randomise_bn(SpikingSelfAttention(16, 2))
    b = SpikingSelfAttention(16, 2, kv_first=False).eval()
    b.load_state_dict(a.state_dict())
    x = _spikes(2, 2, 16, 4, 4, p=0.5)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))  # integer-valued products: exact in both orders
