"""The CuPy LIF backend: kernel source, loader error paths, the kernel against the torch backend.

Three levels, so that a machine without a GPU still checks the kernel's arithmetic:
* nvcc compiles the source to PTX with every expected entry point, whose parameter lists match
  the arguments the loader passes;
* nvcc builds the kernel's per-neuron loops into a CPU program, whose output must equal the torch
  backend (the exact code the GPU threads run, minus the launch);
* on a CUDA machine with a working CuPy, the launched kernels against the torch backend (sizes,
  layouts, special values, streams, AMP training, torch.compile): the ``test_gpu_*`` tests, which
  ``benchmarks/gpu_check.sh`` runs with QKFORMER_REQUIRE_CUDA_KERNEL=1.
"""
import builtins
import copy
import importlib.abc
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qkformer import cuda as lif_cuda
from qkformer.lif_loops import lif_backward_torch, lif_forward_torch
from qkformer.neuron import MultiStepLIF, lif_backward, lif_forward, lif_multistep

from lif_reference import assert_same, kernel_forward, special_inputs

KERNELS = [f"lif_{d}_{s}" for s in ("f32", "f16", "bf16") for d in ("forward", "backward")]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA source not compiled")


@pytest.fixture(autouse=True)
def _fresh_loader():
    lif_cuda._reset_cache()
    yield
    lif_cuda._reset_cache()


def test_source_ships_inside_the_package():
    src = lif_cuda.kernel_source()  # read from qkformer/cuda/ (setup.py package_data: cuda/*.cu)
    assert all(f"LIF_KERNELS({s}, " in src for s in ("f32", "f16", "bf16"))


def test_import_does_not_import_cupy():
    code = "import sys, qkformer, qkformer.cuda, qkformer.neuron; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------------------------- nvcc


def _nvcc_arches() -> set[str]:
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return set(re.findall(r"compute_(\d+)", out))


