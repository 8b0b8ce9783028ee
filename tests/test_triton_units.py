"""The fast path's Triton route (the CUDA fast path), checked without a GPU.

Where CUDA and Triton are present these tests run the kernels natively. Elsewhere
:func:`test_triton_route_through_the_interpreter` runs them in a child pytest through Triton's
interpreter (``TRITON_INTERPRET=1``: CPU tensors; ``QKFORMER_CPU_KERNELS=0`` so that CPU tensors
take the Triton route), together with the fast-path tests that hold the whole model to the
reference path in float64, records every kernel variant launched, and compiles each of them for
an H100/H200 (sm_90) with Triton's compiler and ptxas.

What the interpreter does not show: speed, FMA contraction (it rounds every operation as numpy
does), races between programs, and register or shared-memory limits (the sm_90 compile covers
the last, not the others).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkformer import fused, triton_units
from conftest import saved_bytes

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = triton_units.interpreting()
NATIVE = torch.cuda.is_available() and triton_units.is_available() and not INTERPRETED
DEVICE = "cuda" if NATIVE else "cpu"
on_route = pytest.mark.skipif(not (INTERPRETED or NATIVE),
                              reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (see "
                                     "test_triton_route_through_the_interpreter)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LIF = dict(tau=2.0, v_threshold=1.0)


def _routes(fn):
    """fn() on the Triton route and on the torch route."""
    out = []
    for name in ("triton", "torch"):
        with fused.forced_route(name):
            out.append(fn())
    return out


# ------------------------------------------------------------------------------------------
@on_route
def test_the_fast_path_takes_the_triton_route():
    t = torch.zeros(1, device=DEVICE)
    assert fused.route(t) == "triton"
    assert triton_units.describe(DEVICE).startswith("triton units: on")
    before = sum(triton_units.launch_counts().values())
    fused.bn_lif_forward(torch.ones(4, 3, device=DEVICE), 2, None, None, **LIF)
    assert sum(triton_units.launch_counts().values()) == before + 1


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_check_passes(dtype):
    assert fused._triton_self_check(torch.device(DEVICE), dtype) is None


GEOMETRIES = {"plain": (False, False), "repeated input": (False, True), "pooled": (True, False),
              "pooled, repeated input": (True, True)}


def _problem(pool, bcast, C=70, T=4, dtype=torch.float32, seed=0):
    """Random conv outputs (C crosses a 64-channel tile), a BatchNorm affine, a gradient."""
    g = torch.Generator().manual_seed(seed)
    n = 1 if bcast else T
    shape = (n * 2, 7, 5, C) if pool else (n * 3, 11, C)
    y = (torch.randn(shape, generator=g) * 1.5 + 0.6).to(dtype).to(DEVICE)
    A = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(C, generator=g) + 0.5).to(A).to(DEVICE)
    shift = (torch.randn(C, generator=g) * 0.2).to(A).to(DEVICE)
    return y, scale, shift, T, g


@on_route
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_lif_passes_without_batchnorm_are_bit_equal(geometry):
    """Without the affine the arithmetic order is the torch route's: identical spikes, and
    g_Z equal up to the surrogate's exp (numpy's against torch's)."""
    pool, bcast = GEOMETRIES[geometry]
    y, _, _, T, g = _problem(pool, bcast)
    s_tr, s_to = _routes(lambda: fused.bn_lif_forward(y, T, None, None, **LIF, pool=pool,
                                                      bcast=bcast))
    assert torch.equal(s_tr, s_to) and 0.05 < s_to.float().mean() < 0.95
    grad = torch.randn(s_to.shape, generator=g).to(DEVICE)
    (gz_tr, _), (gz_to, _) = _routes(lambda: fused.bn_lif_backward(
        grad, y, T, None, None, **LIF, alpha=4.0, detach_reset=True, pool=pool, bcast=bcast))
    torch.testing.assert_close(gz_tr, gz_to, rtol=1e-5, atol=1e-6)


