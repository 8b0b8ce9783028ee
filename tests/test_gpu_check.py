"""benchmarks/gpu_check.sh: its parts' timeouts fit a 10-minute GPU window, most important first;
on a machine without CUDA it must run end to end in seconds, say "no CUDA device", write its
results where $OUT points, and list every GPU part as skipped; its helper scripts exit cleanly
without CUDA."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
WINDOW_S = 420  # of a 10-minute GPU window: the rest is the machine's start and the transfers
# The parts in order of importance (prefixes of their names).
ORDER = ("versions", "self-checks", "fast vs reference path", "HST-10-384 b32 AMP", "peak memory",
         "DDP", "torch.compile")


def dry_run() -> tuple[list, int]:
    """[(part name, timeout s)] in the order the script runs them, and its default budget."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1"}
    env.pop("GPU_CHECK_BUDGET", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fields = [line.split("\t") for line in proc.stdout.splitlines()]
    parts = [(f[1], int(f[2])) for f in fields if f[0] == "part"]
    budgets = [int(f[1]) for f in fields if f[0] == "budget"]
    assert len(budgets) == 1 and all(len(f) == 3 for f in fields if f[0] == "part"), proc.stdout
    return parts, budgets[0]


def test_gpu_check_fits_the_window():
    parts, budget = dry_run()
    assert sum(limit for _, limit in parts) <= WINDOW_S, parts
    assert budget <= WINDOW_S
    assert all(limit > 0 for _, limit in parts), parts
    names = [name for name, _ in parts]
    assert len(names) == len(set(names)) == len(ORDER), names
    assert all(name.startswith(prefix) for name, prefix in zip(names, ORDER)), names


def test_gpu_check_helpers_compile():
    for script in sorted((REPO / "benchmarks").glob("gpu_*.py")):
        compile(script.read_text(), str(script), "exec")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would run the full check")
def test_gpu_check_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DIR", None)
    env.pop("GPU_CHECK_DRY_RUN", None)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: GPU checks skipped" in proc.stdout
    results = tmp_path / "gpu_check"
    assert f"results: {results}" in proc.stdout
    summary = (results / "summary.txt").read_text()
    assert f"torch: {torch.__version__}" in summary and "CUDA device: no CUDA device" in summary
    assert "kernel verdict: " in summary and "LIF backend: torch (CPU tensors)" in summary
    table = summary[summary.index("\npart "):].splitlines()[2:]
    parts, _ = dry_run()
    assert len(table) == len(parts), summary
    for line, (name, _) in zip(table, parts):  # every part listed, in the order it would run
        assert line.startswith(name), (line, name)
        status, note = line[len(name):].split(None, 2)[0], line[len(name):].split(None, 2)[2]
        if name.startswith("versions"):
            assert status == "PASS", line
        else:
            assert status == "SKIP" and note == "no CUDA device", line
    assert elapsed < 60, f"took {elapsed:.0f} s"


@pytest.mark.skipif(torch.cuda.is_available(), reason="they would run their GPU checks")
@pytest.mark.parametrize("args", [["gpu_selfcheck.py"], ["gpu_step.py", "time"],
                                  ["gpu_step.py", "memory"], ["gpu_ddp.py"], ["gpu_compile.py"]],
                         ids=" ".join)
def test_gpu_helpers_skip_without_cuda(args):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / args[0]), *args[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no CUDA device: GPU ") and "skipped" in proc.stdout, proc.stdout


def test_lif_latency_benchmark_runs():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lif_latency.py"), "--iters",
                           "2", "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert sum(" torch   eager " in r for r in rows) == 3, proc.stdout  # three sizes, both paths
    assert sum(" torch   custom op " in r for r in rows) == 3, proc.stdout
    assert all(float(r.split()[-1]) > 0 and float(r.split()[-2]) > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="it would load the cupy neuron")
def test_gpu_step_original_keeps_this_packages_lif_where_spikingjellys_cupy_cannot_run():
    gpu_step, common = benchmark_module("gpu_step"), benchmark_module("_common")
    model = common.build("quick", "reference")
    line = gpu_step._original_neurons(model)
    assert line.startswith("neurons: this package's CuPy LIF (spikingjelly's cupy backend "
                           "unavailable: "), line
    assert not any(isinstance(m, common.SpikingjellyLIF) for m in model.modules())


def test_spikingjelly_neurons_swapped_in_give_the_reference_logits_and_gradients():
    """The swap gpu_step makes for the original (there on the cupy backend; here its torch
    backend, the same arithmetic): every neuron replaced, the same logits and gradients."""
    pytest.importorskip("spikingjelly")
    common = benchmark_module("_common")
    from qkformer.neuron import MultiStepLIF
    model = common.build("quick", "reference")
    x, _ = common.batch("quick", model, 2)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n_lif = sum(isinstance(m, MultiStepLIF) for m in model.modules())
    assert common.swap_in_spikingjelly(model, "torch") == n_lif > 0
    assert not any(isinstance(m, MultiStepLIF) for m in model.modules())
    out2 = model(x)
    out2.square().sum().backward()
    assert torch.equal(out2, out)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