def _ptx(tmp_path, arch: str) -> str:
    cu = tmp_path / "lif_kernel.cu"
    cu.write_text(lif_cuda.kernel_source())
    ptx = tmp_path / f"lif_kernel_{arch}.ptx"
    r = subprocess.run([NVCC, "--ptx", f"-arch=sm_{arch}", "-Werror=all-warnings", str(cu), "-o",
                        str(ptx)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return ptx.read_text()


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvcc_compiles_to_ptx(tmp_path, arch):
    if arch not in _nvcc_arches():
        pytest.skip(f"this nvcc cannot target sm_{arch}")
    entries = re.findall(r"\.entry\s+(\w+)\(", _ptx(tmp_path, arch))
    assert sorted(entries) == sorted(KERNELS)


def _arg_kind(a):  # how CuPy packs a launch argument: Python int -> long long
    if isinstance(a, int):
        return ("int", 8)
    return ("float" if isinstance(a, np.floating) else "int", a.dtype.itemsize)


@needs_nvcc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_launch_arguments_match_kernel_parameters(tmp_path, monkeypatch, dtype):
    ptx = _ptx(tmp_path, "80")
    params = {name: [("float" if t == "f" else "int", int(bits) // 8)
                     for t, bits in re.findall(r"\.param\s+\.([usf])(\d+)", body)]
              for name, body in re.findall(r"\.entry\s+(\w+)\(([^)]*)\)", ptx)}
    launches = []  # the launch is intercepted, so CPU tensors do
    monkeypatch.setattr(lif_cuda, "_launch", lambda name, _dev, _n, a: launches.append((name, a)))
    x = torch.randn(3, 5, 7).to(dtype)
    _, h = lif_cuda._forward(x, 2.0, 1.0, save_h=True)
    lif_cuda._backward(torch.ones_like(x), h, 2.0, 1.0, 4.0, False)
    assert [n for n, _ in launches] == [f"lif_{d}_{lif_cuda._SUFFIX[dtype]}"
                                        for d in ("forward", "backward")]
    for name, args in launches:
        assert [_arg_kind(a) for a in args] == params[name], name


# The per-neuron device functions of lif_kernel.cu run on the host: same loops, same float ops.
HARNESS = r"""
#include "lif_kernel.cu"
#include <cstdio>
#include <cstdlib>
#include <vector>

static std::vector<float> read(const char* path, size_t n) {
    std::vector<float> v(n);
    FILE* f = std::fopen(path, "rb");
    if (!f || std::fread(v.data(), 4, n, f) != n) std::exit(2);
    std::fclose(f);
    return v;
}
template <class V> static void write(const char* path, const V& v) {
    FILE* f = std::fopen(path, "wb");
    std::fwrite(v.data(), sizeof(v[0]), v.size(), f);
    std::fclose(f);
}

int main(int argc, char** argv) {
    const char* dir = argv[1];
    char p[4096];
    if (argv[2][0] == 'b') {  // bf16 DIR N: rounding of DIR/f.bin
        const long long n = std::atoll(argv[3]);
        std::snprintf(p, sizeof p, "%s/f.bin", dir);
        std::vector<float> f = read(p, n);
        std::vector<unsigned short> b(n);
        for (long long i = 0; i < n; ++i) b[i] = BF16::store(f[i]);
        std::snprintf(p, sizeof p, "%s/bf16.bin", dir);
        write(p, b);
        return 0;
    }
    // lif DIR T N tau v_th alpha detach_reset: DIR/{x,gs}.bin -> DIR/{spikes,h,gx}.bin
    const int T = std::atoi(argv[3]);
    const long long N = std::atoll(argv[4]);
    const float tau = (float)std::atof(argv[5]), v_th = (float)std::atof(argv[6]);
    const float alpha = (float)std::atof(argv[7]), decay = (float)(1.0 - 1.0 / std::atof(argv[5]));
    const int detach = std::atoi(argv[8]);
    std::snprintf(p, sizeof p, "%s/x.bin", dir);
    std::vector<float> x = read(p, T * N);
    std::snprintf(p, sizeof p, "%s/gs.bin", dir);
    std::vector<float> gs = read(p, T * N);
    std::vector<float> s(T * N), h(T * N), gx(T * N);
    for (long long i = 0; i < N; ++i) {
        lif_forward_neuron<F32>(x.data(), s.data(), h.data(), i, N, T, tau, v_th);
        lif_backward_neuron<F32>(gs.data(), h.data(), gx.data(), i, N, T, tau, decay, v_th, alpha,
                                 detach);
    }
    std::snprintf(p, sizeof p, "%s/spikes.bin", dir);
    write(p, s);
    std::snprintf(p, sizeof p, "%s/h.bin", dir);
    write(p, h);
    std::snprintf(p, sizeof p, "%s/gx.bin", dir);
    write(p, gx);
    return 0;
}
"""


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not on PATH: kernel loops not built for the host")
    d = tmp_path_factory.mktemp("lif_host")
    (d / "lif_kernel.cu").write_text(lif_cuda.kernel_source())
    (d / "harness.cu").write_text(HARNESS)
    # sm_80 only keeps the build short; the device code is not what runs here.
    r = subprocess.run([NVCC, "-O2", "-arch=sm_80", "-I", str(d), str(d / "harness.cu"), "-o",
                        str(d / "harness")], capture_output=True, text=True)
    if r.returncode != 0 and "host compiler" in r.stderr.lower():
        pytest.skip(f"nvcc has no usable host compiler: {r.stderr.strip()[:300]}")
    assert r.returncode == 0, r.stderr
    return d / "harness"


def _inputs(shape, grid, device="cpu"):
    if grid:  # multiples of 1/8 like the spike-count inputs of the model: H hits V_th exactly
        return torch.randint(-4, 33, shape, device=device) * 0.125
    return torch.randn(shape, device=device) * 2.0 + 0.8


def _run_host(harness, tmp_path, x, gs, tau, v_threshold, alpha, detach_reset):
    T, n = x.shape[0], x[0].numel()
    x.numpy().tofile(tmp_path / "x.bin")
    gs.numpy().tofile(tmp_path / "gs.bin")
    subprocess.run([str(harness), str(tmp_path), "lif", str(T), str(n), repr(tau),
                    repr(v_threshold), repr(alpha), str(int(detach_reset))], check=True)
    out = [torch.from_numpy(np.fromfile(tmp_path / f"{k}.bin", dtype=np.float32)).view(x.shape)
           for k in ("spikes", "h", "gx")]
    return tuple(out)


@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (4, 3, 11), (7, 5, 13)])
@pytest.mark.parametrize("tau", [2.0, 3.0])
@pytest.mark.parametrize("grid", [False, True])
def test_kernel_loops_match_torch_backend(host_kernel, tmp_path, v_threshold, detach_reset, shape,
                                          tau, grid):
    x = _inputs(shape, grid)
    gs = torch.randn(shape)
    spikes, h, gx = _run_host(host_kernel, tmp_path, x, gs, tau, v_threshold, 4.0, detach_reset)
    s_ref, h_ref = lif_forward_torch(x, tau, v_threshold)[:2]  # h_ref may be [T, N]
    assert torch.equal(spikes, s_ref) and torch.equal(h, h_ref.reshape(shape))  # bit for bit
    assert 0 < spikes.mean() < 1
    gx_ref = lif_backward_torch(gs.reshape(h_ref.shape), h_ref, tau, v_threshold, 4.0,
                                detach_reset).reshape(shape)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-6)  # exp may differ in the last ulp


