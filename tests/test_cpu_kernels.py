"""Building and loading the fast path's CPU kernels, and running without them.

Each case runs in a fresh interpreter with its own cache folder, so the build really happens
(the suite's other tests share the user's cache).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    full = {**os.environ, "QKFORMER_CACHE_DIR": str(tmp_path / "cache"), **env}
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
    out = _probe(tmp_path, PATH=str(empty), CXX="")
    assert "library False RuntimeError: no C++ compiler found" in out
    assert "forward (2, 10) True" in out
