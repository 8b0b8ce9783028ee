"""Backend dispatch of the LIF neuron, on CPU: the kernel's self-check and fallbacks exercised with
stand-ins for the kernel launchers, the environment variables, the public no-autograd functions,
the custom ops under torch.compile, and the module structure (no import cycle in the package,
the layering of its modules).

The stand-ins replace ``qkformer.cuda._forward`` / ``_backward`` (the two functions that launch
the kernels) and ``qkformer.cuda.handles`` (is this a tensor the kernel serves?), and the probe
is told that CuPy works. ``kernel_forward`` / ``kernel_backward`` (tests/lif_reference.py)
compute what the kernel computes (float arithmetic, one rounding to the storage type per stored
value, written independently of the torch loops): the self-check must accept them in every dtype. The broken ones must be caught, named in one warning,
and replaced by the torch backend.
"""
import ast
import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401  (timm registration)
from qkformer import cuda as lif_cuda
from qkformer.neuron import (MultiStepLIF, describe_backend, lif_backward, lif_forward,
                             lif_forward_torch, lif_multistep, resolve_backend)

from lif_reference import kernel_backward, kernel_forward

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------- stand-ins


def select_reset_forward(x, tau, v_threshold, save_h):
    """The kernel before it mirrored the reference reset: V = 0 if fired else H, so an input
    of +inf is reset to a finite 0 where the reference turns NaN."""
    T = x.shape[0]
    x2 = x.reshape(T, -1).float()
    v = torch.zeros_like(x2[0])
    spikes, hs = torch.empty_like(x2), torch.empty_like(x2)
    for t in range(T):
        h = (v + (x2[t] - v) / tau).to(x.dtype).float()
        fired = h >= v_threshold
        spikes[t], hs[t] = fired.float(), h
        v = torch.where(fired, 0.0, h)
    return spikes.to(x.dtype).view_as(x), (hs.to(x.dtype).view_as(x) if save_h else None)


def late_spike_forward(x, tau, v_threshold, save_h):
    spikes, h = kernel_forward(x, tau, v_threshold, save_h)
    return spikes.flip(-1), h  # spikes of the wrong neurons


def no_carry_backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset):
    """Forgets the recursion through time: only the surrogate of each step."""
    sig = torch.sigmoid((h_seq.float() - v_threshold) * alpha)
    return (grad_spikes.float() * (1 - sig) * sig * alpha / tau).to(h_seq.dtype)


def raising(*args):
    raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED (stand-in)")


class Kernel:
    """Installs launcher stand-ins and counts their calls."""

    def __init__(self, monkeypatch, forward=kernel_forward, backward=kernel_backward):
        self.calls = {"forward": 0, "backward": 0}
        self.forward, self.backward = forward, backward

        def fwd(*args):
            self.calls["forward"] += 1
            return self.forward(*args)

        def bwd(*args):
            self.calls["backward"] += 1
            return self.backward(*args)

        monkeypatch.setattr(lif_cuda, "_forward", fwd)
        monkeypatch.setattr(lif_cuda, "_backward", bwd)
        monkeypatch.setattr(lif_cuda, "handles", lambda x: True)  # the CPU stands in for a GPU
        monkeypatch.setattr(lif_cuda, "_probe", lambda: (True, None))


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(lif_cuda.REQUIRE_ENV, raising=False)
    monkeypatch.delenv(lif_cuda.SELFCHECK_ENV, raising=False)
    lif_cuda._reset_cache()
    yield
    lif_cuda._reset_cache()


def _inputs(shape=(4, 3, 50), dtype=torch.float32):
    return (torch.randn(shape) * 1.5 + 0.6).to(dtype), torch.randn(shape).to(dtype)


def _run(x, up, backend="auto", detach_reset=True):
    xi = x.clone().requires_grad_()
    s = lif_multistep(xi, detach_reset=detach_reset, backend=backend)
    s.backward(up)
    return s, xi.grad


def _ours(record):
    return [w for w in record if "LIF CUDA kernel" in str(w.message)]


# ------------------------------------------------------------------------------ self-check