@on_route
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unit_passes_match_the_torch_route(geometry, dtype):
    """BatchNorm + [pool] + LIF, statistics, the BatchNorm sums and the unit's input gradient
    against the torch route on random data: within float32 rounding (the affine may round
    differently where the torch route fuses a multiply-add)."""
    pool, bcast = GEOMETRIES[geometry]
    y, scale, shift, T, g = _problem(pool, bcast, dtype=dtype)
    s_tr, s_to = _routes(lambda: fused.bn_lif_forward(y, T, scale, shift, **LIF, pool=pool,
                                                      bcast=bcast))
    flips = (s_tr != s_to).float().mean().item()
    assert flips <= 1e-3, f"{flips:.2%} of the spikes differ"
    grad = torch.randn(s_to.shape, generator=g).to(dtype).to(DEVICE)
    (gz_tr, sums_tr), (gz_to, sums_to) = _routes(lambda: fused.bn_lif_backward(
        grad, y, T, scale, shift, **LIF, alpha=4.0, detach_reset=False, pool=pool, bcast=bcast,
        sums=True))
    close = torch.isclose(gz_tr, gz_to, rtol=1e-4, atol=1e-5).float().mean().item()
    assert close >= 0.999, f"g_Z: {1 - close:.2%} differ"
    torch.testing.assert_close(sums_tr, sums_to, rtol=1e-3, atol=1e-3 * sums_to.abs().max())
    C = y.shape[-1]
    st_tr, st_to = _routes(lambda: triton_units.colstats_coefficients(
        y.reshape(-1, C).contiguous(), True, None, None, None, None, 1e-5)[:2]
        if fused.route(y) == "triton" else fused.batch_stats(y))
    # (the torch route sums in float32: its rounding, not ours, sets the tolerance)
    torch.testing.assert_close(torch.stack(st_tr), torch.stack(st_to), rtol=1e-5, atol=1e-7)
    mean, var = st_to
    invstd = (var + 1e-5).rsqrt()
    gamma = torch.rand(C, generator=g).to(DEVICE) + 0.5
    beta = torch.randn(C, generator=g).to(DEVICE)
    args = (grad, y, mean, invstd, gamma, beta, T, pool, bcast, True, True, 2.0, 1.0, 4.0, True,
            [True] * 5)
    with fused.forced_route("triton"):
        gy_tr, gg_tr, gb_tr = fused._unit_input_grad_triton(*args)
    with fused.forced_route("torch"):
        gy_to, gg_to, gb_to = fused._unit_input_grad(*args)
    rtol = 1e-3 if dtype == torch.float32 else 2e-2
    scale_ = gy_to.float().abs().max()
    close = torch.isclose(gy_tr.float(), gy_to.float(), rtol=rtol, atol=rtol * scale_)
    assert close.float().mean() >= 0.999
    torch.testing.assert_close(gg_tr, gg_to, rtol=1e-3, atol=1e-3 * gg_to.abs().max())
    torch.testing.assert_close(gb_tr, gb_to, rtol=1e-3, atol=1e-3 * gb_to.abs().max())


@on_route
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("heads,C", [(2, 16), (3, 30), (1, 70)])
def test_token_attention_matches_the_torch_route(dtype, heads, C):
    """QKTA in one kernel each way: the forward, the Q sums and g_K bit-equal (sums of spikes
    and products with 0/1 are exact), g_Q within the rounding of sum(g K)."""
    g = torch.Generator().manual_seed(C)
    T, B, N = 4, 2, 9
    # sparse Q: small sums, where the surrogate's slope is not 0
    density = torch.tensor([0.04] * C + [0.3] * C)
    qk = (torch.rand(T, B, N, 2 * C, generator=g) < density).to(dtype).to(DEVICE)
    lif = dict(tau=2.0, v_threshold=0.5, alpha=4.0, detach_reset=True)
    (out_tr, qs_tr), (out_to, qs_to) = _routes(lambda: fused._qk_attention(qk, heads, False,
                                                                            **lif))
    assert torch.equal(out_tr, out_to) and torch.equal(qs_tr, qs_to)
    assert 0 < out_to.float().mean() < 0.4  # (k fires at 0.3)
    g_out = torch.randn(T, B, N, C, generator=g).to(dtype).to(DEVICE)
    k = qk[..., C:].contiguous()
    gr_tr, gr_to = _routes(lambda: fused._qk_attention_backward(g_out, k, qs_to, heads, False,
                                                                **lif))
    assert torch.equal(gr_tr[..., C:], gr_to[..., C:])
    rtol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(gr_tr[..., :C], gr_to[..., :C], rtol=rtol, atol=rtol)
    assert gr_to[..., :C].abs().max() > 0


@on_route
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("bn_mode,bcast", [("running", False), (None, False),
                                            ("running", True), ("batch", False)],
                         ids=["bn", "no_bn", "bn_repeated", "bn_batch_statistics"])
