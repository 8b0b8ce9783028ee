"""Building and loading the fast path's CPU kernels, and running without them.

Each case runs in a fresh interpreter with its own cache folder, so the build really happens
(the suite's other tests share the user's cache).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkformer import cpu

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import torch, timm, qkformer
from qkformer import cpu, fused
print("library", cpu.library() is not None, cpu.unavailable_reason())
torch.manual_seed(0)
m = timm.create_model("qkformer_cifar10", embed_dims=16, depths=(1, 1, 1), num_heads=2, T=2)
x = torch.randn(2, 3, 16, 16)
out = m(x)
out.sum().backward()
print("forward", tuple(out.shape), bool(torch.isfinite(out).all()))
print(fused.describe(m, "cpu"))
"""


def _probe(tmp_path, **env):
    # a fixed sparsity limit: these builds into empty caches need not measure one each
    full = {**os.environ, "QKFORMER_CACHE_DIR": str(tmp_path / "cache"),
            "QKFORMER_SPARSE_MAX_DENSITY": "0.33", **env}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_kernels_build_into_an_empty_cache(tmp_path):
    out = _probe(tmp_path)
    assert "library True None" in out and "forward (2, 10) True" in out
    built = list((tmp_path / "cache").glob("fused_kernels-*.so"))
    assert len(built) == 1  # one build, named by the hash of sources, flags, compiler and CPU
    assert "compiled CPU kernels" in out
    assert not list((tmp_path / "cache").glob(".fused_kernels-*"))  # no temporary left over
    again = _probe(tmp_path)  # the second process loads the cached build
    assert "library True None" in again and list((tmp_path / "cache").glob("*.so")) == built


def test_disabled_kernels_fall_back_to_torch_ops(tmp_path):
    out = _probe(tmp_path, QKFORMER_CPU_KERNELS="0")
    assert "library False disabled by QKFORMER_CPU_KERNELS=0" in out
    assert "forward (2, 10) True" in out
    assert "fused units in torch ops, since the CPU kernels are unavailable" in out
    assert not (tmp_path / "cache").exists()


def test_no_compiler_is_reported_not_fatal(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _probe(tmp_path, PATH=str(empty), CXX="", QKFORMER_REQUIRE_CPU_KERNELS="0")
    assert "library False RuntimeError: no C++ compiler found" in out
    assert "forward (2, 10) True" in out


def test_required_kernels_make_a_failed_build_an_error(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "QKFORMER_CACHE_DIR": str(tmp_path / "cache"), "PATH": str(empty),
           "CXX": "", "QKFORMER_REQUIRE_CPU_KERNELS": "1", "QKFORMER_SPARSE_MAX_DENSITY": "0.33"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "QKFORMER_REQUIRE_CPU_KERNELS is set but the CPU kernels are unavailable" in proc.stderr
    # an explicit QKFORMER_CPU_KERNELS=0 is a choice, not a failure
    assert "library False disabled" in _probe(tmp_path, QKFORMER_CPU_KERNELS="0",
                                              QKFORMER_REQUIRE_CPU_KERNELS="1")


KERNELS_PROBE = """
import sys, torch
from qkformer import cpu, fused, sparse
print("threaded", cpu.threaded())
g = torch.Generator().manual_seed(0)
def run():
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        y = (torch.randn(4, 2, 16, 16, 384, generator=g) * 2).to(dtype)  # 3 parts of rows
        grad = torch.randn(y.shape, generator=g).to(dtype)
        C = y.shape[-1]
        scale, shift = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
        if dtype == torch.float64:
            scale, shift = scale.double(), shift.double()
        yp = (torch.randn(8, 32, 32, 64, generator=g) * 2).to(dtype)  # pooled: 2 parts of images
        sp, shp = scale[:64].contiguous(), shift[:64].contiguous()
        s = fused.bn_lif_forward(y, 4, scale, shift, 2.0, 1.0)
        out[f"{dtype} stats"] = torch.stack(fused.batch_stats(y))
        out[f"{dtype} fwd"] = s
        gz, sums = fused.bn_lif_backward(grad, y, 4, scale, shift, 2.0, 1.0, 4.0, False, sums=True)
        out[f"{dtype} bwd"], out[f"{dtype} sums"] = gz, sums
        out[f"{dtype} apply"] = fused._bn_input_grad(gz, y, scale, scale, shift, scale)
        out[f"{dtype} pool fwd"] = fused.bn_lif_forward(yp, 4, sp, shp, 2.0, 1.0, pool=True)
        out[f"{dtype} pool bwd"] = torch.cat([t.flatten().double() for t in fused.bn_lif_backward(
            torch.randn(8, 16, 16, 64, generator=g).to(dtype), yp, 4, sp, shp, 2.0, 1.0, 4.0,
            True, pool=True, sums=True)])
        packed, how = fused.pack(s, fused.SPIKES)
        assert how is not None and torch.equal(fused.unpack(packed, how), s)
        counts = (s + s).contiguous()
        packed_u8, how_u8 = fused.pack(counts, fused.COUNTS)
        assert how_u8 is not None and torch.equal(fused.unpack(packed_u8, how_u8), counts)
        out[f"{dtype} bits"], out[f"{dtype} bytes"] = packed, packed_u8
        if sparse.enabled(dtype, y.device):
            x = s.reshape(8, 16, 16, 384)[:, :, :, :96].contiguous()
            csr = sparse.csr_from_dense(x, 1.0)
            w = torch.randn(64, 96, 3, 3, generator=g).to(dtype)
            out[f"{dtype} spconv"] = sparse.forward(csr, x.shape, w, None, 3, 1)
            dy = torch.randn(8, 16, 16, 64, generator=g).to(dtype)
            out[f"{dtype} spconv dw"] = sparse.weight_grad(csr, x.shape, dy, w, 3, 1)
            for co in (12, 24, 40):  # output channels past a vector: a tail on some ISAs only
                for k in (0, 3):
                    wk = torch.randn(co, 96, max(k, 1), max(k, 1), generator=g).to(dtype)
                    dyk = torch.randn(8, 16, 16, co, generator=g).to(dtype)
                    out[f"{dtype} spconv fwd k{k} co{co}"] = sparse.forward(csr, x.shape, wk, None, k, 1)
                    out[f"{dtype} spconv dw k{k} co{co}"] = sparse.weight_grad(csr, x.shape, dyk, wk, k, 1)
    return out
torch.set_num_threads(1)
one = run()
g.manual_seed(0)
torch.set_num_threads(2)
two = run()
for k in one:
    assert torch.equal(one[k], two[k]), f"{k}: 1 and 2 threads differ"
torch.save(two, sys.argv[1])
print("same over threads", len(one))
"""


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


BUILDS = {"openmp": {"QKFORMER_CPU_OPENMP": "1"}, "no-openmp": {"QKFORMER_CPU_OPENMP": "0"}}
if _has_avx2():  # the kernels of an AVX2-only CPU (on this one they may be AVX-512)
    BUILDS["avx2"] = {"QKFORMER_CPU_OPENMP": "1", "QKFORMER_CPU_ISA": "avx2"}


@pytest.mark.slow
def test_kernel_results_do_not_depend_on_threads_openmp_or_isa(tmp_path):
    """The parts of a call are fixed by the problem size alone and the arithmetic by the source
    (64-byte vectors of GCC's extensions whatever the ISA, no contraction): one thread, two
    threads, a build without OpenMP and a build for AVX2 only give the same bits."""
    results = {}
    for build, extra in BUILDS.items():
        path = tmp_path / f"{build}.pt"
        env = {**os.environ, "QKFORMER_CACHE_DIR": str(tmp_path / f"cache-{build}"), **extra}
        proc = subprocess.run([sys.executable, "-c", KERNELS_PROBE, str(path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"threaded {extra['QKFORMER_CPU_OPENMP'] == '1'}" in proc.stdout
        assert "same over threads" in proc.stdout
        results[build] = torch.load(path)
    first, *others = BUILDS
    assert len(results[first]) >= 20
    for build in others:
        assert results[build].keys() == results[first].keys()
        for k, v in results[first].items():
            assert torch.equal(v, results[build][k]), f"{k}: the {build} build differs"


def test_isa_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("QKFORMER_CPU_ISA", "avx3")
    monkeypatch.setattr(cpu, "_probed", False)
    with pytest.raises(ValueError, match="QKFORMER_CPU_ISA='avx3'"):
        cpu.library()
    monkeypatch.setenv("QKFORMER_CPU_ISA", "native")
    assert cpu.isa() == "native"


FORK_PROBE = """
import os, sys, torch
from qkformer import fused
torch.set_num_threads(2)
y = torch.randn(4, 2, 64, 64, 96)  # several parts: an OpenMP team in this process
scale, shift = torch.rand(96) + 0.5, torch.randn(96)
expected = fused.bn_lif_forward(y, 4, scale, shift, 2.0, 1.0)
pid = os.fork()
if pid == 0:  # a team cannot start here: the kernels must run on this thread, not hang
    try:
        torch.save(fused.bn_lif_forward(y, 4, scale, shift, 2.0, 1.0), sys.argv[1])
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
torch.set_num_threads(1)
print("child", status, torch.equal(torch.load(sys.argv[1]), expected))
"""


def test_kernels_run_in_a_forked_child(tmp_path):
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE, str(tmp_path / "child.pt")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child 0 True" in proc.stdout
