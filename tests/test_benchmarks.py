"""Smoke tests of the benchmark scripts: each quick mode runs to the end and prints its summary.
Speeds are not asserted (they depend on the machine and its load)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _run(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_train_step_quick():
    out = _run("train_step.py", "--quick")
    assert "GEMM peak" in out and "GEMM FLOPs per step" in out and "fast-path inputs" in out
    for config in ("baseline", "fp32", "folded"):
        assert any(line.startswith(config + " ") for line in out.splitlines()), \
            f"no table row for {config}:\n{out}"
    ratios = [line for line in out.splitlines() if line.startswith("ratio: ")]
    for label in ("fp32 train step vs baseline", "fp32 train peak memory vs baseline",
                  "folded eval vs baseline", "plain eval (model.eval(), no_grad) vs baseline",
                  "bf16 train step vs fp32 baseline"):
        assert any(label in line for line in ratios), f"no ratio line '{label}':\n{out}"
    assert all(("PASS" in line or "FAIL" in line or "not measured" in line)
               for line in ratios if "target" in line)


def test_memory_quick():
    out = _run("memory.py", "--quick", "--steps", "1")
    for label in ("saved bytes per image, ours (default) vs original",
                  "saved bytes per image, checkpointed vs original",
                  "step time, compact storage on vs off", "step time, checkpointed vs ours"):
        assert any(label in line for line in out.splitlines() if line.startswith("ratio: ")), out
    assert "largest per-GPU batch" in out and " in 32 GB" in out and " in 80 GB" in out


def test_train_step_cuda_variant():
    out = _run("train_step.py", "--device", "cuda", "--quick")
    if not torch.cuda.is_available():
        assert "no CUDA device: GPU train-step benchmark skipped" in out
    else:
        assert any(line.startswith("ratio: ") for line in out.splitlines())


def test_attention_cost_small(tmp_path):
    out = _run("attention_cost.py", "--ns", "64", "128", "--qk-first-max-n", "128",
               "--repeats", "1", "--out", str(tmp_path))
    assert "SSA/QKTA at N=128" in out and "SSA qk_first/QKTA at N=128" in out
    assert (tmp_path / "attention_cost.csv").is_file()


@pytest.mark.skipif(not (BENCH / "lif_gpu.py").is_file(), reason="no benchmarks/lif_gpu.py")
def test_lif_gpu_benchmark_runs():
    out = _run("lif_gpu.py", "--iters", "2")
    if not torch.cuda.is_available():
        assert "no CUDA device: GPU LIF benchmark skipped" in out


@pytest.mark.skipif(not (BENCH / "lif.py").is_file(), reason="no benchmarks/lif.py")
def test_lif_benchmark_quick():
    out = _run("lif.py", "--quick")
    assert out.strip()
