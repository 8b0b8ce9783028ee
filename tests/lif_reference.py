"""Reference helpers shared by the LIF tests: inputs with special values, a NaN-aware
comparison, and the CUDA kernel's arithmetic written in torch (float32 math, one rounding to the
storage type per stored value), independently of the torch backend's loops. On CPU the latter
stands in for the kernel (tests/test_lif_dispatch.py); on a GPU it is the oracle for the 16-bit
kernels, whose rounding differs from the torch backend's by design."""
import torch


def special_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """Quarters in [-2, 3] (exact in every dtype over a few steps, with ties at V_th = 1) and
    +inf, -inf, NaN at the first, a middle and the last step, in the neurons that exist."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-8, 13, shape, generator=g).to(dtype) * 0.25
    x2 = x.view(shape[0], -1)
    inf, nan, last = float("inf"), float("nan"), shape[0] - 1
    for (t, n), v in {(min(1, last), 0): inf, (last // 2, 1): -inf, (0, 2): nan, (last, 3): inf,
                      (0, 4): -inf, (0, 5): inf, (last, 6): nan}.items():
        if n < x2.shape[1] - 1:  # the last neuron stays ordinary
            x2[t, n] = v
    return x.to(device)


def assert_same(got, ref, rtol=0.0, atol=0.0, what=""):
    """Equal values, NaN where the reference has NaN and the same infinities."""
    torch.testing.assert_close(got.double().cpu(), ref.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=what or None)


def kernel_forward(x, tau, v_threshold, save_h):
    """The forward kernel's arithmetic: float math, H rounded to the storage type once per step
    and carried on rounded, the threshold rounded through the storage type, V = H - H S."""
    T = x.shape[0]
    x2 = x.reshape(T, -1).float()
    v_th = torch.tensor(v_threshold, dtype=x.dtype).float()
    v = torch.zeros_like(x2[0])
    spikes, hs = torch.empty_like(x2), torch.empty_like(x2)
    for t in range(T):
        h = (v + (x2[t] - v) / tau).to(x.dtype).float()
        s = (h >= v_th).float()
        spikes[t], hs[t] = s, h
        v = h - h * s
    return spikes.to(x.dtype).view_as(x), (hs.to(x.dtype).view_as(x) if save_h else None)


def kernel_backward(grad_spikes, h_seq, tau, v_threshold, alpha, detach_reset):
    """The backward kernel's arithmetic: float math from the stored g_S and H, the carry kept in
    float, one rounding when g_X is stored; no carry into the last step."""
    T = h_seq.shape[0]
    h2, g2 = h_seq.reshape(T, -1).float(), grad_spikes.reshape(T, -1).float()
    v_th = torch.tensor(v_threshold, dtype=h_seq.dtype).float()
    grad_x = torch.empty_like(h2)
    carry = torch.zeros_like(h2[0])
    for t in range(T - 1, -1, -1):
        h = h2[t]
        sig = torch.sigmoid((h - v_th) * alpha)
        sg = (1 - sig) * sig * alpha
        keep = (h < v_th).float()
        dv_dh = keep if detach_reset else keep - h * sg
        g_h = g2[t] * sg
        if t < T - 1:
            g_h = g_h + carry * dv_dh
        grad_x[t] = g_h / tau
        carry = g_h * (1 - 1 / tau)
    return grad_x.to(h_seq.dtype).view_as(h_seq)