@pytest.mark.parametrize("dtype", DTYPES)
def test_selfcheck_accepts_a_faithful_kernel(monkeypatch, dtype):
    kernel = Kernel(monkeypatch)
    x, up = _inputs(dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        s, g = _run(x, up)
    checks = dict(kernel.calls)
    assert checks["forward"] >= 3 and checks["backward"] >= 3  # self-check + the call itself
    assert lif_cuda.disabled_reason("cpu", dtype) is None
    s_ref, g_ref = _run(x, up, backend="torch")
    assert (s != s_ref).float().mean() < 1e-2  # 16-bit: H rounded once vs after every op
    if dtype == torch.float32:
        assert torch.equal(s, s_ref)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)
    _run(x, up)  # checked once per (device, dtype): the second call launches only its own
    assert kernel.calls == {"forward": checks["forward"] + 1, "backward": checks["backward"] + 1}


def test_check_input_is_exact_in_every_dtype():
    # The self-check demands bit-equal spikes and H in 16-bit types; that is fair only if every
    # H of the check input is exactly representable, i.e. the same in float64 and in 16 bits.
    for dtype in DTYPES:
        x, _ = lif_cuda._check_inputs(torch.device("cpu"), dtype)
        s, h = lif_forward_torch(x, 2.0, 1.0, True)
        s64, h64 = lif_forward_torch(x.double(), 2.0, 1.0, True)
        torch.testing.assert_close(h.double(), h64, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(s.double(), s64)
        assert (h == 1.0).any() and 0.2 < s.mean() < 0.8  # ties at the threshold, both outcomes
        assert h.isnan().any() and (h == float("inf")).any() and (h == -float("inf")).any()


@pytest.mark.parametrize("forward,backward,message", [
    # +inf reset to 0 instead of NaN: the next H, or already the next spike, differs
    (select_reset_forward, kernel_backward, r"(spikes|membrane potentials H) differ"),
    (late_spike_forward, kernel_backward, r"spikes differ from the torch backend"),
    (kernel_forward, no_carry_backward, r"input gradients \(detach_reset=True\) differ"),
    (raising, kernel_backward, r"failed: the kernel raised RuntimeError: CUDA_ERROR_LAUNCH_FAI"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wrong_kernel_is_caught_once_and_replaced(monkeypatch, forward, backward, message, dtype):
    kernel = Kernel(monkeypatch, forward, backward)
    x, up = _inputs(dtype=dtype)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        s, g = _run(x, up)
        launches = dict(kernel.calls)
        s2, g2 = _run(x, up)
        lif_multistep(x)
    ours = _ours(record)
    assert len(ours) == 1, [str(w.message) for w in ours]  # once per (device, dtype)
    text = str(ours[0].message)
    assert f"LIF CUDA kernel disabled on cpu for {dtype}: self-check failed" in text
    assert re.search(message, text) and "falling back to the torch backend" in text
    assert issubclass(ours[0].category, RuntimeWarning)
    assert kernel.calls == launches  # after the failed check the kernel is never called again
    s_ref, g_ref = _run(x, up, backend="torch")
    assert torch.equal(s, s_ref) and torch.equal(g, g_ref)
    assert torch.equal(s2, s_ref) and torch.equal(g2, g_ref)
    assert re.search(message, lif_cuda.disabled_reason("cpu", dtype))
    assert lif_cuda.disabled_reason("cpu", torch.bfloat16) is None  # other dtypes unaffected


def test_selfcheck_env_zero_skips_the_check(monkeypatch):
    kernel = Kernel(monkeypatch, late_spike_forward, kernel_backward)
    monkeypatch.setenv(lif_cuda.SELFCHECK_ENV, "0")
    x, up = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, _ = _run(x, up)
    assert kernel.calls == {"forward": 1, "backward": 1}  # no check launches
    assert torch.equal(s, late_spike_forward(x, 2.0, 1.0, False)[0])  # the kernel was trusted
    assert "self-check skipped" in describe_backend("cuda")


@pytest.mark.parametrize("forward", [select_reset_forward, raising])
def test_require_env_turns_a_failed_check_into_an_error(monkeypatch, forward):
    Kernel(monkeypatch, forward, kernel_backward)
    monkeypatch.setenv(lif_cuda.REQUIRE_ENV, "1")
    x, up = _inputs()
    with pytest.raises(RuntimeError, match=r"LIF CUDA kernel unusable on cpu for torch.float32: "
                                           r"self-check failed: .*QKFORMER_REQUIRE_CUDA_KERNEL"):
        _run(x, up)
    with pytest.raises(RuntimeError, match="self-check failed"):  # every call, not only the first
        lif_multistep(x)
    monkeypatch.delenv(lif_cuda.REQUIRE_ENV)
    with pytest.warns(RuntimeWarning, match="falling back"):  # not required: the fallback
        assert torch.equal(lif_multistep(x), lif_multistep(x, backend="torch"))


def test_explicit_cupy_backend_refuses_a_failed_kernel(monkeypatch):
    Kernel(monkeypatch, late_spike_forward, kernel_backward)
    x, _ = _inputs()
    with pytest.raises(RuntimeError, match=r"self-check failed: .*backend 'cupy' was requested"):
        lif_multistep(x, backend="cupy")


def test_require_env_with_cupy_unavailable_is_an_error(monkeypatch):
    monkeypatch.setattr(lif_cuda, "handles", lambda x: True)
    monkeypatch.setattr(lif_cuda, "_probe", lambda: (False, "cupy is not installed (stand-in)"))
    x = torch.randn(3, 5)
    assert torch.equal(lif_multistep(x), lif_multistep(x, backend="torch"))  # auto: fallback
    assert describe_backend("cuda") == "LIF backend: torch, since cupy is not installed (stand-in)"
    monkeypatch.setenv(lif_cuda.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match=r"QKFORMER_REQUIRE_CUDA_KERNEL is set but .*stand-in"):
        lif_multistep(x)
    monkeypatch.setattr(lif_cuda, "handles", lambda x: False)
    assert torch.equal(lif_multistep(x), lif_multistep(x, backend="torch"))  # CPU tensors: fine


class Flaky:
    """Passes the self-check, then raises on the launches after it."""

    def __init__(self, good, check_launches=2):
        self.good, self.left = good, check_launches

    def __call__(self, *args):
        if self.left <= 0:
            raise RuntimeError("CUDA_ERROR_ILLEGAL_INSTRUCTION (stand-in)")
        self.left -= 1
        return self.good(*args)


@pytest.mark.parametrize("which", ["forward", "backward"])
def test_launch_failure_falls_back_instead_of_failing(monkeypatch, which):
    if which == "forward":
        kernel = Kernel(monkeypatch, Flaky(kernel_forward), kernel_backward)
    else:
        kernel = Kernel(monkeypatch, kernel_forward, Flaky(kernel_backward))
    x, up = _inputs()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        s, g = _run(x, up)
        launches = dict(kernel.calls)
        s2, g2 = _run(x, up)
    ours = _ours(record)
    assert len(ours) == 1
    assert (f"LIF CUDA kernel disabled on cpu for torch.float32: the {which} kernel raised "
            f"RuntimeError: CUDA_ERROR_ILLEGAL_INSTRUCTION") in str(ours[0].message)
    assert kernel.calls == launches
    s_ref, g_ref = _run(x, up, backend="torch")
    assert torch.equal(s, s_ref) and torch.equal(s2, s_ref)
    # a failed backward launch: the torch loops differentiate the kernel's own saved H
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)
    assert torch.equal(g2, g_ref)


def test_launch_failure_with_require_env_raises(monkeypatch):
    Kernel(monkeypatch, Flaky(kernel_forward), kernel_backward)
    monkeypatch.setenv(lif_cuda.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match="forward kernel raised RuntimeError: CUDA_ERROR_ILLEGAL"):
        lif_multistep(torch.randn(4, 10))


def test_selfcheck_runs_once_per_dtype(monkeypatch):
    Kernel(monkeypatch)
    seen = []
    real = lif_cuda._self_check
    monkeypatch.setattr(lif_cuda, "_self_check", lambda d, t: seen.append((str(d), t)) or real(d, t))
    for dtype in (torch.float32, torch.float32, torch.float16, torch.float32, torch.float16):
        lif_multistep(torch.randn(4, 9).to(dtype))
    assert seen == [("cpu", torch.float32), ("cpu", torch.float16)]
    lif_multistep(torch.randn(4, 9).double())  # no kernel for float64: torch loops, no check
    assert len(seen) == 2


def test_selfcheck_leaves_the_global_rng_alone(monkeypatch):
    Kernel(monkeypatch)
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    lif_multistep(torch.ones(2, 3))  # runs the check
    assert torch.equal(torch.rand(5), expected)


# ------------------------------------------------------------------------- kernel loading


class FakeCupy:
    """Just enough of CuPy to watch which device is current when a kernel is loaded."""

    def __init__(self):
        self.current, self.loads = 0, []
        fake = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.saved, fake.current = fake.current, self.index

            def __exit__(self, *exc):
                fake.current = self.saved

        class Module:
            def get_function(self, name):
                fake.loads.append((name, fake.current))
                return (name, fake.current)

        self.cuda = type("cuda", (), {"Device": Device})
        self.Module = Module


def test_kernel_functions_are_cached_per_device_and_loaded_there(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setattr(lif_cuda, "_import_cupy", lambda: fake)
    monkeypatch.setitem(lif_cuda._modules, 0, fake.Module())
    monkeypatch.setitem(lif_cuda._modules, 1, fake.Module())
    assert lif_cuda._function(1, "lif_forward_f16") == ("lif_forward_f16", 1)
    assert lif_cuda._function(1, "lif_forward_f16") == ("lif_forward_f16", 1)
    assert lif_cuda._function(0, "lif_forward_f16") == ("lif_forward_f16", 0)
    assert lif_cuda._function(1, "lif_backward_f32") == ("lif_backward_f32", 1)
    assert fake.loads == [("lif_forward_f16", 1), ("lif_forward_f16", 0), ("lif_backward_f32", 1)]


# ---------------------------------------------------------------------- public functions


@pytest.mark.parametrize("detach_reset", [True, False])
def test_lif_forward_backward_equal_autograd(detach_reset):
    base = torch.randn(4, 6, 5, 3) * 1.5 + 0.6
    x = base.permute(0, 3, 1, 2)[:, :, 1:]  # non-contiguous, with a storage offset
    up = torch.randn(x.shape)
    spikes, h = lif_forward(x, 2.0, 1.0, True)
    assert spikes.shape == h.shape == x.shape and spikes.is_contiguous() and h.is_contiguous()
    assert not spikes.requires_grad
    assert lif_forward(x, 2.0, 1.0, False)[1] is None
    grad = lif_backward(up.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), h, 2.0, 1.0, 4.0,
                        detach_reset)
    s_ref, g_ref = _run(x, up, detach_reset=detach_reset)
    assert torch.equal(spikes, s_ref) and torch.equal(grad, g_ref) and grad.shape == x.shape
    with torch.enable_grad():  # no autograd inside, even with grad mode on
        xr = x.clone().requires_grad_()
        assert not lif_forward(xr, 2.0, 1.0, True)[0].requires_grad


def test_no_grad_saves_nothing():
    saved = []
    x = torch.randn(4, 10, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            lif_multistep(x)
        assert saved == []
        lif_multistep(x)
    assert len(saved) == 1 and saved[0].shape == x.shape


def test_resolve_backend():
    x = torch.randn(2, 3)
    assert resolve_backend("auto", x) == resolve_backend("torch", x) == "torch"
    with pytest.raises(ValueError, match="unknown LIF backend"):
        resolve_backend("tpu", x)
    assert describe_backend("cpu") == "LIF backend: torch (CPU tensors)"


# --------------------------------------------------------------------- custom ops, compile


def test_custom_ops_pass_opcheck():
    # torch's own consistency checks: schema, fake kernel vs the real one (shapes, strides,
    # dtypes), the autograd registration, and AOT dispatch.
    x = (torch.randn(4, 3, 7) + 0.7).permute(0, 2, 1).requires_grad_()
    for xi, save_h in ((x, True), (x.detach(), False)):  # no H saved: nothing to differentiate
        torch.library.opcheck(torch.ops.qkformer.lif_forward.default,
                              (xi, 2.0, 1.0, 4.0, True, save_h, "auto"))
    with pytest.raises(RuntimeError, match="save_h=False: no H to differentiate"):
        torch.ops.qkformer.lif_forward(x, 2.0, 1.0, 4.0, True, False, "auto")[0].sum().backward()
    h = lif_forward(x.detach(), 2.0, 1.0, True)[1]
    for detach_reset in (True, False):
        torch.library.opcheck(torch.ops.qkformer.lif_backward.default,
                              (torch.randn(x.shape), h, 2.0, 1.0, 4.0, detach_reset, "auto"))


@pytest.mark.parametrize("detach_reset", [True, False])
def test_custom_op_gradient_equals_the_eager_function(detach_reset):
    x, up = _inputs()
    s_ref, g_ref = _run(x, up, detach_reset=detach_reset)
    xi = x.clone().requires_grad_()
    s, h = torch.ops.qkformer.lif_forward(xi, 2.0, 1.0, 4.0, detach_reset, True, "auto")
    assert not h.requires_grad  # H is an auxiliary output, not differentiable
    s.backward(up)
    assert torch.equal(s, s_ref) and torch.equal(xi.grad, g_ref)


def test_double_backward_raises():
    x = (torch.randn(4, 8) + 0.7).requires_grad_()
    for run in (lambda x: lif_multistep(x),
                lambda x: torch.ops.qkformer.lif_forward(x, 2.0, 1.0, 4.0, True, True, "auto")[0]):
        s = run(x)
        weight = torch.randn(s.shape, requires_grad=True)  # a grad_output that requires grad
        (g,) = torch.autograd.grad(s, x, weight, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            g.sum().backward()


def _tiny_cifar():
    torch.manual_seed(0)
    # the reference path: its MultiStepLIF modules are what these tests are about (the fast path
    # fuses the neurons into its units, tests/test_fast_path.py)
    return timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2, T=2,
                             fast_path=False)


@pytest.mark.slow
def test_compiled_graph_holds_one_op_per_neuron():
    """Every MultiStepLIF becomes one qkformer::lif_forward node of the forward graph and one
    qkformer::lif_backward node of the backward graph: no graph break, no inlined loop."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    model = _tiny_cifar()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep),
                             fullgraph=True, dynamic=False)
    compiled(torch.randn(2, 3, 32, 32)).sum().backward()
    neurons = sum(isinstance(m, MultiStepLIF) for m in model.modules())
    counts = [[str(n.target) for n in g.graph.nodes if n.op == "call_function"] for g in graphs]
    assert len(graphs) == 2  # one forward, one backward graph: nothing broke the trace
    assert counts[0].count("qkformer.lif_forward.default") == neurons
    assert counts[1].count("qkformer.lif_backward.default") == neurons
    assert "qkformer.lif_backward.default" not in counts[0]


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _tiny_cifar()
    ref = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # inductor
    loss = nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------- versions and extras


def test_reason_names_a_cuda_major_mismatch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(lif_cuda, "_installed_cupy_major", lambda: 12)

    def broken():
        raise ImportError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.setattr(lif_cuda, "_import_cupy", broken)
    reason = lif_cuda.unavailable_reason()
    assert reason.startswith("cupy failed to import: ImportError: libnvrtc.so.12")
    assert ("CuPy is built for CUDA 12 but torch for CUDA 13: install 'qkformer[cuda13]' "
            "(cupy-cuda13x) instead") in reason
    lif_cuda._reset_cache()
    monkeypatch.setattr(lif_cuda, "_installed_cupy_major", lambda: 13)
    assert "CuPy is built for" not in lif_cuda.unavailable_reason()  # same major: no such claim


def test_not_installed_reason_names_the_matching_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "pip install 'qkformer[cuda12]', which installs cupy-cuda12x" in \
        lif_cuda.unavailable_reason()


def test_cupy_major_from_package_metadata(monkeypatch):
    from importlib import metadata

    class Dist:
        def __init__(self, name):
            self.metadata = {"Name": name}

    monkeypatch.setattr(metadata, "distributions",
                        lambda: [Dist("numpy"), Dist("cupy-cuda12x"), Dist("torch")])
    assert lif_cuda._installed_cupy_major() == 12
    monkeypatch.setattr(metadata, "distributions", lambda: [Dist("numpy")])
    assert lif_cuda._installed_cupy_major() is None


def _extras():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(extras)


def test_cuda_extras_one_per_major():
    extras = _extras()
    cupy = {k: [e for e in v if e.startswith("cupy")] for k, v in extras.items()}
    assert cupy["cuda12"] == ["cupy-cuda12x"] and cupy["cuda13"] == ["cupy-cuda13x"]
    assert all(any(e.startswith("triton") for e in extras[k]) for k in ("cuda", "cuda12", "cuda13"))
    pinned = re.search(r"^torch==(\S+)", (REPO / "constraints.txt").read_text(), re.M).group(1)
    # plain [cuda] is the major of the pinned torch (README: match torch.version.cuda)
    if torch.__version__.split("+")[0] == pinned and torch.version.cuda:
        assert extras["cuda"] == extras[f"cuda{torch.version.cuda.split('.')[0]}"]
    assert extras["cuda"] in (extras["cuda12"], extras["cuda13"])


# ---------------------------------------------------------------------------- import graph


def _import_graph(package: Path, name: str = "qkformer") -> dict:
    """Module -> the package modules it imports anywhere in its source (also inside functions:
    a lazy import closes a cycle as surely as a top-level one)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_pkg)
    graph = {}
    for mod, (path, is_pkg) in modules.items():
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module.split(".") if node.module else []
                if node.level:
                    base = here[: len(here) - node.level + 1] + base
                base = ".".join(base)
                # "from . import cuda" imports the submodule qkformer.cuda
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.split(".")[0] == name:
                    deps.add(t)
        graph[mod] = deps
    return graph


def _reaches(graph, start, goal):
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in graph.get(m, ()):
            if d == goal:
                return True
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return False


def _cycle(graph):
    """One import cycle as ``[a, b, ..., a]``, or None when the graph is acyclic."""
    state, stack = {}, []  # state: 1 = on the current path, 2 = finished

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_import_graph_finder_sees_a_cycle(tmp_path):
    pkg = tmp_path / "qkformer"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "neuron.py").write_text("from . import cuda as lif_cuda\n")
    (pkg / "cuda" / "__init__.py").write_text("def f():\n    from ..neuron import x\n")
    (pkg / "model.py").write_text("import qkformer.neuron\n")  # on no cycle
    graph = _import_graph(pkg)
    assert graph["qkformer.neuron"] == {"qkformer.cuda"}
    assert graph["qkformer.model"] == {"qkformer.neuron"}
    assert _reaches(graph, "qkformer.cuda", "qkformer.neuron")
    assert _cycle(graph) in (["qkformer.cuda", "qkformer.neuron", "qkformer.cuda"],
                             ["qkformer.neuron", "qkformer.cuda", "qkformer.neuron"])
    del graph["qkformer.cuda"]
    assert _cycle(graph) is None


def test_no_import_cycle_in_the_package():
    package = REPO / "qkformer"
    graph = _import_graph(package)
    # every module is in the graph, the subpackages included
    assert len(graph) == len(list(package.rglob("*.py")))
    assert {"qkformer.analysis.curves", "qkformer.cpu", "qkformer.data.images"} <= set(graph)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_neuron_and_cuda():
    graph = _import_graph(REPO / "qkformer")
    assert "qkformer.cuda" in graph["qkformer.neuron"]  # the generic layer uses the backend ...
    assert "qkformer.lif_loops" in graph["qkformer.cuda"]  # ... which uses the shared loops ...
    assert not _reaches(graph, "qkformer.cuda", "qkformer.neuron")  # ... and never the layer
    assert not _reaches(graph, "qkformer.lif_loops", "qkformer.neuron")
    assert not _reaches(graph, "qkformer.lif_loops", "qkformer.cuda")


def test_network_modules_never_import_the_drivers():
    """What builds the network (layers, kernels, the model) stays usable without the command-line
    drivers: a model import must not pull in training, evaluation or the analysis tools."""
    graph = _import_graph(REPO / "qkformer")
    network = ["qkformer.lif_loops", "qkformer.cuda", "qkformer.neuron", "qkformer.functional",
               "qkformer.fused", "qkformer.attention", "qkformer.layers", "qkformer.model",
               "qkformer.variants", "qkformer"]
    drivers = ["qkformer.train", "qkformer.engine", "qkformer.evaluate", "qkformer.demo",
               "qkformer.config"] + [m for m in graph if m.startswith("qkformer.analysis")]
    assert "qkformer.model" in graph["qkformer.variants"]  # (the graph has edges)
    reached = [(a, b) for a in network for b in drivers if _reaches(graph, a, b)]
    assert not reached, reached
