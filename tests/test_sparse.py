"""Spike-driven products (qkformer.sparse) against the dense ones, in float64.

The sparse forward and weight gradient sum the same terms as the dense convolution in another
order: they must agree to rounding for projections and 3x3 maps of any size (borders, channel
counts that are not multiples of the vector width), for spikes and for counts, and the CSR
built from the packed storage must equal the one built from the values.
"""
import pytest
import torch
import torch.nn.functional as F

from qkformer import cpu, fused, sparse

pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

CASES = [  # input shape, kernel size (0: projection over tokens), stride, output channels
    ((3, 70, 20), 0, 1, 48),
    ((2, 37, 16), 0, 1, 129),
    ((2, 5, 7, 12), 3, 1, 20),
    ((2, 9, 4, 32), 3, 1, 17),
    ((1, 8, 8, 16), 3, 1, 160),
    ((2, 6, 6, 12), 1, 1, 33),
    ((2, 6, 6, 12), 1, 2, 33),
]


def _input(shape, kind, density=0.3):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) < density).double()
    if kind == fused.COUNTS:
        x = x * torch.randint(1, 5, shape, generator=g).double()
    return x


def _dense(x, w, b, k, s):
    if k == 0:
        return x @ w.reshape(w.shape[0], -1).t() + (b if b is not None else 0)
    return F.conv2d(x.permute(0, 3, 1, 2), w, b, s, k // 2).permute(0, 2, 3, 1)


@pytest.mark.parametrize("kind", [fused.SPIKES, fused.COUNTS], ids=["spikes", "counts"])
@pytest.mark.parametrize("shape,k,s,co", CASES)
def test_forward_and_weight_grad_equal_dense(shape, k, s, co, kind):
    x = _input(shape, kind)
    w = torch.randn(co, shape[-1], *((k, k) if k else (1,)), dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(co, dtype=torch.float64)
    csr = sparse.csr_from_dense(x, 1.0)
    assert csr is not None and csr.density == pytest.approx((x != 0).double().mean().item())
    y = sparse.forward(csr, x.shape, w.detach(), b, k, s)
    ref = _dense(x, w, b, k, s)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    if not sparse.weight_grad_supported(k, s):
        with pytest.raises(ValueError, match="no sparse weight gradient"):
            sparse.weight_grad(csr, x.shape, ref.detach(), w.detach(), k, s)
        return
    gy = torch.randn_like(ref)
    ref.backward(gy)
    gw = sparse.weight_grad(csr, x.shape, gy, w.detach(), k, s)
    torch.testing.assert_close(gw, w.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", [fused.SPIKES, fused.COUNTS], ids=["bits", "bytes"])
@pytest.mark.parametrize("channels", [16, 48, 20])  # rows on whole bytes, and not
def test_csr_from_packed_equals_csr_from_values(kind, channels):
    x = _input((3, 11, channels), kind).float()
    stored, how = fused.pack(x, kind)
    assert how is not None
    a, b = sparse.csr_from_dense(x, 1.0), sparse.csr_from_packed(stored, how, 1.0)
    nnz = int(a.rowptr[-1])
    assert torch.equal(a.rowptr, b.rowptr)
    assert torch.equal(a.idx[:nnz], b.idx[:nnz]) and torch.equal(a.val[:nnz], b.val[:nnz])


def test_dense_inputs_are_left_to_the_dense_product():
    x = _input((4, 64, 32), fused.SPIKES, density=0.6)
    assert sparse.csr_from_dense(x, 0.5) is None
    assert sparse.csr_from_dense(x, 0.7) is not None
    stored, how = fused.pack(x.float(), fused.SPIKES)
    assert sparse.csr_from_packed(stored, how, 0.5) is None


def test_special_values_reach_the_output():
    # a NaN or inf input is a non-zero like any other: it propagates as in the dense product
    x = torch.zeros(2, 5, 16, dtype=torch.float64)
    x[0, 1, 3], x[1, 2, 5] = float("nan"), float("inf")
    w = torch.rand(8, 16, 1, dtype=torch.float64) + 0.1
    y = sparse.forward(sparse.csr_from_dense(x, 1.0), x.shape, w, None, 0, 1)
    assert torch.isnan(y[0, 1]).all() and torch.isinf(y[1, 2]).all()
    assert torch.isfinite(y[0, 0]).all() and (y[0, 0] == 0).all()


def test_units_use_the_sparse_products_on_sparse_inputs(monkeypatch):
    """A fused unit with a sparse spike input goes through the sparse forward and weight
    gradient, and its results equal the dense path (kernels' density limit 0) in float64."""
    from conftest import count_calls
    from qkformer.neuron import MultiStepLIF

    calls = count_calls(monkeypatch, sparse, ("forward", "weight_grad"))

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, 1, 1, bias=False).double()
    bn, lif = torch.nn.BatchNorm2d(48).double(), MultiStepLIF()
    x = (torch.rand(4, 8, 8, 32, dtype=torch.float64) < 0.15).double()
    results = []
    for limit in (0.33, 0.0):
        monkeypatch.setattr(sparse, "_limits", (limit, min(limit, 0.25)))
        xi = x.clone().requires_grad_()
        out = fused.spiking_unit(xi, conv.weight, None, bn, lif, kernel_size=3, steps=2,
                                 x_kind=fused.SPIKES)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), conv.weight.grad.clone(), xi.grad))
        conv.weight.grad = None
    assert calls["forward"] == 1 and calls["weight_grad"] == 1  # the first run only
    (o1, w1, x1), (o2, w2, x2) = results
    assert torch.equal(o1, o2)
    torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x1, x2, rtol=1e-12, atol=1e-12)