def test_the_input_gradient_pass_sums_the_bias_gradient(dtype, bn_mode, bcast):
    """The convolution's bias gradient (the column sums of the input gradient) comes from the
    pass that writes the input gradient, whichever of its programs finishes last (summed in
    program order): within rounding of the torch route's sum, and no separate launch. (Under
    batch statistics it is zero but for rounding: there only the size of that is checked.)"""
    from qkformer.neuron import MultiStepLIF

    g = torch.Generator().manual_seed(3 + 2 * bcast)
    T, C, cin = 2, 24, 7  # (the interpreter splits the rows over two programs)
    x = (torch.randn(3, 65, cin, generator=g) if bcast
         else torch.randn(T * 3, 65, cin, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(C, cin, generator=g) / 2).to(dtype).to(DEVICE)
    lif = MultiStepLIF(v_threshold=0.5)
    grads = []
    for r in ("triton", "torch"):
        bias = torch.zeros(C, dtype=dtype, device=DEVICE, requires_grad=True)
        bn = torch.nn.BatchNorm1d(C).to(dtype).to(DEVICE) if bn_mode else None
        if bn_mode == "running":
            bn.eval()
            bn.running_var.fill_(0.5)
        with fused.forced_route(r):
            out = fused.spiking_unit(x, w, bias, bn, lif, steps=T, bcast=bcast)
            before = triton_units.launch_counts().get("bn_lif_bwd_kernel", 0)
            out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(out))
        if r == "triton":  # one pass without BatchNorm, two with
            assert (triton_units.launch_counts()["bn_lif_bwd_kernel"]
                    == before + 1 + (bn_mode is not None))
        grads.append(bias.grad)
    rtol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    if bn_mode == "batch":
        assert max(grads[0].abs().max(), grads[1].abs().max()) < 1e3 * rtol
        return
    scale = grads[1].abs().max()
    assert scale > 0.1
    torch.testing.assert_close(grads[0], grads[1], rtol=rtol, atol=rtol * scale * 4)


@on_route
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("stacked,pool", [(3, False), (1, False), (1, True)],
                         ids=["qkv", "single", "pooled"])
def test_the_statistics_kernels_update_the_running_statistics(stacked, pool, grad):
    """Eagerly, on the Triton route, the kernel that computes a unit's batch statistics also
    updates its BatchNorms' running statistics and batch counters (three side by side for a
    stacked projection): no update launch, the buffers as nn.BatchNorm's update leaves them."""
    from qkformer.neuron import MultiStepLIF

    g = torch.Generator().manual_seed(stacked + 2 * pool)
    T, C, cin = 2, 8, 5
    lif = MultiStepLIF()
    x = (torch.randn(T * 2, 6, 6, cin, generator=g) if pool
         else torch.randn(T * 3, 7, cin, generator=g)).to(DEVICE).requires_grad_(grad)
    w = (torch.randn(C * stacked, cin, 3, 3, generator=g) if pool
         else torch.randn(C * stacked, cin, generator=g)).to(DEVICE)
    made = []
    for r in ("triton", "torch"):
        bns = [(torch.nn.BatchNorm2d if pool else torch.nn.BatchNorm1d)(C).to(DEVICE)
               for _ in range(stacked)]
        for i, bn in enumerate(bns):
            bn.running_mean.fill_(0.25 * i)
            bn.num_batches_tracked.fill_(i)
        before = triton_units.launch_counts().get("running_update_kernel", 0)
        with fused.forced_route(r):
            for _ in range(2):
                fused.spiking_unit(x, w, None, bns if stacked > 1 else bns[0], lif,
                                   kernel_size=3 if pool else 0, pool=pool, steps=T)
        if r == "triton":
            assert triton_units.launch_counts().get("running_update_kernel", 0) == before
        made.append(bns)
    for ours, theirs in zip(*made):
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
        # within float32 rounding of the batch statistics (summed in different orders)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
        assert ours.running_var.sub(1).abs().max() > 0.05  # moved away from its initial 1


