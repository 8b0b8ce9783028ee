"""The fast path as an AVX2-only CPU runs it, on any x86 CPU with AVX2.

A child pytest runs the determinism, kernel-vs-mirror, unit and checkpointing tests with every
library held to AVX2: our kernels built for it (``QKFORMER_CPU_ISA=avx2``), oneDNN
(``ONEDNN_MAX_CPU_ISA``), ATen's vectorised loops (``ATEN_CPU_CAPABILITY``) and MKL
(``MKL_ENABLE_INSTRUCTIONS``). oneDNN's AVX2 convolutions are where a channels-last strided
1x1 weight gradient came out wrong (or corrupted the heap with one thread), so the tests run
with one thread too, as under torchrun.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AVX2 = {"QKFORMER_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif("avx2" not in _cpu_flags(), reason="not an x86 CPU with AVX2")]

SELECTIONS = {
    2: ["tests/test_fused_units.py", "tests/test_sparse.py", "tests/test_kernel_inputs.py",
        "tests/test_checkpointing.py::test_checkpointed_steps_are_bit_identical",
        "tests/test_fast_path.py::test_kernels_match_their_torch_mirror",
        "tests/test_fast_path.py::test_bn_lif_kernels_match_their_mirror_on_every_channel_count",
        "tests/test_fast_path.py::test_train_step_float64_matches_reference",
        "tests/test_fast_path.py::test_compact_storage_is_bit_identical"],
    1: ["tests/test_checkpointing.py::test_checkpointed_steps_are_bit_identical"],
}


@pytest.mark.parametrize("threads", list(SELECTIONS))
def test_fast_path_under_avx2(threads):
    env = {**os.environ, **AVX2, "OMP_NUM_THREADS": str(threads)}
    probe = subprocess.run(
        [sys.executable, "-c", "from qkformer import cpu; import torch; "
         "print(cpu.isa(), cpu.library() is not None, torch.backends.cpu.get_cpu_capability())"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    isa, built, aten = probe.stdout.split()
    assert (isa, aten) == ("avx2", "AVX2") and built == "True", probe.stdout
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *SELECTIONS[threads]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail
