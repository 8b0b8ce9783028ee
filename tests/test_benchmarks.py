"""Smoke tests of the benchmark scripts: each quick mode runs to the end and prints its summary.
Speeds are not asserted (they depend on the machine and its load)."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module

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


def test_lif_gpu_benchmark_runs():
    out = _run("lif_gpu.py", "--iters", "2")
    if not torch.cuda.is_available():
        assert out.strip() == "no CUDA device: GPU LIF benchmark skipped"
        return
    # one row per candidate and case: a positive time and finite ratios to the reference
    rows = re.findall(r"^  (.+?)\s+(\S+) ms\s+(\S+) MiB peak \|\s+(\S+)x time\s+(\S+)x memory",
                      out, re.M)
    assert rows and any(name.strip() == "qkformer torch" for name, *_ in rows), out
    for name, ms, _, time_ratio, mem_ratio in rows:
        assert float(ms) > 0 and math.isfinite(float(time_ratio)), f"{name}: {out}"


def test_gemm_fusion_benchmark_finds_the_projections():
    """The projections it times are the model's own: those of a quick model's forward, with
    how each input is kept; without CUDA it says it skipped."""
    shapes = benchmark_module("gpu_gemm_fusion").projection_shapes("quick", 4)
    kinds = {fmt for (_, _, _, _, fmt) in shapes}
    assert shapes and kinds == {"bits", "u8"}, shapes
    assert all(rows % 4 == 0 and k > 0 and n > 0 for rows, k, n, _, _ in shapes)
    if not torch.cuda.is_available():
        assert _run("gpu_gemm_fusion.py").strip() == \
            "no CUDA device: GEMM fusion benchmark skipped"


def test_lif_benchmark_quick():
    out = _run("lif.py", "--quick")
    lines = out.splitlines()
    assert lines[0] == "LIF forward+backward, fp32 CPU, 2 threads, best of 2", out
    # the quick mode measures one shape: one row with both timings and both ratios
    rows = [re.search(r"^\s*4x8x16x8x8: spikingjelly\s+(\S+) ms\s+(\S+) MiB \| ours\s+(\S+) ms"
                      r"\s+(\S+) MiB \| speed-up x(\S+) \(target >= 2\.0\), "
                      r"memory x(\S+) \(target <= 0\.5\) (PASS|FAIL)$", line) for line in lines[1:]]
    assert len(rows) == 1 and rows[0], out
    sj_ms, sj_mib, ours_ms, ours_mib, speedup, memory, verdict = rows[0].groups()
    sj_ms, ours_ms, speedup = float(sj_ms), float(ours_ms), float(speedup)
    assert sj_ms > 0 and ours_ms > 0 and math.isfinite(speedup) and speedup > 0
    # the printed ratio is the ratio of the printed times, within their rounding (0.05 ms each)
    low, high = (sj_ms - 0.05) / (ours_ms + 0.05), (sj_ms + 0.05) / (ours_ms - 0.05)
    assert low - 0.005 <= speedup <= high + 0.005, out
    assert float(sj_mib) >= 0 and float(ours_mib) >= 0
    # a zero baseline peak has no ratio (printed as nan); otherwise a finite non-negative ratio
    memory = float(memory)
    assert (math.isfinite(memory) and memory >= 0) or (math.isnan(memory) and float(sj_mib) == 0)
    # the verdict follows the targets (unless a printed figure is rounded onto a target)
    if abs(speedup - 2.0) > 0.005 and not abs(memory - 0.5) <= 0.005:
        assert verdict == ("PASS" if speedup >= 2.0 and memory <= 0.5 else "FAIL"), out


def test_shared_cpu_command_line():
    """benchmarks/shared_cpu.py trains the demo several times (minutes): here its command line
    only; the thread rule it measures is tested in test_shared_machine.py."""
    script = str(REPO / "benchmarks" / "shared_cpu.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--config" in r.stdout
    r = subprocess.run([sys.executable, script, "--config", "fast"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: unknown --config 'fast'")
    assert len(r.stderr.strip().splitlines()) == 1
