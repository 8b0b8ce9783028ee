"""benchmarks/gpu_check.sh on a machine without CUDA: it must run end to end in seconds, say
"no CUDA device", write its results where $OUT points, and list every GPU part as skipped."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would run the full check")
def test_gpu_check_without_cuda(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DIR", None)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device: GPU checks skipped" in proc.stdout
    results = tmp_path / "gpu_check"
    assert f"results: {results}" in proc.stdout
    summary = (results / "summary.txt").read_text()
    assert f"torch: {torch.__version__}" in summary and "CUDA device: no CUDA device" in summary
    assert "kernel verdict: " in summary and "LIF backend: torch (CPU tensors)" in summary
    rows = [line for line in summary.splitlines() if "  SKIP  " in line or " PASS " in line]
    assert rows[0].startswith("versions and backend verdict") and " PASS " in rows[0]
    skipped = [line for line in rows[1:] if line.split()[-3:] == ["no", "CUDA", "device"]]
    assert len(skipped) >= 12 and all("SKIP" in line for line in skipped), summary
    for part in ("side-stream race", "fp16, T*N > 2^31", "AMP fp16 training", "benchmarks/lif_gpu.py",
                 "benchmarks/train_step.py --device cuda", "torchrun 1 GPU"):
        assert any(line.startswith(part) for line in skipped), part
    assert elapsed < 60, f"took {elapsed:.0f} s"


def test_lif_latency_benchmark_runs():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lif_latency.py"), "--iters",
                           "2", "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert sum(" torch   eager " in r for r in rows) == 3, proc.stdout  # three sizes, both paths
    assert sum(" torch   custom op " in r for r in rows) == 3, proc.stdout
    assert all(float(r.split()[-1]) > 0 and float(r.split()[-2]) > 0 for r in rows)
