"""benchmarks/gpu_cost.py counts what a GPU step would run, on the CPU: the counts must be of
the step (both paths do the same GEMM work; the LIF is one kernel per pass; the original's
computation never waits on the device), not artefacts of the counter."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

REPO = Path(__file__).resolve().parents[1]


def _rows(out: str, model: str) -> dict:
    block = out.split(f"\n{model}:", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines():
        for label in ("kernel launches / step", "non-GEMM bytes / image (MB)",
                      "GEMM GFLOP / image", "peak live memory / image (MB)",
                      "host synchronisations / step"):
            if line.startswith(label):
                rows[label] = [float(v.rstrip("x")) for v in line[len(label):].split()]
    return rows


def test_gpu_cost_quick():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_cost.py", "--quick", "--torch-ops"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("quick", "quick-dvs"):
        rows = _rows(proc.stdout, model)
        assert len(rows) == 5, rows
        launches, nbytes, gflop, peak, syncs = (rows[k] for k in rows)
        # columns: original, CUDA fallback, Triton route, torch ops; then the three ratios
        assert min(launches[:4]) > 0 and min(nbytes[:4]) > 0 and min(peak[:4]) > 0
        for row, tol in ((launches, 0.01), (nbytes, 0.1), (peak, 0.3)):  # the printed ratios
            for col in (1, 2, 3):  # (of figures rounded to 0.1)
                assert abs(row[col] / row[0] - row[3 + col]) <= tol * row[3 + col] + 0.01, row
        # the original's neuron moves more than the lean kernel on the same arithmetic
        assert nbytes[0] > nbytes[1] and launches[0] > launches[1] and peak[0] > peak[1]
        # the same GEMMs on every route; the Triton attention kernels recompute a few products
        assert gflop[0] == gflop[1] == gflop[3] <= gflop[2] <= 1.02 * gflop[0] + 0.1
        assert syncs[0] == syncs[1] == syncs[2] == 0  # none of the GPU routes waits
        assert syncs[3] > 0  # the torch-op form's packing check reads a device value
    assert "lif_forward (kernel)" in proc.stdout and "lif_backward (kernel)" in proc.stdout
    triton = proc.stdout.split("most launched, fast, Triton: ", 1)[1].splitlines()[0]
    assert "(triton)" in triton and "lif_forward" not in triton  # the LIF runs inside the units
    assert "targets (Triton route / original): " in proc.stdout
    assert "the Triton route / the CUDA fallback" in proc.stdout


def test_gpu_cost_counts_the_fused_gemms_as_gemms():
    """--fused-gemms: the Triton GEMMs count as the GEMM work they replace (same GFLOP as the
    default route's), and the passes they absorb leave the non-GEMM bytes."""
    out = {}
    for flag in ((), ("--fused-gemms",)):
        proc = subprocess.run([sys.executable, "benchmarks/gpu_cost.py", "--models", "quick",
                               *flag], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[flag] = (_rows(proc.stdout, "quick"), proc.stdout)
    (plain, _), (fused, text) = out[()], out[("--fused-gemms",)]
    assert "gemm_kernel (triton)" in text.split("most launched, Triton+GEMMs: ", 1)[1]
    assert fused["GEMM GFLOP / image"][2] == plain["GEMM GFLOP / image"][2]
    assert fused["non-GEMM bytes / image (MB)"][2] < plain["non-GEMM bytes / image (MB)"][2]
    assert fused["non-GEMM bytes / image (MB)"][:2] == plain["non-GEMM bytes / image (MB)"][:2]


@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
def test_original_neuron_model_computes_spikingjellys_values(v_threshold):
    """The stand-in for the original's cupy neuron returns spikingjelly's spikes and V, and its
    backward spikingjelly's input gradient (float64, torch backend as the oracle)."""
    sj = pytest.importorskip("spikingjelly.clock_driven.neuron")
    gpu_cost = benchmark_module("gpu_cost")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 3, 4, generator=g, dtype=torch.float64) * 2.5).requires_grad_()
    up = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    node = sj.MultiStepLIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True,
                               backend="torch")
    xr = x.detach().clone().requires_grad_()
    s_ref = node(xr)
    (s_ref * up).sum().backward()
    counter = gpu_cost.StepCounter()
    s, v = gpu_cost._CupyNodeTraffic.apply(x.flatten(1), torch.zeros(12, dtype=x.dtype), counter,
                                           2.0, v_threshold, 4.0)
    (s.view_as(x) * up).sum().backward()
    assert torch.equal(s.view_as(x), s_ref)
    assert torch.equal(v.view_as(x), node.v_seq)
    assert torch.allclose(x.grad, xr.grad, rtol=1e-12, atol=1e-15)
    assert s_ref.sum() > 0 and (s_ref == 0).any()  # both branches of the threshold exercised


def test_original_neuron_model_moves_what_its_kernel_and_buffers_move():
    """Closed form, per neuron over T steps in 16 bits (2 bytes a value): forward zeros(3T)
    (3T), cat of V_0 and V (1 + T read, T + 1 written), the kernel (X, V with T + 1 rows, H, S),
    the starting zeros (1) and the module's copy of the last V (1 + 1); backward the
    materialised zero gradient of V (T), zeros(T + 1), the kernel (two gradients, H, S, the
    T + 1 rows written). Saved across the step: the 3T buffer and V's T + 1 rows."""
    gpu_cost = benchmark_module("gpu_cost")
    T, N = 4, 6
    layer = torch.nn.Sequential(torch.nn.Identity())
    from qkformer.neuron import MultiStepLIF
    layer.append(MultiStepLIF())
    x = torch.randn(T, 2, 3, dtype=torch.bfloat16, requires_grad=True)
    counter = gpu_cost.StepCounter()
    restore, reset_net = gpu_cost._count_lif_as_cupy_node(counter)
    try:
        with counter:
            out = layer(x)
            fwd, live = counter.by_op.copy(), counter.live
            out.backward(torch.ones_like(out))
        bwd = counter.by_op - fwd
    finally:
        restore()
    reset_net()
    two = 2
    assert fwd["zeros"] == (3 * T + 1) * N * two  # the buffer, the starting potential
    assert fwd["cat"] == ((1 + T) + (T + 1)) * N * two
    assert fwd["lif_forward (kernel)"] == (T + (T + 1) + T + T) * N * two
    assert fwd["clone"] == 2 * N * two
    assert live >= (3 * T + (T + 1)) * N * two
    assert bwd["zeros"] == (T + (T + 1)) * N * two  # the materialised gradient, the buffer
    assert bwd["lif_backward (kernel)"] == (T + T + T + T + (T + 1)) * N * two
    # forward: 2 zeros, cat, kernel, clone; the upstream ones; backward: 2 zeros, kernel
    assert counter.launches == 5 + 1 + 3, counter.launch_ops

