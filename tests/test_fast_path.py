"""The fast path (token-major, fused units, compact storage) against the reference path.

float64 is the verdict: logits, every block's output, every parameter gradient and every
BatchNorm buffer after an optimizer step agree within 1e-9 (relative) on every family, in train
and eval mode, with the legacy and the fixed SSA, and with QKCA. The compiled CPU kernels are
also held to their torch-op mirror, compact storage to storing nothing compactly (bit for bit),
and the custom ops to torch.library's own checks.
"""
import copy

import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401  (registers the variants with timm)
from qkformer import cpu, fused
from qkformer.layers import SpikingBlock
from qkformer.neuron import MultiStepLIF
from conftest import fire_bn, saved_bytes

RTOL = 1e-9

# Reduced widths of every family; attn_types/legacy_ssa vary per case below.
FAMILIES = {
    "imagenet": ("qkformer_10_384", dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, T=2,
                                         num_classes=5), (3, 3, 32, 32)),
    "cifar": ("qkformer_cifar10", dict(embed_dims=32, depths=(1, 1, 2), num_heads=2, T=2,
                                       num_classes=5), (3, 3, 16, 16)),
    "dvs": ("qkformer_cifar10_dvs", dict(embed_dims=32, num_heads=2, num_classes=5),
            (3, 3, 2, 32, 32)),
}
CASES = [
    ("imagenet", dict()),
    ("imagenet", dict(legacy_ssa=False, attn_types=("qkca", "qkta", "ssa"))),
    ("cifar", dict()),
    ("cifar", dict(legacy_ssa=False, attn_types=("qkta", "qkca", "ssa"))),
    ("dvs", dict()),
    ("dvs", dict(legacy_ssa=False, attn_types=("qkca", "ssa"))),
]
IDS = [f"{f}-{'-'.join(map(str, k.get('attn_types', ('default',))))}"
       f"{'-fixed' if k.get('legacy_ssa') is False else ''}" for f, k in CASES]


def _pair(family, overrides, dtype=torch.float64):
    name, kwargs, shape = FAMILIES[family]
    torch.manual_seed(0)
    ref = timm.create_model(name, fast_path=False, **{**kwargs, **overrides}).to(dtype)
    fire_bn(ref)
    fast = copy.deepcopy(ref)
    fast.set_fast_path(True)
    g = torch.Generator().manual_seed(2)
    if len(shape) == 5:  # event counts
        x = torch.poisson(torch.full(shape, 0.4, dtype=dtype), generator=g)
    else:
        x = torch.randn(shape, generator=g, dtype=dtype)
    return ref, fast, x


def _block_outputs(model):
    """Outputs of every SPEDS, block, attention and MLP, in the reference layout."""
    seen, hooks = {}, []

    def hook(mod, args, out, name):
        seen[name] = out.detach().permute(0, 1, 4, 2, 3) if model.fast_path else out.detach()

    for name, m in model.named_modules():
        if hasattr(m, "token_major") or isinstance(m, SpikingBlock):
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)))
    return seen, hooks


def _close(actual, expected, what):
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative difference {err:.2e}"


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_train_step_float64_matches_reference(family, overrides):
    ref, fast, x = _pair(family, overrides)
    y = torch.arange(x.shape[0]) % 5
    outs = []
    for model in (ref, fast):
        model.train()
        seen, hooks = _block_outputs(model)
        # SGD: the step is linear in the gradient. (AdamW divides by sqrt(v) + eps, which turns
        # the rounding noise of the true-zero gradients of a conv bias before a batch-statistics
        # BN into steps of up to lr; that noise is no property of either path.)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        for h in hooks:
            h.remove()
        outs.append((logits.detach(), seen, grads))
    (l_ref, s_ref, g_ref), (l_fast, s_fast, g_fast) = outs
    _close(l_fast, l_ref, "logits")
    assert s_ref.keys() == s_fast.keys() and len(s_ref) > 5
    for k in s_ref:
        _close(s_fast[k], s_ref[k], k)
    rates = [v.mean().item() for v in s_ref.values()]
    assert max(rates) > 0.05  # the comparison is not between silent networks
    # gradients, relative to the largest of each tensor; a conv bias right before a
    # batch-statistics BN has a true gradient of 0, compared against the global scale
    top = max(g.abs().max().item() for g in g_ref.values())
    for n in g_ref:
        scale = max(g_ref[n].abs().max().item(), 1e-4 * top)
        err = (g_fast[n] - g_ref[n]).abs().max().item() / scale
        assert err <= RTOL, f"grad {n}: relative difference {err:.2e}"
    for (n, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        _close(b, a, f"param {n} after the step")
    for (n, a), (_, b) in zip(ref.named_buffers(), fast.named_buffers()):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), n
        else:
            _close(b, a, f"buffer {n}")


