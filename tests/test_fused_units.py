"""Every geometry of the fused spiking unit (conv -> BN -> [pool] -> LIF) against the modules it
stands for, gradients included, on one and two threads.

The oracle is the reference path's own modules (``nn.Conv2d``, ``nn.BatchNorm2d``,
``nn.MaxPool2d``, :class:`~qkformer.neuron.MultiStepLIF`) in float64 and NCHW. float64 units
must agree to rounding; float32 units to float32 precision, which still catches a wrong
gradient (a library's wrong kernel is off by tens of percent). Small channel counts and strided
1x1 convolutions are here on purpose: they are where oneDNN's AVX2 kernels fail
(tests/test_avx2.py runs this file with those kernels).
"""
import copy

import pytest
import torch
from torch import nn

from qkformer import fused
from qkformer.neuron import MultiStepLIF

T = 2
UNITS = {  # name: (Cin, Cout, kernel_size (0: projection over tokens), stride, pool, H)
    "dvs-shortcut-1x1-s4": (2, 16, 1, 4, False, 16),
    "rgb-shortcut-1x1-s2": (3, 16, 1, 2, False, 8),
    "1x1-s2-c4": (4, 8, 1, 2, False, 10),
    "1x1-s2-c12": (12, 24, 1, 2, False, 8),
    "1x1-s1": (6, 10, 1, 1, False, 6),
    "projection": (16, 24, 0, 1, False, 5),
    "3x3-pool": (3, 16, 3, 1, True, 8),
    "3x3": (2, 16, 3, 1, False, 7),
    "5x5": (5, 7, 5, 1, False, 8),
}
KINDS = {"analog": fused.ANALOG, "spikes": fused.SPIKES, "counts": fused.COUNTS}


def _problem(unit, kind):
    cin, cout, k, stride, pool, H = UNITS[unit]
    g = torch.Generator().manual_seed(7)
    shape = (T * 2, H, H, cin)
    if kind == fused.ANALOG:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    else:  # sparse enough for the spike-driven products
        x = (torch.rand(shape, generator=g, dtype=torch.float64) < 0.2).double()
        if kind == fused.COUNTS:
            x = x * torch.randint(1, 4, shape, generator=g)
    conv = nn.Conv2d(cin, cout, max(k, 1), stride, max(k, 1) // 2, bias=k == 0).double()
    bn = nn.BatchNorm2d(cout).double()
    with torch.no_grad():  # dyadic weights: the convolution is exact in float32 too
        conv.weight.copy_((torch.randn(conv.weight.shape, generator=g) * 16).round() / 64)
        if conv.bias is not None:
            conv.bias.copy_((torch.randn(cout, generator=g) * 16).round() / 64)
        bn.weight.copy_(torch.rand(cout, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(cout, generator=g) * 0.5 + 1.5)  # neurons fire
    modules = [conv, bn] + ([nn.MaxPool2d(3, 2, 1)] if pool else [])
    return x, modules, MultiStepLIF(backend="torch"), (k, stride, pool), g


def _reference(x, modules, lif, g):
    """The modules on NCHW, in float64."""
    x = x.double().permute(0, 3, 1, 2).detach().requires_grad_()
    y = x
    for m in modules:
        y = m(y)
    s = lif(y.reshape(T, -1, *y.shape[1:])).reshape(y.shape)
    grad = torch.randn(s.shape, generator=g, dtype=torch.float64)
    s.backward(grad)
    conv, bn = modules[0], modules[1]
    grads = {"x": x.grad.permute(0, 2, 3, 1), "weight": conv.weight.grad,
             "bn.weight": bn.weight.grad, "bn.bias": bn.bias.grad}
    if conv.bias is not None:
        grads["bias"] = conv.bias.grad
    return s.permute(0, 2, 3, 1).detach(), grad.permute(0, 2, 3, 1), grads


def _both(unit, kind, dtype):
    """(reference spikes, reference gradients, fused spikes, fused gradients)"""
    x, modules, lif, geometry, g = _problem(unit, kind)
    fused_modules = copy.deepcopy(modules)  # the same parameters, converted below
    spikes, grad, want = _reference(x, modules, lif, g)
    got_spikes, got = _fused(x, kind, fused_modules, lif, geometry, grad, dtype)
    return spikes, want, got_spikes, got


def _fused(x, kind, modules, lif, geometry, grad, dtype):
    k, stride, pool = geometry
    conv, bn = (m.to(dtype) for m in modules[:2])
    x = x.to(dtype).detach().requires_grad_()
    s = fused.spiking_unit(x, conv.weight, conv.bias, bn, lif, kernel_size=k, stride=stride,
                           pool=pool, steps=T, x_kind=kind)
    s.backward(grad.to(dtype))
    grads = {"x": x.grad, "weight": conv.weight.grad, "bn.weight": bn.weight.grad,
             "bn.bias": bn.bias.grad}
    if conv.bias is not None:
        grads["bias"] = conv.bias.grad
    return s.detach(), grads


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("unit", list(UNITS))
def test_unit_matches_its_modules(unit, kind, dtype, threads):
    spikes, want, got_spikes, got = _both(unit, KINDS[kind], dtype)
    assert torch.equal(got_spikes.double(), spikes), "spikes differ"
    assert 0.1 < spikes.float().mean() < 0.9  # the neurons fire, not all: gradients flow through the surrogate
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for name, ref in want.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(got[name].double(), ref, rtol=tol["rtol"],
                                   atol=tol["atol"] * max(scale, 1.0), msg=f"{name} gradient")
        assert scale > 0, f"{name}: no gradient reached it"


def test_a_wrong_gradient_fails_this_check():
    """The comparison above is not blind: a weight gradient off by 1% fails it."""
    _, want, _, got = _both("dvs-shortcut-1x1-s4", fused.SPIKES, torch.float32)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got["weight"].double() * 1.01, want["weight"], rtol=2e-4,
                                   atol=2e-5 * want["weight"].abs().max().item())