def test_bf16_rounding_matches_torch(host_kernel, tmp_path):
    f = torch.cat([torch.randn(100_000) * 10.0 ** torch.randint(-30, 30, (100_000,)),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1 + 2**-8,
                                 1 + 3 * 2**-8, 3.3895314e38, 1e-40])])
    f.numpy().tofile(tmp_path / "f.bin")
    subprocess.run([str(host_kernel), str(tmp_path), "bf16", str(f.numel())], check=True)
    ours = np.fromfile(tmp_path / "bf16.bin", dtype=np.uint16)
    ref = f.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = f.isnan().numpy()  # NaN payloads differ between torch's own paths: only NaN-ness counts
    assert np.array_equal(ours[~nan], ref[~nan]) and ((ours[nan] & 0x7fff) > 0x7f80).all()


@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_kernel_loops_special_values(host_kernel, tmp_path, detach_reset, T):
    # +inf must poison the neuron (NaN from the next step on) exactly as in the torch backend and
    # in spikingjelly, not be reset to a finite 0; -inf and NaN likewise; gradients NaN alike.
    x = special_inputs((T, 8))
    gs = torch.randn(T, 8)
    spikes, h, gx = _run_host(host_kernel, tmp_path, x, gs, 2.0, 1.0, 4.0, detach_reset)
    s_ref, h_ref = lif_forward_torch(x, 2.0, 1.0)
    assert torch.equal(spikes, s_ref)
    assert_same(h, h_ref, what="H")
    gx_ref = lif_backward_torch(gs, h_ref, 2.0, 1.0, 4.0, detach_reset)
    assert_same(gx, gx_ref, atol=1e-6, what="grad")
    if T > 1:  # +inf at t = 0 in neuron 5: NaN from then on, no spike after the first
        assert h[1:, 5].isnan().all() and spikes[1:, 5].eq(0).all() and gx.isnan().any()
    sj = pytest.importorskip("spikingjelly.clock_driven.neuron")
    xr = x.clone().requires_grad_()
    s_sj = sj.MultiStepLIFNode(tau=2.0, detach_reset=detach_reset, backend="torch")(xr)
    s_sj.backward(gs)
    assert torch.equal(spikes, s_sj)
    assert_same(gx, xr.grad, atol=1e-6, what="grad vs spikingjelly")


# ------------------------------------------------------------------------ loader error paths


def test_cpu_tensor_is_refused():
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        lif_multistep(torch.randn(2, 3), backend="cupy")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        lif_forward(torch.randn(2, 3), 2.0, 1.0, True, backend="cupy")