@on_route
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("heads,C,N", [(2, 16, 9), (1, 48, 49), (3, 30, 20), (1, 40, 70)])
def test_self_attention_matches_the_torch_route(dtype, heads, C, N):
    """SSA in one kernel each way, on the token-major layout: the spikes bit-equal (the scores
    are integer sums, exact in any order), the gradients within the rounding of the summation
    order; no head-major copy is made."""
    g = torch.Generator().manual_seed(C + N)
    T, B = 4, 2
    density = (8 / (C // heads * N)) ** (1 / 3)  # scores of about 1: some fire, some not
    qkv = (torch.rand(T, B, N, 3 * C, generator=g) < density).to(dtype).to(DEVICE)
    lif = dict(tau=2.0, v_threshold=0.5, alpha=4.0, detach_reset=True)
    before = triton_units.launch_counts().get("ssa_fwd_kernel", 0)
    out_tr, out_to = _routes(lambda: fused._ssa_attention(qkv, heads, 0.125, **lif))
    assert triton_units.launch_counts()["ssa_fwd_kernel"] == before + 1
    assert torch.equal(out_tr, out_to)
    assert 0.05 < out_to.float().mean() < 0.95
    g_out = torch.randn(T, B, N, C, generator=g).to(dtype).to(DEVICE)
    gr_tr, gr_to = _routes(lambda: fused._ssa_attention_backward(g_out, qkv, heads, 0.125,
                                                                 **lif))
    rtol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 1e-2)
    scale = gr_to.abs().max()
    assert scale > 0
    torch.testing.assert_close(gr_tr, gr_to, rtol=rtol, atol=rtol * scale)


@on_route
def test_self_attention_blocks():
    """A head's channels in one tile, its tokens in blocks (smaller backward); heads wider
    than 128 channels, and more than 2048 tokens, take the torch route."""
    assert triton_units.ssa_blocks(49, 48) == (64, 64)
    assert triton_units.ssa_blocks(196, 48, "backward") == (32, 64)
    assert triton_units.ssa_blocks(9, 8) == (16, 16)
    assert triton_units.ssa_blocks(9, 129) is None
    assert triton_units.ssa_blocks(2049, 8) is None  # kᵀ v past what TF32 holds exactly
    qkv = torch.zeros(1, 1, 4, 3 * 129, device=DEVICE)
    with fused.forced_route("triton"):
        assert not fused._ssa_on_triton(qkv, 1)
        assert fused._ssa_on_triton(qkv[..., :3 * 128], 1)


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 2051])
def test_packing_round_trips(dtype, n):
    g = torch.Generator().manual_seed(n)
    spikes = (torch.rand(n, generator=g) < 0.3).to(dtype).to(DEVICE)
    counts = torch.randint(0, 256, (n,), generator=g).to(dtype).to(DEVICE)
    with fused.forced_route("triton"):
        for x, kind, nbytes in ((spikes, fused.SPIKES, (n + 7) // 8), (counts, fused.COUNTS, n)):
            stored, how = fused._kept(*fused.pack(x, kind))
            assert stored.dtype == torch.uint8 and stored.numel() == nbytes
            assert torch.equal(fused.unpack(stored, how), x)


@on_route
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
@pytest.mark.parametrize("kind", ["spikes", "counts"])
def test_a_value_that_does_not_fit_keeps_the_original(bad, kind):
    x = torch.zeros(37, device=DEVICE)
    x[5] = 1.0
    if kind == "counts":
        bad = 256.0 if bad == 2.0 else bad
    x[20] = bad
    with fused.forced_route("triton"):
        stored, how = fused.pack(x, fused.SPIKES if kind == "spikes" else fused.COUNTS)
        assert how is not None and len(how) == 4  # packed, check pending on the device
        kept, kept_how = fused._kept(stored, how)
        assert kept_how is None and kept is x  # the original itself
        assert fused.unpack(stored, how) is x
    good = torch.ones(9, device=DEVICE)
    with fused.forced_route("triton"):
        stored, how = fused.pack(good, fused.SPIKES)
        if NATIVE:
            torch.cuda.synchronize()
        kept, kept_how = fused._kept(stored, how)
    assert kept_how is not None and kept.dtype == torch.uint8 and how[3].original is None


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C, bcast", [(8, False), (72, False), (16, True)])
def test_the_spiking_pass_writes_its_spikes_as_bits(dtype, C, bcast):
    """The bits the spiking pass writes beside its spikes are those spikes packed (C crossing
    a 64-channel tile, rows not a whole tile, a repeated input), and the spikes are unchanged."""
    y, scale, shift, T, _ = _problem(False, bcast, C=C, dtype=dtype)
    g, shape = fused._geometry(y, T, False, bcast)
    with fused.forced_route("triton"):
        plain = fused.bn_lif_forward(y, T, scale, shift, **LIF, bcast=bcast)
        s = torch.empty(shape, dtype=dtype, device=DEVICE)
        bits = torch.empty(s.numel() // 8, dtype=torch.uint8, device=DEVICE)
        triton_units.bn_lif_forward(y, s, T, g, scale, shift, LIF["tau"], LIF["v_threshold"],
                                    False, bcast, bits)
        packed = triton_units.pack(s, "bits").data
    assert torch.equal(s, plain) and 0 < s.mean() < 1
    assert torch.equal(bits, packed)
    with pytest.raises(ValueError, match="cannot hold"):
        triton_units.bn_lif_forward(y, s, T, g, scale, shift, LIF["tau"], LIF["v_threshold"],
                                    False, bcast, bits[1:])


@on_route
def test_a_unit_keeps_the_bits_its_producer_wrote():
    """A unit whose input is another unit's spikes keeps the bits written with them (no packing
    launch, nothing to check); a changed or partial tensor is packed as before."""
    from qkformer.neuron import MultiStepLIF

    g = torch.Generator().manual_seed(3)
    T, C = 2, 16
    x = torch.randn(T, 5, 8, generator=g).to(DEVICE)
    lif = MultiStepLIF(tau=2.0, detach_reset=True)
    bn = torch.nn.BatchNorm1d(C).to(DEVICE)
    with fused.forced_route("triton"):
        s = fused.spiking_unit(x, torch.randn(C, 8, generator=g).to(DEVICE), None, bn, lif,
                               steps=T)
        entry = fused._produced.find(s.reshape(T, -1), fused.SPIKES)
        assert entry is not None
        before = dict(triton_units.launch_counts())
        stored, how = fused.pack(s.reshape(T, 5, C), fused.SPIKES)
        assert stored is entry and how == ("bits", torch.Size([T, 5, C]), s.dtype)
        assert triton_units.launch_counts() == before  # nothing launched
        assert torch.equal(fused.unpack(stored, how), s.reshape(T, 5, C))
        assert fused._produced.find(s[:1], fused.SPIKES) is None  # a part
        assert fused._produced.find(s.transpose(-1, -2), fused.SPIKES) is None  # not contiguous
        s.add_(0)  # changed in place (the version counts it)
        assert fused._produced.find(s, fused.SPIKES) is None
        stored, how = fused.pack(s, fused.SPIKES)
        assert stored is not entry and len(how) == 4  # packed again, checked on the device
    with fused.compact_storage(False), fused.forced_route("triton"):
        t = fused.spiking_unit(x, torch.randn(C, 8, generator=g).to(DEVICE), None, bn, lif,
                               steps=T)
    assert fused._produced.find(t, fused.SPIKES) is None  # compact storage off: no bits written
    del s
    assert all(ref() is not None for ref, *_ in fused._produced._by_ptr.values())


@on_route
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_unit_keeps_the_bytes_of_a_residual_sum(dtype):
    """A residual sum of counts is written with its bytes in one launch, which the unit that
    takes it keeps (no packing launch); a sum that does not fit a byte is kept exactly."""
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 4, (2, 9, 16), generator=g).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randint(0, 2, (2, 9, 16), generator=g).to(dtype).to(DEVICE)
    with fused.forced_route("triton"):
        before = dict(triton_units.launch_counts())
        s = fused.add_counts(a, b)
        assert torch.equal(s, a + b)
        stored, how = fused.pack(s, fused.COUNTS)
        after = triton_units.launch_counts()
        assert after["add_u8_kernel"] == before.get("add_u8_kernel", 0) + 1
        assert after.get("to_u8_kernel", 0) == before.get("to_u8_kernel", 0)
        assert how[0] == "u8" and torch.equal(fused.unpack(*fused._kept(stored, how)), s)
        bad = b.clone()
        bad[1, 2, 3] = 0.5
        s_bad = fused.add_counts(a, bad)
        kept = fused.unpack(*fused._kept(*fused.pack(s_bad, fused.COUNTS)))
        assert torch.equal(kept, s_bad)  # the original, not its bytes
        s.backward(torch.ones_like(s) * 2)
    assert torch.equal(a.grad, torch.full_like(a, 2))
    with torch.no_grad(), fused.forced_route("triton"):  # nothing to keep: a plain sum
        before = triton_units.launch_counts().get("add_u8_kernel", 0)
        fused.add_counts(a, b)
        assert triton_units.launch_counts().get("add_u8_kernel", 0) == before


@on_route
def test_the_unit_op_with_bits_passes_torch_library_checks():
    torch.manual_seed(0)
    x = torch.randint(0, 2, (2, 3, 4, 8)).double().to(DEVICE).requires_grad_()
    w = torch.randn(16, 8, 1, dtype=torch.float64, device=DEVICE, requires_grad=True)
    gamma = torch.rand(16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    beta = torch.randn(16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = (x, w, None, gamma, beta, None, None, 0, 1, False, 2, False, True, True, 1e-5, 2.0,
            0.5, 4.0, True, fused.SPIKES, None, True)
    with fused.forced_route("triton"):
        torch.library.opcheck(torch.ops.qkformer.spiking_unit.default, args)
        bits = torch.ops.qkformer.spiking_unit.default(*args)[-1]
    assert bits.dtype == torch.uint8 and bits.numel() == 2 * 3 * 4 * 16 // 8


@on_route
def test_the_triton_route_runs_inside_a_compiled_graph():
    """torch.compile (full graph) of the fast path on the Triton route: the unit ops are called
    as they are, BatchNorm's update included; logits, gradients and buffers equal eager's."""
    import copy
    import timm

    import qkformer  # noqa: F401

    torch._dynamo.reset()
    torch.manual_seed(0)
    fast = timm.create_model("qkformer_10_384", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                             img_size=32, T=2, num_classes=5).double().to(DEVICE).train()
    eager = copy.deepcopy(fast)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True, dynamic=False)
    before = dict(triton_units.launch_counts())
    outs = []
    kept = saved_bytes(lambda: outs.append(compiled(x)))
    out = outs[0]
    (out ** 2).sum().backward()
    launched = {k: v - before.get(k, 0) for k, v in triton_units.launch_counts().items()}
    assert launched.get("bn_lif_fwd_kernel") and launched.get("to_bits_kernel")
    kept_eagerly = saved_bytes(lambda: outs.append(eager(x)))
    ref = outs[1]
    (ref ** 2).sum().backward()
    with fused.compact_storage(False):
        kept_plainly = saved_bytes(lambda: copy.deepcopy(eager)(x))
    # compact storage holds under compile: inputs packed by a packing pass (the eager route
    # keeps the bits the spiking pass wrote instead, which a traced graph cannot look up)
    assert abs(kept - kept_eagerly) <= 0.01 * kept_eagerly and kept < 0.8 * kept_plainly
    assert torch.equal(out, ref)
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(fast.named_buffers(), eager.buffers()):
        assert torch.equal(a, b), name
    assert any(n.endswith("num_batches_tracked") and int(b) == 1 for n, b in fast.named_buffers())


GEMM_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
            torch.bfloat16: 1e-2}


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_a_gemm_with_statistics_feeds_the_spiking_pass(dtype, bias):
    """linear_stats: the projection (float64 reference, within the dtype's rounding) and, from
    its epilogue, BatchNorm's partial sums, which the spiking pass takes in place of a
    statistics pass: the same spikes and statistics as that pass gives (sizes off the tiles)."""
    g = torch.Generator().manual_seed(3)
    T, M, K, N = 2, 75, 40, 24
    x = torch.randint(0, 2, (T * M, K), generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(N, K, generator=g) / 3).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    ref = torch.randn(N, generator=g).to(dtype).to(DEVICE)
    y, part = triton_units.linear_stats(x, w, b, ref)
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    tol = GEMM_TOL[dtype] * exact.abs().max().item()
    assert y.dtype == dtype and (y.double() - exact).abs().max().item() <= tol
    d = y.double() - ref.double()
    torch.testing.assert_close(part.sum(0), torch.stack([d.sum(0), (d * d).sum(0)]),
                               rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-9)
    geometry, shape = fused._geometry(y.view(T, M, N), T, False, False)
    outs = []
    for stats in ((part, ref), None):
        s = torch.empty(shape, dtype=dtype, device=DEVICE)
        stat = triton_units.bn_lif_forward_bn(y.view(T, M, N), s, T, geometry, True, None, None,
                                              None, None, 1e-5, **LIF, bcast=False, stats=stats)
        outs.append((s, stat))
    (s1, st1), (s2, st2) = outs
    assert torch.equal(s1, s2) and 0 < s1.float().mean() < 1
    for a, c in zip(st1, st2):
        # (float32 sums over other tiles about another reference: float32 rounding apart)
        torch.testing.assert_close(a, c, rtol=1e-12 if dtype == torch.float64 else 3e-5,
                                   atol=1e-12)


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [50, 700], ids=["one split", "split rows"])
@pytest.mark.parametrize("fmt", ["bits", "u8"])
def test_a_weight_gradient_reads_the_input_as_stored(dtype, M, fmt):
    """weight_grad_packed: gᵀ X from X as compact storage keeps it (spikes as bits, counts as
    bytes), equal to the product with X unpacked (within rounding of the summation order)."""
    g = torch.Generator().manual_seed(4)
    K, N = 24, 20
    x = torch.randint(0, 2 if fmt == "bits" else 5, (M, K), generator=g).to(dtype).to(DEVICE)
    grad = torch.randn(M, N, generator=g).to(dtype).to(DEVICE)
    data = triton_units.pack(x, fmt).data
    gw = triton_units.weight_grad_packed(grad, data, fmt, K)
    exact = grad.double().t() @ x.double()
    assert gw.shape == (N, K) and gw.dtype == dtype
    assert (gw.double() - exact).abs().max().item() <= GEMM_TOL[dtype] * exact.abs().max().item()
    with pytest.raises(ValueError, match=f"the {fmt} of M K values"):
        triton_units.weight_grad_packed(grad, data[:-1], fmt, K)


@on_route
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_self_check_covers_the_fused_gemms_when_they_are_on(dtype, monkeypatch):
    monkeypatch.setenv("QKFORMER_TRITON_GEMMS", "1")
    device = torch.device(DEVICE)
    assert fused._triton_self_check(device, dtype) is None
    linear_stats = triton_units.linear_stats
    monkeypatch.setattr(triton_units, "linear_stats",
                        lambda *a: (lambda y, p: (y, p * 1.5))(*linear_stats(*a)))
    assert "statistics from the GEMM's epilogue" in fused._triton_self_check(device, dtype)


@on_route
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_units_on_the_fused_gemms_train_as_on_cublas(dtype, monkeypatch):
    """QKFORMER_TRITON_GEMMS=1: the 1x1 projections with BatchNorm take their statistics from
    the GEMM's epilogue and their weight gradients from the kept bits and bytes; a training
    step (logits, gradients, BatchNorm buffers) equals the one on torch's GEMMs within the
    rounding of the summation order (float64: 1e-10)."""
    import copy
    import timm

    import qkformer  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("qkformer_10_384", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              img_size=32, T=2, num_classes=5).to(dtype).to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, dtype=dtype, device=DEVICE)
    assert fused._triton_serves(torch.device(DEVICE), dtype)  # its self-check's launches before
    runs = []
    for fused_gemms in ("1", "0"):
        monkeypatch.setenv("QKFORMER_TRITON_GEMMS", fused_gemms)
        net = copy.deepcopy(model)
        before = dict(triton_units.launch_counts())
        out = net(x)
        (out ** 2).sum().backward()
        launched = {k: v - before.get(k, 0) for k, v in triton_units.launch_counts().items()}
        runs.append((out, net, launched))
    (out1, net1, l1), (out2, net2, l2) = runs
    assert l1.get("gemm_kernel", 0) >= 8 and l2.get("gemm_kernel", 0) == 0
    assert l1.get("colstats_kernel", 0) < l2["colstats_kernel"]
    if dtype != torch.float64:  # (float64 unpacks: Triton has no float64 MMA for it)
        assert l1.get("from_bits_kernel", 0) + l1.get("from_u8_kernel", 0) < \
            l2.get("from_bits_kernel", 0) + l2.get("from_u8_kernel", 0)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out1, out2, **tol)
    for (name, a), b in zip(net1.named_parameters(), net2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tol, msg=name)
    for (name, a), b in zip(net1.named_buffers(), net2.buffers()):
        torch.testing.assert_close(a, b, **tol, msg=name)


