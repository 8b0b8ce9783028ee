"""qkformer.kernel_ops: ops registered twice, and torch.compile through the units' triton_op
twins to their Triton kernels (checked on the CPU: tests/traced_units_child.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkformer import kernel_ops, triton_units

REPO = Path(__file__).resolve().parents[1]


_route = {"traced": False}


@kernel_ops.kernel_op("qkformer_test::double", traceable=lambda args: _route["traced"])
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


_double.register_fake(lambda x: torch.empty_like(x))
_double.register_autograd(lambda ctx, g: g * 2.0, setup_context=lambda ctx, inputs, output: None)


def test_a_kernel_op_calls_its_twin_only_where_traceable(monkeypatch):
    x = torch.arange(4.0, requires_grad=True)
    _route["traced"] = False
    assert not _double.uses_traced(x)
    _route["traced"] = True
    try:
        assert _double.uses_traced(x) and _double.uses_traced(x=x)  # by position or name
        y = _double(x)  # the twin: a triton_op, with the same autograd formula
        y.sum().backward()
        assert torch.equal(y, 2 * x) and torch.equal(x.grad, torch.full((4,), 2.0))
        assert hasattr(torch.ops.qkformer_test, "double_traced")
        monkeypatch.setenv(kernel_ops.ENV, "0")
        assert not _double.uses_traced(x)  # the switch keeps the opaque op
    finally:
        _route["traced"] = False


def _child(*args, env=None):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "traced_units_child.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


UNIT_KERNELS = {"colstats_kernel", "bn_coefficients_kernel", "bn_lif_fwd_kernel",
                "bn_pool_lif_fwd_kernel", "qk_token_fwd_kernel", "ssa_fwd_kernel",
                "running_update_kernel", "to_bits_kernel"}
BACKWARD_KERNELS = {"bn_lif_bwd_kernel", "pool_lif_bwd_kernel", "qk_token_bwd_kernel",
                    "ssa_bwd_kernel", "from_bits_kernel"}


@pytest.mark.slow
@pytest.mark.skipif(not triton_units.is_available() or triton_units.interpreting(),
                    reason="needs triton, in a plain (not interpreted) run")
def test_compile_traces_through_the_units_and_runs_their_kernels(tmp_path):
    """torch.compile(fullgraph=True) of the fast path on the Triton route: the forward and
    backward graphs hold the units' kernel launches (no opaque op of ours left), torch's own
    analysis finds what each kernel writes (for an sm_90 target), and the graphs, run with the
    same kernels interpreted, give eager's logits, gradients and BatchNorm buffers exactly."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "QKFORMER_REQUIRE_CPU_KERNELS")}
    env.update(QKFORMER_CPU_KERNELS="0", PYTHONPATH=str(REPO))
    found_path = tmp_path / "traced.json"
    _child("analyse", str(found_path), env=env)
    found = json.loads(found_path.read_text())
    assert found["opaque"] == [], found["opaque"]
    assert UNIT_KERNELS <= set(found["forward"]), UNIT_KERNELS - set(found["forward"])
    assert BACKWARD_KERNELS <= set(found["backward"]), BACKWARD_KERNELS - set(found["backward"])
    writes = found["writes"]
    # the analysis reads the kernels: outputs are written, inputs that are only read are not
    assert writes["colstats_kernel"] == ["part_ptr"]
    assert "s_ptr" in writes["bn_lif_fwd_kernel"] and "y_ptr" not in writes["bn_lif_fwd_kernel"]
    assert set(writes["running_update_kernel"]) == {"rmean_ptr", "rvar_ptr", "count_ptr"}
    ran = json.loads(_child("run", str(found_path), env={**env, "TRITON_INTERPRET": "1"})
                     .strip().splitlines()[-1])
    assert set(ran["kernels_run"]) == set(found["forward"]) | set(found["backward"])
    assert ran["logits_equal"] and ran["grads_differ"] == [] and ran["buffers_differ"] == []
    assert ran["steps_tracked"] == [1]  # BatchNorm's counter moved once, inside the graph