def test_cupy_missing_says_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import raises ModuleNotFoundError('cupy')
    assert not lif_cuda.is_available()
    with pytest.raises(RuntimeError, match="cupy is not installed"):
        lif_cuda.require_available()


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "cupy":
            raise self.error


@pytest.mark.parametrize("error", [
    ImportError("libnvrtc.so.12: cannot open shared object file: No such file or directory"),
    ModuleNotFoundError("No module named 'fastrlock'", name="fastrlock"),
])
def test_broken_cupy_reports_real_error(monkeypatch, error):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Refuse(error)] + sys.meta_path)
    assert lif_cuda.unavailable_reason() is not None
    with pytest.raises(RuntimeError) as info:
        lif_cuda.require_available()
    assert str(error) in str(info.value) and "not installed" not in str(info.value)


def test_other_failures_are_reported(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy":
            raise OSError("CUDA driver library is corrupt")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="CUDA driver library is corrupt"):
        lif_cuda.require_available()


def test_verdict_is_cached(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    reason = lif_cuda.unavailable_reason()
    calls = []
    monkeypatch.setattr(lif_cuda, "_probe", lambda: calls.append(1) or (True, None))
    assert lif_cuda.unavailable_reason() == reason and not calls
    lif_cuda._reset_cache()
    assert lif_cuda.is_available() and calls == [1]


def test_auto_falls_back_to_torch_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    x = torch.randn(3, 5)
    assert torch.equal(MultiStepLIF(backend="auto")(x), lif_multistep(x, backend="torch"))


# ------------------------------------------------------------------------------------- GPU

def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not lif_cuda.is_available():
        return f"CuPy backend unusable: {lif_cuda.unavailable_reason()}"
    return None


_GPU_SKIP = _gpu_skip_reason()
needs_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))


def _both(x, gs, v_threshold, detach_reset, tau=2.0):
    out = {}
    for backend in ("cupy", "torch"):
        xi = x.clone().requires_grad_()
        s = lif_multistep(xi, tau, v_threshold, 4.0, detach_reset, backend=backend)
        s.backward(gs)
        out[backend] = (s, xi.grad)
    return out["cupy"], out["torch"]


@needs_gpu
@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (4, 3, 11), (7, 257), (4, 2, 33, 5, 5),
                                   (16, 1000003)])
@pytest.mark.parametrize("grid", [False, True])
def test_gpu_fp32_matches_torch_backend(v_threshold, detach_reset, shape, grid):
    x = _inputs(shape, grid, "cuda")
    gs = torch.randn(shape, device="cuda")
    (s, g), (s_ref, g_ref) = _both(x, gs, v_threshold, detach_reset)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("dtype,spike_tol,grad_tol", [(torch.float16, 2e-3, 5e-3),
                                                      (torch.bfloat16, 5e-3, 1e-2)])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_gpu_16bit_close_to_torch_backend(dtype, spike_tol, grad_tol, detach_reset):
    # Kernel: float math, H rounded once per step; torch rounds after every op, so spikes flip
    # where H sits within an ulp of the threshold. A CPU emulation of the kernel saw at most
    # 1.2e-4 (fp16) / 4.4e-4 (bf16) flipped spikes and 1e-4 / 9e-4 mean gradient difference.
    x = (torch.randn(4, 64, 97, device="cuda") * 1.5 + 0.6).to(dtype)
    gs = torch.randn(4, 64, 97, device="cuda").to(dtype)
    (s, g), (s_ref, g_ref) = _both(x, gs, 1.0, detach_reset)
    assert s.dtype == g.dtype == dtype
    assert (s != s_ref).float().mean() < spike_tol
    assert (g.float() - g_ref.float()).abs().mean() < grad_tol