@pytest.mark.parametrize("family,overrides", CASES, ids=IDS)
def test_eval_float64_matches_reference(family, overrides):
    ref, fast, x = _pair(family, overrides)
    results = []
    for model in (ref, fast):
        model.eval()
        seen, hooks = _block_outputs(model)
        with torch.no_grad():
            results.append((model(x), seen))
        for h in hooks:
            h.remove()
    (l_ref, s_ref), (l_fast, s_fast) = results
    _close(l_fast, l_ref, "logits")
    for k in s_ref:
        _close(s_fast[k], s_ref[k], k)
    assert max(v.mean().item() for v in s_ref.values()) > 0.05


def test_kernels_match_their_torch_mirror(monkeypatch):
    """The compiled CPU kernels and the torch-op implementation (used on CUDA and without a
    compiler) compute the same thing: forward, gradients and BN buffers, float64."""
    if cpu.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    _, fast, x = _pair("imagenet", dict(legacy_ssa=False, attn_types=("qkca", "qkta", "ssa")))
    mirror = copy.deepcopy(fast)
    results = []
    for model, kernels in ((fast, True), (mirror, False)):
        if not kernels:
            monkeypatch.setattr(fused, "_kernels", lambda t: False)
        model.train()
        logits = model(x)
        (logits ** 2).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    monkeypatch.undo()
    (la, ga), (lb, gb) = results
    _close(lb, la, "logits")
    top = max(g.abs().max().item() for g in ga.values())
    for n in ga:
        err = (gb[n] - ga[n]).abs().max().item() / max(ga[n].abs().max().item(), 1e-4 * top)
        assert err <= RTOL, n
    for (n, a), (_, b) in zip(fast.named_buffers(), mirror.named_buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=RTOL, atol=0), n


# channel counts below, at and across the kernels' channel blocks (64 floats / 32 doubles)
@pytest.mark.parametrize("C", [1, 31, 32, 64, 70, 130])
@pytest.mark.parametrize("bcast,affine,detach", [(False, True, True), (True, True, False),
                                                 (False, False, True)])
def test_bn_lif_kernels_match_their_mirror_on_every_channel_count(monkeypatch, C, bcast, affine,
                                                                   detach):
    """bn_lif_forward/backward, kernels against torch ops, float64: spikes equal, g_Z and the
    BatchNorm sums to rounding, for full channel blocks, partial ones and both together."""
    if cpu.library() is None:
        pytest.skip(f"CPU kernels unavailable: {cpu.unavailable_reason()}")
    g = torch.Generator().manual_seed(C)
    steps, M = 3, 12
    y = torch.randn(M if bcast else steps * M, C, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(steps * M, C, generator=g, dtype=torch.float64)
    scale = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if affine else None
    shift = torch.randn(C, generator=g, dtype=torch.float64) * 0.3 if affine else None
    args = (steps, scale, shift, 2.0, 0.5)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(fused, "_kernels", lambda t, k=kernels: k)
        spikes = fused.bn_lif_forward(y, *args, bcast=bcast)
        gz, sums = fused.bn_lif_backward(grad, y, *args, 4.0, detach, bcast=bcast, sums=True)
        results.append((spikes, gz, sums))
    (s_k, gz_k, sums_k), (s_m, gz_m, sums_m) = results
    assert 0 < s_m.sum() < s_m.numel()
    assert torch.equal(s_k, s_m)
    assert torch.allclose(gz_k, gz_m, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sums_k, sums_m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_storage_is_bit_identical(dtype):
    _, fast, x = _pair("cifar", dict(), dtype)
    plain = copy.deepcopy(fast)
    res = []
    for model, compact in ((fast, True), (plain, False)):
        model.train()
        with fused.compact_storage(compact):
            logits = model(x)
            (logits ** 2).sum().backward()
        res.append((logits, [p.grad for p in model.parameters()]))
    assert torch.equal(res[0][0], res[1][0])
    assert all(torch.equal(a, b) for a, b in zip(res[0][1], res[1][1]))


class _DropsItsFirstGradient(torch.autograd.Function):
    """s.sum() * w whose backward gives no gradient for s (as some ops do)."""

    @staticmethod
    def forward(ctx, s, w):
        return s.sum() * w

    @staticmethod
    def backward(ctx, g):
        return None, g


@pytest.mark.parametrize("layer", ["unit", "qk", "lif"])
def test_layers_accept_an_undefined_output_gradient(layer):
    """The fused layers and the LIF op do not materialise zero gradients for outputs nothing
    differentiates, so they can be called with none at all: they must then pass none on."""
    torch.manual_seed(0)
    conv, bn, lif = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), MultiStepLIF()
    x = torch.rand(2, 3, 4, 8, requires_grad=True)
    if layer == "unit":
        out = fused.spiking_unit(x, conv.weight, conv.bias, bn, lif, steps=2)
    elif layer == "qk":
        out = fused.qk_attention(x, 2, False, MultiStepLIF(v_threshold=0.5))
    else:  # the custom op (what torch.compile sees; eager mode uses an autograd.Function)
        out = torch.ops.qkformer.lif_forward(x, 2.0, 1.0, 4.0, True, True, "torch")[0]
    w = torch.ones((), requires_grad=True)
    _DropsItsFirstGradient.apply(out, w).backward()
    assert w.grad is not None and x.grad is None and conv.weight.grad is None


def test_compact_storage_keeps_spikes_as_bits():
    torch.manual_seed(0)
    conv, bn, lif = nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), MultiStepLIF()
    spikes = (torch.rand(2, 4, 8, 8, 64) < 0.3).float()
    counts = torch.randint(0, 5, (2, 4, 8, 8, 64)).float()

    def run(x, kind):
        return lambda: fused.spiking_unit(x.requires_grad_(), conv.weight, conv.bias, bn, lif,
                                          steps=2, x_kind=kind)

    y_bytes = 2 * 4 * 8 * 8 * 64 * 4 + 3 * 64 * 8  # the conv output, float, and the statistics
    weights = conv.weight.numel() * 4
    as_bits = saved_bytes(run(spikes, fused.SPIKES)) - y_bytes - weights
    as_bytes = saved_bytes(run(counts, fused.COUNTS)) - y_bytes - weights
    assert as_bits == spikes.numel() // 8
    assert as_bytes == counts.numel()
    with fused.compact_storage(False):
        assert saved_bytes(run(spikes, fused.SPIKES)) - y_bytes - weights == spikes.numel() * 4


