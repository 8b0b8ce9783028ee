"""benchmarks/gpu_cost.py counts what a GPU step would run, on the CPU: the counts must be of
the step (both paths do the same GEMM work; the LIF is one kernel per pass; the original's
computation never waits on the device), not artefacts of the counter."""
import subprocess
import sys
from pathlib import Path

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
    proc = subprocess.run([sys.executable, "benchmarks/gpu_cost.py", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("quick", "quick-dvs"):
        rows = _rows(proc.stdout, model)
        assert len(rows) == 5, rows
        launches, nbytes, gflop, peak, syncs = (rows[k] for k in rows)
        # columns: original, fast as torch ops, fast on the Triton route; then the two ratios
        assert min(launches[:3]) > 0 and min(nbytes[:3]) > 0 and min(peak[:3]) > 0
        for row, tol in ((launches, 0.01), (nbytes, 0.1), (peak, 0.3)):  # the printed ratios
            for col, ratio in ((1, row[3]), (2, row[4])):  # (of figures rounded to 0.1)
                assert abs(row[col] / row[0] - ratio) <= tol * ratio + 0.01, row
        # the same GEMMs on every route; the Triton attention kernels recompute a few products
        assert gflop[0] == gflop[1] <= gflop[2] <= 1.02 * gflop[0] + 0.1  # (printed to 0.1)
        assert syncs[0] == 0 and syncs[2] == 0  # the original and the Triton route never wait
        assert syncs[1] > 0  # the torch-op form's packing check reads a device value
    assert "lif_forward (kernel)" in proc.stdout and "lif_backward (kernel)" in proc.stdout
    triton = proc.stdout.split("most launched, fast, Triton: ", 1)[1].splitlines()[0]
    assert "(triton)" in triton and "lif_forward" not in triton  # the LIF runs inside the units
    assert "targets (Triton route / original): " in proc.stdout


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
