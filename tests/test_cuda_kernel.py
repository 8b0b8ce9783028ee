"""The CuPy LIF backend: kernel source, loader error paths, the kernel against the torch backend.

Three levels, so that a machine without a GPU still checks the kernel's arithmetic:
* nvcc compiles the source to PTX with every expected entry point, whose parameter lists match
  the arguments the loader passes;
* nvcc builds the kernel's per-neuron loops into a CPU program, whose output must equal the torch
  backend (the exact code the GPU threads run, minus the launch);
* on a CUDA machine with a working CuPy, the launched kernels against the torch backend.
"""
import builtins
import importlib.abc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qkformer import cuda as lif_cuda
from qkformer.neuron import MultiStepLIF, lif_backward_torch, lif_forward_torch, lif_multistep

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


# ------------------------------------------------------------------------ loader error paths


def test_cpu_tensor_is_refused():
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        lif_multistep(torch.randn(2, 3), backend="cupy")
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        lif_cuda.LIFCupyFunction.apply(torch.randn(2, 3), 2.0, 1.0, 4.0, True)


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


@needs_gpu
def test_gpu_contract():
    x = torch.randn(4, 3, 8, 8, device="cuda").permute(0, 2, 3, 1).detach().requires_grad_()
    assert not x.is_contiguous()
    y = MultiStepLIF(backend="auto")(x)
    assert type(y.grad_fn).__name__ == "LIFCupyFunctionBackward"  # 'auto' picked the kernel
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


@needs_gpu
def test_gpu_runs_on_torch_stream():
    stream = torch.cuda.Stream()
    x = torch.randn(8, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        y = lif_multistep(x * 1.0, backend="cupy")  # x * 1.0 queued on `stream` just before
    stream.synchronize()
    assert torch.equal(y, lif_multistep(x, backend="torch"))


if os.environ.get("QKFORMER_REQUIRE_CUDA_KERNEL"):  # CI on a GPU runner: skipping is failure
    def test_gpu_backend_required():
        assert torch.cuda.is_available(), "QKFORMER_REQUIRE_CUDA_KERNEL set but no CUDA device"
        lif_cuda.require_available()