@pytest.mark.parametrize("kind,values", [
    (fused.SPIKES, [0.0, 1.0, 1.0, 0.0, 1.0]),
    (fused.COUNTS, [0.0, 3.0, 255.0, 17.0, 1.0]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pack_round_trip(kind, values, dtype):
    x = torch.tensor(values * 13, dtype=dtype).view(5, 13)  # 65 elements: a partial last byte
    stored, how = fused.pack(x, kind)
    assert how is not None and stored.dtype == torch.uint8
    assert stored.numel() == (x.numel() + 7) // 8 if kind == fused.SPIKES else x.numel()
    back = fused.unpack(stored, how)
    assert back.dtype == dtype and torch.equal(back, x)


@pytest.mark.parametrize("kind,bad", [
    (fused.SPIKES, 2.0), (fused.SPIKES, 0.5), (fused.COUNTS, 256.0), (fused.COUNTS, -1.0),
    (fused.COUNTS, 2.5), (fused.COUNTS, float("nan")), (fused.COUNTS, float("inf")),
    (fused.COUNTS, -float("inf")), (fused.COUNTS, 1e10), (fused.COUNTS, 254.5),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("where", [17, 38])  # in the kernels' vector loop body, in its tail
def test_pack_falls_back_to_the_exact_values(kind, bad, dtype, where):
    if dtype == torch.bfloat16 and bad == 254.5:
        bad = 127.5  # (254.5 rounds to 254 in bfloat16)
    x = torch.zeros(40, dtype=dtype)
    x[where] = bad
    stored, how = fused.pack(x, kind)
    assert how is None and stored is x  # nothing lost: the tensor itself is kept
    assert fused.unpack(stored, how) is x


def test_unit_with_a_wrong_kind_still_gives_exact_gradients():
    # a caller that declares analog values as spikes loses nothing: the check keeps the values
    torch.manual_seed(0)
    conv, bn, lif = nn.Conv2d(8, 8, 1).double(), nn.BatchNorm2d(8).double(), MultiStepLIF()
    x = torch.randn(2, 3, 4, 4, 8, dtype=torch.float64)
    grads = []
    for kind in (fused.SPIKES, fused.ANALOG):
        xi = x.clone().requires_grad_()
        out = fused.spiking_unit(xi, conv.weight, conv.bias, bn, lif, steps=2, x_kind=kind)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(conv.weight.grad.clone())
        conv.weight.grad = None
    assert torch.equal(grads[0], grads[1])


def test_bf16_autocast_runs_gemms_in_bf16():
    _, fast, x = _pair("cifar", dict(), torch.float32)
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(x)
        (logits.float() ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in fast.parameters())
    ref = copy.deepcopy(fast).float()
    with torch.no_grad():
        assert (ref(x) - logits.float()).abs().max() < 0.5  # same function, rounded GEMMs


def test_ssa_core_ignores_autocast():
    # its products are integer sums (forward) and float32 gradients (backward): autocast must
    # not round them to bf16 (the backward products did, before; sparse spikes keep the scores
    # near the threshold, so the gradients are non-zero)
    torch.manual_seed(0)
    lif = MultiStepLIF(tau=2.0, v_threshold=0.5, detach_reset=True)
    qkv = (torch.rand(2, 1, 300, 48) < 0.15).to(torch.bfloat16)
    g = torch.randn(2, 1, 300, 16).to(torch.bfloat16)
    results = []
    for autocast in (False, True):
        x = qkv.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fused.ssa_attention(x, 1, 0.125, lif)
            out.backward(g)
        results.append((out, x.grad))
    assert (results[0][1] != 0).float().mean() > 0.5
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_custom_ops_pass_torch_library_checks():
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 3, 4, 4, 8)).double().requires_grad_()
    w = torch.randn(6, 8, 1, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(6, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    args = (x, w, None, gamma, beta, None, None, 0, 1, False, 2, False, True, True, 1e-5, 2.0,
            0.5, 4.0, True, fused.COUNTS, None, False)
    torch.library.opcheck(torch.ops.qkformer.spiking_unit.default, args)
    # with a GEMM dtype (as under autocast): the cast weight is an output, reused backward
    torch.library.opcheck(torch.ops.qkformer.spiking_unit.default,
                          args[:-2] + (torch.float32, False))
    qk = (torch.rand(2, 3, 5, 8, dtype=torch.float64) < 0.4).double().requires_grad_()
    torch.library.opcheck(torch.ops.qkformer.qk_attention.default,
                          (qk, 2, False, 2.0, 0.5, 4.0, True))
    qkv = (torch.rand(2, 3, 5, 12, dtype=torch.float64) < 0.4).double().requires_grad_()
    torch.library.opcheck(torch.ops.qkformer.ssa_attention.default,
                          (qkv, 2, 0.125, 2.0, 0.5, 4.0, True))


def test_eager_units_skip_the_dispatcher_and_equal_the_op():
    """Eagerly a unit is a plain autograd Function (the custom op's layers cost Python time on
    every call); its outputs and gradients are those of the op, which compiled graphs call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randint(0, 3, (4, 5, 8)).double().requires_grad_()
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    bn = nn.BatchNorm1d(6).double()
    lif = MultiStepLIF(v_threshold=0.5)
    ops = Ops()
    with ops:
        out = fused.spiking_unit(x, w, None, bn, lif, steps=2, x_kind=fused.COUNTS)
    assert not any("qkformer.spiking_unit" in n for n in ops.names), sorted(ops.names)
    args = (x, w, None, bn.weight, bn.bias, None, None, 0, 1, False, 2, False, True, True,
            bn.eps, lif.tau, lif.v_threshold, lif.alpha, lif.detach_reset, fused.COUNTS, None,
            False)
    ref = torch.ops.qkformer.spiking_unit.default(*args)[0]
    assert torch.equal(out, ref) and 0 < out.mean() < 1
    g = torch.randn_like(out)
    inputs = (x, w, bn.weight, bn.bias)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compile_fullgraph_fast_path_matches_eager():
    torch._dynamo.reset()
    _, fast, x = _pair("imagenet", dict(), torch.float32)
    eager = copy.deepcopy(fast)
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    for model in (compiled, eager):
        model.train()
    out = compiled(x)
    (out ** 2).sum().backward()
    ref = eager(x)
    (ref ** 2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(fast.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_compiled_graphs_keep_inputs_compactly():
    """Under torch.compile the units keep their spike and count inputs packed, as eagerly:
    the same bytes saved for backward, the same logits and gradients."""
    _, fast, x = _pair("imagenet", dict())
    fast.train()
    runs = {}
    for name, compact in (("compiled", True), ("eager", True), ("plain", False)):
        torch._dynamo.reset()
        model = copy.deepcopy(fast)
        net = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
        net = net if name != "eager" else model
        out = []
        with fused.compact_storage(compact):
            kept = saved_bytes(lambda: out.append(net(x)))
        (out[0] ** 2).sum().backward()
        runs[name] = (kept, out[0], [p.grad for p in model.parameters()])
    assert runs["compiled"][0] == runs["eager"][0] < 0.8 * runs["plain"][0]
    assert torch.equal(runs["compiled"][1], runs["eager"][1])
    for a, b in zip(runs["compiled"][2], runs["eager"][2]):
        assert torch.equal(a, b)


def test_compiled_graph_rejects_a_tensor_of_the_wrong_kind():
    """A compiled graph keeps only the packed copy, so an input that is not what the layer
    declared (here values 0.5 declared as spikes) is an error, not a silent rounding."""
    torch._dynamo.reset()
    lif = MultiStepLIF(tau=2.0, v_threshold=1.0, detach_reset=True)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)

    def unit(x):
        return fused.spiking_unit(x, w, None, None, lif, steps=2, x_kind=fused.SPIKES)

    compiled = torch.compile(unit, backend="aot_eager", fullgraph=True, dynamic=False)
    spikes = torch.randint(0, 2, (2, 3, 8), dtype=torch.float64)
    assert torch.equal(compiled(spikes), unit(spikes))
    with pytest.raises(Exception, match="declared as spikes holds a value other than 0 and 1"):
        compiled(spikes * 0.5)


def test_off_the_cpu_models_take_the_reference_path(monkeypatch):
    """Without kernels of its own a device runs the reference path (the torch-op fast path is
    slower than it on a GPU by the count); QKFORMER_CUDA_FAST_PATH=1 keeps the fast path."""
    monkeypatch.delenv("QKFORMER_CUDA_FAST_PATH", raising=False)
    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2, T=1)
    assert fused.fast_path_ready("cpu") and not fused.fast_path_ready("cuda")
    assert "path: reference (layer by layer, the original's computation) on cuda" in \
        fused.describe(model, "cuda")
    assert "path: fast" in fused.describe(model, "cpu")
    seen = []
    for x in (torch.empty(0, device="meta"), torch.empty(0)):
        with model._path_for(x):
            seen.append((model.fast_path, model.patch_embed1.token_major))
    assert seen == [(False, False), (True, True)] and model.fast_path
    monkeypatch.setenv("QKFORMER_CUDA_FAST_PATH", "1")
    assert fused.fast_path_ready("cuda")
    with model._path_for(torch.empty(0, device="meta")):
        assert model.fast_path
    assert "path: fast" in fused.describe(model, "cuda")


# ---------------------------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("family,overrides", CASES[::2], ids=IDS[::2])
def test_gpu_fast_path_float64_matches_reference(family, overrides, monkeypatch):
    monkeypatch.setenv("QKFORMER_CUDA_FAST_PATH", "1")  # the torch-op fast path, not the default
    """On CUDA the fused units run in torch ops (and the LIF backend): still the same network."""
    ref, fast, x = _pair(family, overrides)
    ref, fast, x = ref.cuda(), fast.cuda(), x.cuda()
    y = (torch.arange(x.shape[0]) % 5).cuda()
    grads = []
    for model in (ref, fast):
        model.train()
        logits = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = grads
    _close(lb, la, "logits")
    top = max(g.abs().max().item() for g in ga.values())
    for n in ga:
        err = (gb[n] - ga[n]).abs().max().item() / max(ga[n].abs().max().item(), 1e-4 * top)
        assert err <= RTOL, f"grad {n}: {err:.2e}"
    for (n, a), (_, b) in zip(ref.named_buffers(), fast.named_buffers()):
        if a.dtype != torch.int64:
            _close(b, a, n)
    for model in (ref, fast):
        model.eval()
    with torch.no_grad():
        _close(fast(x), ref(x), "eval logits")


@cuda
def test_gpu_fast_path_amp_and_checkpointing(monkeypatch):
    monkeypatch.setenv("QKFORMER_CUDA_FAST_PATH", "1")
    _, fast, x = _pair("cifar", dict(), torch.float32)
    fast, x = fast.cuda().train(), x.cuda()
    ckpt = copy.deepcopy(fast)
    ckpt.set_grad_checkpointing(True)
    y = (torch.arange(x.shape[0]) % 5).cuda()
    torch.backends.cudnn.deterministic = True
    try:
        res = []
        for model in (fast, ckpt):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            res.append((loss.detach(), [p.grad for p in model.parameters()]))
    finally:
        torch.backends.cudnn.deterministic = False
    assert torch.isfinite(res[0][0]) and all(torch.isfinite(g).all() for g in res[0][1])
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-6)
    for g, h in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(h, g, rtol=1e-3, atol=1e-5)
    for (n, a), (_, b) in zip(fast.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)  # updated once
