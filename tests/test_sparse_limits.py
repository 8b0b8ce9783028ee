"""The densities up to which the spike-driven products are used: measured once per machine and
kept beside the kernels, or forced by QKFORMER_SPARSE_MAX_DENSITY; the fast path agrees with
the reference path in float64 on both sides of the limits."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkformer import cpu, sparse, sparse_limits
from conftest import count_calls

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")


def test_crossover_interpolates_where_the_sparse_product_stops_winning():
    d = (0.1, 0.2, 0.4)
    assert sparse_limits._crossover(d, [0.5, 2.0, 4.0]) == pytest.approx(0.15)  # log-midpoint
    assert sparse_limits._crossover(d, [1.2, 2.0, 4.0]) == 0.0  # never wins
    assert sparse_limits._crossover(d, [0.2, 0.5, 0.9]) == sparse_limits.CAP  # always wins
    # one noisy point does not decide: the ratios are made non-decreasing first
    assert sparse_limits._crossover((0.1, 0.2, 0.3, 0.4), [0.5, 3.0, 0.6, 2.0]) > 0.1
    assert sparse_limits._monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]


def test_the_environment_forces_both_limits(monkeypatch):
    monkeypatch.setenv("QKFORMER_SPARSE_MAX_DENSITY", "0.2")
    assert sparse_limits.limits(sparse.timing_pairs) == (0.2, 0.2, "QKFORMER_SPARSE_MAX_DENSITY")
    monkeypatch.setenv("QKFORMER_SPARSE_MAX_DENSITY", "0.3,0.1")
    assert sparse_limits.limits(sparse.timing_pairs)[:2] == (0.3, 0.1)
    for bad in ("x", "1.5", "-0.1", "0.1,0.2,0.3", "0.2,"):
        monkeypatch.setenv("QKFORMER_SPARSE_MAX_DENSITY", bad)
        with pytest.raises(ValueError, match="QKFORMER_SPARSE_MAX_DENSITY"):
            sparse_limits.limits(sparse.timing_pairs)


PROBE = """
import json, sys, time
from qkformer import cpu, sparse, sparse_limits
t0 = time.perf_counter()
f, w, source = sparse_limits.limits(sparse.timing_pairs, remeasure=sys.argv[1] == "remeasure")
if sys.argv[1] == "remeasure":
    sparse._limits = (f, w)
print(json.dumps(dict(f=f, w=w, source=source, path=str(sparse_limits.record_path()),
                      seconds=time.perf_counter() - t0, used=sparse.limits())))
"""


def _probe(cache, how="read"):
    full = {k: v for k, v in os.environ.items() if k != "QKFORMER_SPARSE_MAX_DENSITY"}
    full.update(QKFORMER_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", PROBE, how], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_measured_once_then_read_from_the_record(tmp_path):
    first = _probe(tmp_path, "remeasure")
    assert first["source"].startswith("measured")
    record = json.loads(Path(first["path"]).read_text())
    assert Path(first["path"]).parent == tmp_path
    assert 0 <= first["f"] <= sparse_limits.CAP and 0 <= first["w"] <= sparse_limits.CAP
    assert (record["forward"], record["weight_grad"]) == (first["f"], first["w"])
    assert set(record["ratios"]) == {"forward", "weight_grad"}
    assert first["used"] == [first["f"], first["w"]]  # what the fast path uses
    assert first["seconds"] < 60  # "a few seconds" on a quiet machine; generous for CI
    # a later process reads the record: the same decision, whatever the timing now
    record.update(forward=0.123, weight_grad=0.0)
    Path(first["path"]).write_text(json.dumps(record))
    again = _probe(tmp_path)
    assert (again["f"], again["w"]) == (0.123, 0.0) and again["seconds"] < 5
    # a record that does not parse is not trusted: measured again (or, on a busy machine,
    # the defaults, unstored)
    Path(first["path"]).write_text("{not json")
    third = _probe(tmp_path)
    assert third["source"].startswith(("measured", "not measured"))
    assert (third["f"], third["w"]) != (0.123, 0.0)


def test_a_busy_machine_gets_defaults_and_stores_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv("QKFORMER_SPARSE_MAX_DENSITY", raising=False)
    record = tmp_path / "fused_kernels-x.sparse-limits-2t.json"
    monkeypatch.setattr(sparse_limits, "record_path", lambda: record)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(sparse_limits, "measure", lambda pairs: pytest.fail("measured while busy"))
    f, w, source = sparse_limits.limits(sparse.timing_pairs)
    assert source.startswith("not measured (load average 9.0")
    assert (f, w) == sparse_limits.UNMEASURED[sparse_limits._widest()]
    assert not record.exists()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(sparse_limits, "measure", lambda pairs: {
        "version": sparse_limits._VERSION, "torch": torch.__version__, "forward": 0.2,
        "weight_grad": 0.1})
    assert sparse_limits.limits(sparse.timing_pairs)[:2] == (0.2, 0.1) and record.exists()


@pytest.mark.parametrize("limits", [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0)],
                         ids=["always", "never", "forward-only", "weight-grad-only"])
@pytest.mark.parametrize("family", ["imagenet", "dvs"])
def test_fast_path_matches_reference_on_both_sides_of_the_limits(monkeypatch, limits, family):
    """Which product runs changes rounding only: float64 equality holds either way."""
    import test_fast_path

    calls = count_calls(monkeypatch, sparse, ("forward", "weight_grad"))
    monkeypatch.setattr(sparse, "_limits", limits)
    test_fast_path.test_train_step_float64_matches_reference(family, {})
    assert (calls["forward"] > 0) == (limits[0] > 0)
    assert (calls["weight_grad"] > 0) == (limits[1] > 0)
