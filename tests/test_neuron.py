"""The LIF neuron against spikingjelly's own MultiStepLIFNode (torch backend) and the golden file."""
import pytest
import torch
from spikingjelly.clock_driven.neuron import MultiStepLIFNode

from qkformer import lif_loops
from qkformer.neuron import MultiStepLIF, lif_forward_torch, lif_multistep


def _membrane(x, v_threshold):
    """V after reset, from the saved pre-reset potential H: V = H (1 - S)."""
    _, h = lif_forward_torch(x, 2.0, v_threshold)
    return h.masked_fill(h >= v_threshold, 0.0).view_as(x)


def _oracle(x, v_threshold, detach_reset=True):
    node = MultiStepLIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=detach_reset,
                            backend="torch")
    x = x.clone().requires_grad_()
    spikes = node(x)
    return x, spikes, node.v_seq


@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("shape", [(1, 3), (2, 5, 7), (4, 3, 11, 2), (7, 2, 3, 5, 5), (16, 1)])
def test_matches_spikingjelly(v_threshold, detach_reset, shape):
    x = torch.randn(shape) * 1.5 + 0.6  # plenty of spikes and plenty of silence
    up = torch.randn(shape)
    x_ref, s_ref, v_ref = _oracle(x, v_threshold, detach_reset)
    s_ref.backward(up)
    x_ours = x.clone().requires_grad_()
    s = lif_multistep(x_ours, v_threshold=v_threshold, detach_reset=detach_reset, backend="torch")
    s.backward(up)
    assert torch.equal(s, s_ref)  # bit for bit
    assert torch.equal(_membrane(x, v_threshold), v_ref.detach())
    assert 0 < s.mean() < 1
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-6)


def special_inputs(shape=(5, 8)):
    """+inf, -inf and NaN at the first, a middle and the last step, among ordinary values."""
    x = torch.randn(shape) * 1.5 + 0.6
    inf, nan = float("inf"), float("nan")
    for (t, n), v in {(1, 0): inf, (2, 1): -inf, (0, 2): nan, (shape[0] - 1, 3): inf,
                      (0, 4): -inf, (0, 5): inf, (shape[0] - 1, 6): nan}.items():
        x[t, n] = v
    return x


@pytest.mark.parametrize("detach_reset", [True, False])
def test_special_values_match_spikingjelly(detach_reset):
    x, up = special_inputs(), torch.randn(5, 8)
    x_ref, s_ref, v_ref = _oracle(x, 1.0, detach_reset)
    s_ref.backward(up)
    x_ours = x.clone().requires_grad_()
    s = lif_multistep(x_ours, detach_reset=detach_reset, backend="torch")
    s.backward(up)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=0, atol=1e-6, equal_nan=True)
    _, h = lif_forward_torch(x, 2.0, 1.0)
    assert h[2:, 0].isnan().all() and s[2:, 0].eq(0).all()  # +inf poisons the neuron: NaN on
    assert h[1:, 5].isnan().all() and h[3:, 1].isnan().all()  # +inf at t=0; -inf at t=2
    assert x_ours.grad.isnan().any() and x_ours.grad[:, 7].isfinite().all()  # column 7: plain
    # V = H - H S equals spikingjelly's H (1 - S) except after H = -inf (NaN here, -inf there),
    # which the next charge turns into NaN in both.
    v = h - h * s
    minus_inf = h == -float("inf")
    torch.testing.assert_close(v[~minus_inf], v_ref.detach()[~minus_inf], rtol=0, atol=0,
                               equal_nan=True)
    assert v[minus_inf].isnan().all() and (v_ref.detach()[minus_inf] == -float("inf")).all()


@pytest.mark.parametrize("v_threshold", [1.0, 0.5])
def test_golden_lif_unit(reference, v_threshold):
    g = torch.load(reference / "golden" / "lif_unit.pt", weights_only=True)
    ref = g[f"vth{v_threshold}"]
    for detach, key in ((True, "input_grad"), (False, "input_grad_if_detach_reset_False")):
        x = g["input"].clone().requires_grad_()
        s = MultiStepLIF(v_threshold=v_threshold, detach_reset=detach, backend="torch")(x)
        s.backward(ref["upstream_grad"])
        assert torch.equal(s, ref["spikes"])
        torch.testing.assert_close(x.grad, ref[key], rtol=0, atol=1e-6)
    assert torch.equal(_membrane(g["input"], v_threshold), ref["v_seq"])


@pytest.mark.parametrize("tau", [2.0, 3.0])
def test_blocked_loop_matches_unblocked(monkeypatch, tau):
    # The CPU path walks the neurons in cache-sized blocks; block edges must not matter.
    x = torch.randn(5, 1000) + 0.7
    up = torch.randn(5, 1000)
    results = []
    for block in (1 << 17, 37):
        monkeypatch.setattr(lif_loops, "CPU_BLOCK", block)
        xx = x.clone().requires_grad_()
        s = lif_multistep(xx, tau=tau, detach_reset=False)
        s.backward(up)
        results.append((s, xx.grad))
    assert torch.equal(results[0][0], results[1][0])
    # sigmoid's vector and scalar-tail code paths may differ in the last ulp
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-7)
    xr = x.clone().requires_grad_()
    s_ref = MultiStepLIFNode(tau=tau, detach_reset=False, backend="torch")(xr)
    s_ref.backward(up)
    assert torch.equal(results[1][0], s_ref)
    torch.testing.assert_close(results[1][1], xr.grad, rtol=0, atol=1e-6)


def test_closed_form_constant_input():
    # Constant input 1.5 at V_th 1: H1 = 0.75 (silent), H2 = 0.375 + 0.75 = 1.125 (spike, reset),
    # then the pattern repeats: spikes at every second step.
    s = lif_multistep(torch.full((6, 1), 1.5))
    assert s.flatten().tolist() == [0, 1, 0, 1, 0, 1]
    # Input exactly at threshold after one step fires (>=): X = 2 -> H1 = 1.0.
    assert lif_multistep(torch.full((1, 1), 2.0)).item() == 1.0


def test_stateless_between_calls_and_batch_sizes():
    lif = MultiStepLIF()
    a, b = torch.randn(4, 8, 5) + 0.8, torch.randn(4, 3, 5) + 0.8
    first = lif(a)
    lif(b)  # a different batch size in between must not leak state
    assert torch.equal(lif(a), first)
    assert torch.equal(lif(b), lif_multistep(b))
    assert list(lif.parameters()) == [] and list(lif.buffers()) == [] and lif.state_dict() == {}


def test_dtype_and_double_precision():
    x = torch.randn(4, 6, 3, dtype=torch.float64) + 0.7
    s = lif_multistep(x)
    assert s.dtype == torch.float64
    assert torch.equal(s, lif_multistep(x.float()).double())  # random data: no tie at threshold
    xb = x.to(torch.bfloat16).requires_grad_()
    lif_multistep(xb).sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_backward_saves_only_one_tensor():
    saved = []
    x = torch.randn(4, 10, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lif_multistep(x, backend="torch")
    assert len(saved) == 1 and saved[0].shape == x.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        MultiStepLIF(backend="tpu")
    with pytest.raises(ValueError, match=r"\[T, \.\.\.\]"):
        lif_multistep(torch.randn(5))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        lif_multistep(torch.randn(2, 3), backend="cupy")


def test_worker_threads_survive_fork(tmp_path):
    import os

    x = torch.randn(4, 200_000) + 0.7
    expected = lif_multistep(x)  # starts the block pool in this process
    pid = os.fork()
    if pid == 0:  # the child has none of the pool's threads: it must make its own, not hang
        try:
            torch.save(lif_multistep(x), tmp_path / "child.pt")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert torch.equal(torch.load(tmp_path / "child.pt"), expected)