def _kernel_vs_loops(x, gs, detach_reset, tau=2.0, v_threshold=1.0, backend="cupy"):
    """The kernel (through lif_multistep) against its own arithmetic written in torch
    (lif_reference.kernel_forward): spikes and H bit for bit. Where every H is exact in the
    dtype (float32; special_inputs over at most 4 steps in 16 bits), also bit for bit against the
    torch backend's loops. Input gradients: within the final rounding of the storage type of a
    float32 evaluation by the torch loops from the kernel's own H."""
    xi = x.detach().requires_grad_()  # the view itself: strides and storage offset kept
    s = lif_multistep(xi, tau, v_threshold, 4.0, detach_reset, backend=backend)
    s.backward(gs)
    _, h = lif_forward(x.detach(), tau, v_threshold, True, backend=backend)
    s_em, h_em = kernel_forward(x.detach(), tau, v_threshold, True)
    assert torch.equal(s, s_em), "spikes vs the kernel's arithmetic"
    assert_same(h, h_em, what="H vs the kernel's arithmetic")
    if x.dtype == torch.float32 or x.shape[0] <= 4:
        s_ref, h_ref = lif_forward_torch(x.detach(), tau, v_threshold)
        assert torch.equal(s, s_ref.view_as(s)), "spikes vs the torch backend"
        assert_same(h, h_ref.view_as(h), what="H vs the torch backend")
    T = x.shape[0]
    ref = lif_backward_torch(gs.reshape(T, -1).float(), h.reshape(T, -1).float(), tau, v_threshold,
                             4.0, detach_reset).view(x.shape)
    eps = torch.finfo(x.dtype).eps
    assert_same(xi.grad, ref, rtol=1e-5 if x.dtype == torch.float32 else eps,
                atol=1e-6 if x.dtype == torch.float32 else 2.0 ** -24, what="grad")
    assert xi.grad.dtype == x.dtype and xi.grad.shape == x.shape
    return s, xi.grad


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_selfcheck_passes(dtype):
    assert lif_cuda._self_check(torch.device("cuda"), dtype) is None
    lif_multistep(torch.randn(4, 10, device="cuda").to(dtype))
    assert lif_cuda.disabled_reason("cuda:0", dtype) is None


@needs_gpu
def test_gpu_kernel_really_runs():
    # The autograd node is the same for both backends; the launch counter and the profiler's
    # kernel names are not.
    from torch.profiler import ProfilerActivity, profile

    x = (torch.randn(4, 3, 8, 8, device="cuda") + 0.7).requires_grad_()
    lif_multistep(x).sum().backward()  # first use: self-check
    before = lif_cuda.launch_counts()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        y = MultiStepLIF()(x)  # backend 'auto'
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
    after = lif_cuda.launch_counts()
    assert after["lif_forward_f32"] == before["lif_forward_f32"] + 1
    assert after["lif_backward_f32"] == before["lif_backward_f32"] + 1
    names = {e.name for e in prof.events()}
    assert {"lif_forward_f32", "lif_backward_f32"} <= names, sorted(names)[:50]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_gpu_sizes_and_layouts(dtype, detach_reset):
    shapes = [(1, 1), (1, 7), (3, 255), (3, 256), (3, 257), (2, 1, 3, 1), (8, 2, 33, 5, 5),
              (4, 3 * 65536 + 11)]
    for shape in shapes:
        x = special_inputs(shape, dtype, "cuda")
        _kernel_vs_loops(x, torch.randn(shape, device="cuda").to(dtype), detach_reset)
    base = special_inputs((4, 6, 5, 9), dtype, "cuda")
    views = {"permuted": base.permute(0, 3, 1, 2), "offset": base[:, 1:, :, 2:],
             "strided": base[:, ::2, 1::3], "expanded": base[:1].expand(4, 6, 5, 9)}
    for name, x in views.items():
        assert not x.is_contiguous() or x.storage_offset(), name
        _kernel_vs_loops(x, torch.randn(x.shape, device="cuda").to(dtype), detach_reset)
    for shape in [(4, 0), (4, 0, 3), (1, 0)]:  # empty: no launch, right shapes
        x = torch.empty(shape, device="cuda", dtype=dtype, requires_grad=True)
        s = lif_multistep(x, backend="cupy")
        s.sum().backward()
        assert s.shape == x.grad.shape == shape


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("detach_reset", [True, False])
def test_gpu_special_values(dtype, detach_reset):
    for T in (1, 2, 5):
        x = special_inputs((T, 300), dtype, "cuda", seed=T)
        s, g = _kernel_vs_loops(x, torch.randn(T, 300, device="cuda").to(dtype), detach_reset)
        if T > 1:
            assert g.isnan().any()  # NaN reaches the gradient as in the reference
    sj = pytest.importorskip("spikingjelly.clock_driven.neuron")
    x = special_inputs((5, 300), torch.float32, "cuda")
    gs = torch.randn(5, 300, device="cuda")
    s, g = _kernel_vs_loops(x, gs, detach_reset)
    xr = x.clone().requires_grad_()
    s_sj = sj.MultiStepLIFNode(tau=2.0, detach_reset=detach_reset, backend="torch")(xr)
    s_sj.backward(gs)
    assert torch.equal(s, s_sj)
    assert_same(g, xr.grad, atol=1e-6)


