"""QKTA, QKCA and SSA: semantics, the legacy proj_lif switch, and linear memory in N."""
import pytest
import torch

from qkformer.attention import QKChannelAttention, QKTokenAttention, SpikingSelfAttention
from qkformer.neuron import lif_multistep


def _spikes(*shape, p=0.3, seed=None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


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


def _lif64(x, v_threshold, tau=2.0):
    """Float64 LIF over the leading (time) axis with a hard reset to 0: the oracle."""
    v, out = torch.zeros_like(x[0]), torch.empty_like(x)
    for t in range(x.shape[0]):
        h = v + (x[t] - v) / tau
        out[t] = (h >= v_threshold).to(x.dtype)
        v = h * (1 - out[t])
    return out


def _routing(module, names, C, seed=0):
    """Each ``<name>`` projection made a fixed channel permutation of its spiking input (weight 3P,
    BN the identity: the LIF's first charge is 1.5 >= 1 for a 1, 0 for a 0), so the branch outputs
    are known exactly and the attention core can be checked on its own through the whole forward.
    Returns the permutation of each branch ("proj" gets the identity)."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for name in names:
        perm = torch.arange(C) if name == "proj" else torch.randperm(C, generator=g)
        w = torch.zeros(C, C)
        w[torch.arange(C), perm] = 3.0
        conv, bn = getattr(module, f"{name}_conv"), getattr(module, f"{name}_bn")
        conv.weight.data.copy_(w[..., None])
        if conv.bias is not None:
            conv.bias.data.zero_()
        bn.reset_parameters()
        bn.reset_running_stats()
        perms[name] = perm
    return perms


def _forward(module, x, fast):
    """``module`` on ``[T, B, C, H, W]``, through the reference layout or the fused token-major
    path."""
    module.token_major = fast
    with torch.no_grad():
        if fast:
            return module(x.permute(0, 1, 3, 4, 2).contiguous()).permute(0, 1, 4, 2, 3)
        return module(x)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("cls", [QKTokenAttention, QKChannelAttention])
def test_qk_attention_equals_closed_form(cls, fast):
    T, B, C, h, H, W = 3, 2, 16, 4, 3, 5
    attn = cls(C, num_heads=h).eval()
    perms = _routing(attn, ("q", "k", "proj"), C)
    x = _spikes(T, B, C, H, W, p=0.15, seed=1)
    x64 = x.double().flatten(3)  # [T, B, C, N]
    q, k = x64[:, :, perms["q"]], x64[:, :, perms["k"]]
    qh = q.reshape(T, B, h, C // h, H * W)
    if cls is QKTokenAttention:  # per head: Q summed over the head's channels, one gate per token
        counts = qh.sum(3, keepdim=True)
    else:  # per channel: Q summed over the tokens, one gate per channel
        counts = qh.sum(4, keepdim=True)
    mask = _lif64(counts, 0.5)
    expected = (mask.expand_as(qh).reshape(T, B, C, H * W) * k).reshape(T, B, C, H, W)
    # the case must tell the gates apart: some closed, some open, and K not all-zero under them
    assert 0 < mask.mean() < 1 and expected.sum() > 0
    assert torch.equal(_forward(attn, x, fast).double(), expected)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("kv_first", [True, False], ids=["q(kTv)", "(qkT)v"])
def test_ssa_scale_and_product_order(kv_first, fast):
    """Per head LIF_0.5(0.125 * Q Kᵀ V), with 0.125 for every head width (docs/original.md Q3):
    d = 4 here, where 1/sqrt(d) would be 0.5."""
    T, B, C, h, H, W = 4, 2, 16, 4, 3, 3
    attn = SpikingSelfAttention(C, h, legacy_proj_lif=False, kv_first=kv_first).eval()
    perms = _routing(attn, ("q", "k", "v", "proj"), C)
    x = _spikes(T, B, C, H, W, p=0.3, seed=2)
    x64 = x.double().flatten(3)

    def heads(name):  # [T, B, C, N] -> [T, B, h, N, d]
        return x64[:, :, perms[name]].reshape(T, B, h, C // h, H * W).transpose(3, 4)

    scores = heads("q") @ heads("k").transpose(3, 4) @ heads("v") * 0.125
    expected = _lif64(scores.transpose(3, 4).reshape(T, B, C, H * W), 0.5).reshape(x.shape)
    assert 0 < expected.mean() < 1
    assert torch.equal(_forward(attn, x, fast).double(), expected)


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
