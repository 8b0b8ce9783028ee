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
        assert launches[0] > 0 and launches[1] > 0 and nbytes[0] > 0 and peak[0] > 0
        assert abs(launches[1] / launches[0] - launches[2]) < 0.01  # the printed ratio
        assert syncs[0] == 0  # the reference path with the LIF kernel never syncs
    assert "lif_forward (kernel)" in proc.stdout and "lif_backward (kernel)" in proc.stdout