@needs_gpu
@pytest.mark.slow
def test_gpu_fp16_beyond_int32_indexing():
    # T * N > 2^31 elements: element offsets of the last steps overflow 32-bit integers.
    T, N = 4, (1 << 29) + 3
    torch.cuda.empty_cache()
    x = (torch.randint(-8, 13, (T, N), device="cuda", dtype=torch.int8).half() * 0.25)
    assert x.numel() > 2 ** 31
    gs = torch.ones(T, N, device="cuda", dtype=torch.half)
    spikes, h = lif_forward(x, 2.0, 1.0, True, backend="cupy")
    grad = lif_backward(gs, h, 2.0, 1.0, 4.0, True, backend="cupy")
    for cols in (slice(0, 4096), slice(N - 4096, N)):  # neurons are independent: slice them
        xs = x[:, cols].contiguous()
        s_ref, h_ref = lif_forward_torch(xs, 2.0, 1.0)
        assert torch.equal(spikes[:, cols], s_ref) and torch.equal(h[:, cols], h_ref)
        g_ref = lif_backward_torch(gs[:, cols].float(), h_ref.float(), 2.0, 1.0, 4.0, True)
        assert_same(grad[:, cols], g_ref, rtol=torch.finfo(torch.half).eps, atol=2.0 ** -24)
    del x, gs, spikes, h, grad
    torch.cuda.empty_cache()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_side_stream_race(dtype):
    # The producer of the input (and of the incoming gradient) is queued behind a long sleep on
    # a side stream: a kernel launched anywhere but on torch's current stream would read the
    # memory before it is written.
    T, N = 4, 1 << 20
    a = special_inputs((T, N), dtype, "cuda")
    up = torch.randn(T, N, device="cuda").to(dtype)
    xr = a.clone().requires_grad_()  # reference: the same kernel, no other stream involved
    s_ref = lif_multistep(xr, backend="cupy")
    s_ref.backward(up)
    g_ref = xr.grad
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~0.05 s of GPU time on `side`
        x = (a * 1).requires_grad_()
        s = lif_multistep(x, backend="cupy")
        torch.cuda._sleep(100_000_000)
        gy = up * 1
        s.backward(gy)
    side.synchronize()
    assert torch.equal(s, s_ref)
    assert_same(x.grad, g_ref)  # bit for bit: same kernel, same inputs


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_second_device():
    with torch.cuda.device(0):  # current device 0, tensor on 1: kernels loaded on device 1
        x = special_inputs((4, 1000), torch.float32, "cuda:1")
        _kernel_vs_loops(x, torch.randn(4, 1000, device="cuda:1"), True)