@on_route
def test_a_graph_traced_first_runs_the_self_check_eagerly(monkeypatch):
    """The first call compiled, before any eager one: the self-check runs while the graph is
    traced, with the eager packing, passes, and the graph takes the Triton route."""
    import warnings

    from qkformer.neuron import MultiStepLIF

    torch._dynamo.reset()
    monkeypatch.setattr(triton_units, "_verdicts", {})
    lif = MultiStepLIF(tau=2.0, v_threshold=1.0, detach_reset=True)
    w = torch.randn(8, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    unit = torch.compile(lambda x: fused.spiking_unit(x, w, None, None, lif, steps=2,
                                                      x_kind=fused.SPIKES),
                         backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randint(0, 2, (2, 3, 8), dtype=torch.float64, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        before = dict(triton_units.launch_counts())
        unit(x).sum().backward()
    assert triton_units._verdicts[(str(torch.device(DEVICE)), torch.float64)] is None
    launched = triton_units.launch_counts()
    assert launched.get("bn_lif_bwd_kernel", 0) > before.get("bn_lif_bwd_kernel", 0)


@on_route
def test_a_compiled_graph_rejects_non_spikes_without_waiting_for_the_host():
    """Inside a compiled graph a value that does not fit its declared kind fails the device-side
    assertion of the packing op (on CPU tensors the assertion is checked at once)."""
    torch._dynamo.reset()
    x = torch.tensor([[0.0, 1.0, 0.5, 1.0] * 4], device=DEVICE).repeat(4, 1)
    with fused.forced_route("triton"):
        data = torch.ops.qkformer.pack_exact(x[:2].round(), fused.SPIKES)
        assert torch.equal(fused.unpack(data, ("bits", x[:2].shape, x.dtype)), x[:2].round())
        if NATIVE:  # a device-side assertion ends the CUDA context: in a child process
            code = ("import torch, qkformer.fused as f\n"
                    "x = torch.tensor([0.0, 1.0, 0.5] * 8, device='cuda')\n"
                    "c = torch.compile(lambda t: torch.ops.qkformer.pack_exact(t, f.SPIKES))\n"
                    "c(x); torch.cuda.synchronize()\n")
            r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
            assert r.returncode != 0 and "assert" in r.stderr.lower(), r.stderr[-2000:]
            return
        packer = torch.compile(lambda t: torch.ops.qkformer.pack_exact(t, fused.SPIKES),
                               backend="aot_eager", fullgraph=True)
        with pytest.raises(RuntimeError, match="declared as spikes holds a value other than 0"):
            packer(x)


def test_cuda_default_follows_the_self_check(monkeypatch):
    """CUDA runs the fast path only where the Triton units pass their self-check for every AMP
    dtype; else the reference path (the original's computation), and the line says why."""
    monkeypatch.delenv("QKFORMER_CUDA_FAST_PATH", raising=False)
    if torch.cuda.is_available():
        pytest.skip("the rule is exercised with a stand-in device here")
    verdicts = {}
    monkeypatch.setattr(triton_units, "serves", lambda device, dtype: True)
    monkeypatch.setattr(triton_units, "verdict",
                        lambda device, dtype, check: verdicts.get(dtype, True))
    assert fused.fast_path_ready("cuda")
    assert "Triton kernels" in fused.describe(type("M", (), {"fast_path": True})(), "cuda")
    verdicts[torch.float16] = False
    assert not fused.fast_path_ready("cuda")
    line = fused.describe(type("M", (), {"fast_path": True})(), "cuda")
    assert line.startswith("path: reference (layer by layer, the original's computation) on cuda")
    monkeypatch.setenv("QKFORMER_CUDA_FAST_PATH", "1")
    assert fused.fast_path_ready("cuda")


# ------------------------------------------------------------------------------------------
CHILD_TESTS = [
    "tests/test_triton_units.py",
    "tests/test_fast_path.py::test_train_step_float64_matches_reference",
    "tests/test_fast_path.py::test_compact_storage_is_bit_identical",
    "tests/test_checkpointing.py::test_checkpointed_steps_are_bit_identical[imagenet-fast-dtype0]",
]


def _compile_for_sm90(variants):
    """Compile each recorded (kernel, signature, constants) for sm_90 (cubin): cubin sizes by
    kernel. The variants are shared out over the CPU's cores (each compile is one core's work
    for a few seconds)."""
    import concurrent.futures
    import multiprocessing

    workers = max(1, min(4, os.cpu_count() or 1, len(variants)))
    chunks = [variants[i::workers] for i in range(workers)]
    sizes = {}
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_compile_chunk, chunks):
            for name, n in part.items():
                sizes[name] = max(sizes.get(name, 0), n)
    return sizes


def _compile_chunk(variants):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qkformer.triton_units import kernels

    types = {"fp32": tl.float32, "fp64": tl.float64, "fp16": tl.float16, "bf16": tl.bfloat16}
    sizes = {}
    for name, sig, consts in variants:
        consts = {k: types.get(v, v) if isinstance(v, str) else v for k, v in consts}
        signature = dict(sig) | {k: "constexpr" for k in consts}
        src = ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        sizes[name] = max(sizes.get(name, 0), len(out.asm["cubin"]))
    return sizes


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or NATIVE, reason="runs the child only from a plain CPU run")
@pytest.mark.skipif(not triton_units.is_available(), reason="triton is not installed")
def test_triton_route_through_the_interpreter(tmp_path):
    record = tmp_path / "variants.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "QKFORMER_CPU_KERNELS": "0",
           "QKFORMER_TRITON_RECORD": str(record)}
    env.pop("QKFORMER_REQUIRE_CPU_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::RuntimeWarning", *CHILD_TESTS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
    variants = [tuple(v) for v in json.loads(record.read_text())]
    kernels = {v[0] for v in variants}
    expected = {"colstats_kernel", "bn_coefficients_kernel", "bn_lif_fwd_kernel",
                "bn_pool_lif_fwd_kernel", "bn_lif_bwd_kernel",
                "pool_lif_bwd_kernel", "pool_scatter_kernel",
                "to_bits_kernel", "from_bits_kernel", "to_u8_kernel", "from_u8_kernel",
                "bn_affine_kernel", "running_update_kernel", "qk_token_fwd_kernel",
                "qk_token_bwd_kernel", "ssa_fwd_kernel", "ssa_bwd_kernel", "ssa_bwd_kv_kernel",
                "add_u8_kernel", "gemm_kernel"}
    assert kernels == expected, expected ^ kernels
    sizes = _compile_for_sm90(variants)
    assert set(sizes) == expected and all(n > 0 for n in sizes.values())
    assert math.isfinite(sum(sizes.values()))