@needs_gpu
@pytest.mark.slow
def test_gpu_amp_training_kernel_vs_torch_backend():
    """A few fp16 AMP steps (GradScaler) of the CIFAR-10 model with the kernel and with the torch
    backend, from the same weights on the same batches. The two 16-bit paths round differently
    (the kernel once per step, torch after every op), spikes flip and the network amplifies the
    flips, so they are compared through their distance to an fp32 run: the kernel must be as
    close to it as the torch backend is."""
    import timm

    torch.manual_seed(0)
    base = timm.create_model("qkformer_cifar10", fast_path=False).cuda()  # per-module backends
    runs = {}
    for name, backend, amp in (("fp32", "torch", False), ("kernel", "auto", True),
                               ("torch", "torch", True)):
        model = copy.deepcopy(base)
        for m in model.modules():
            if isinstance(m, MultiStepLIF):
                m.backend = backend
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        g = torch.Generator().manual_seed(1)
        losses, first_grad = [], None
        for _ in range(3):
            x = torch.randn(16, 3, 32, 32, generator=g).cuda()
            y = torch.randint(0, 10, (16,), generator=g).cuda()
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if first_grad is None:
                first_grad = torch.cat([p.grad.flatten().float() for p in model.parameters()])
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        runs[name] = (losses, first_grad, scaler.get_scale() if amp else None)
    counts = lif_cuda.launch_counts()
    assert counts.get("lif_forward_f16", 0) > 0 and counts.get("lif_backward_f16", 0) > 0
    ref_losses, ref_grad, _ = runs["fp32"]
    cos = {k: torch.nn.functional.cosine_similarity(runs[k][1], ref_grad, dim=0).item()
           for k in ("kernel", "torch")}
    assert all(math.isfinite(v) for k in ("kernel", "torch") for v in runs[k][0]), runs
    for lk, lt, lr in zip(runs["kernel"][0], runs["torch"][0], ref_losses):
        assert abs(lk - lr) <= 2 * abs(lt - lr) + 0.02 * abs(lr), (runs, cos)
    assert cos["kernel"] >= cos["torch"] - 0.1, cos
    assert runs["kernel"][2] == runs["torch"][2]  # no overflow seen by one and not the other
    print(f"AMP losses {runs}, gradient cosine to fp32 {cos}")


@needs_gpu
@pytest.mark.slow
def test_gpu_torch_compile_fullgraph_uses_the_kernel():
    import timm

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              T=2, fast_path=False).cuda()
    ref = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.tensor([1, 3, 0, 2], device="cuda")
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    before = lif_cuda.launch_counts().get("lif_backward_f32", 0)
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    assert lif_cuda.launch_counts()["lif_backward_f32"] > before
    ref_loss = torch.nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-3, atol=1e-4, msg=name)


@needs_gpu
def test_gpu_contract():
    x = torch.randn(4, 3, 8, 8, device="cuda").permute(0, 2, 3, 1).detach().requires_grad_()
    assert not x.is_contiguous()
    y = MultiStepLIF(backend="auto")(x)
    assert lif_cuda.launch_counts().get("lif_forward_f32", 0) > 0  # 'auto' picked the kernel
    assert torch.equal(y, lif_multistep(x.detach(), backend="torch"))
    y.sum().backward()
    assert x.grad.shape == x.shape
    with torch.no_grad():  # inference: nothing saved, nothing to differentiate
        assert torch.equal(lif_multistep(x, backend="cupy"), y)
    x64 = x.detach().double().requires_grad_()  # no float64 kernel: torch loops, same result
    s64 = lif_multistep(x64, backend="cupy")
    s64.sum().backward()
    assert torch.equal(s64, y.double()) and x64.grad.dtype == torch.float64
    torch.testing.assert_close(x64.grad.float(), x.grad, rtol=0, atol=1e-6)
    assert lif_multistep(torch.empty(4, 0, device="cuda"), backend="cupy").shape == (4, 0)


if lif_cuda.kernel_required():  # CI on a GPU runner: skipping is failure
    def test_gpu_backend_required():
        assert torch.cuda.is_available(), "QKFORMER_REQUIRE_CUDA_KERNEL set but no CUDA device"
        lif_cuda.require_available()
