"""What one AMP training step would cost on a GPU, counted on the CPU (no GPU needed).

Three computations run one training step (forward, backward, AdamW) each under a dispatch-mode
counter on the CPU, in the 16-bit AMP dtype:

* **original**: what the authors' code runs on a GPU. The reference path (convolution,
  BatchNorm, attention layer by layer, equal to the authors' modules by the golden tests) with
  every neuron as spikingjelly 0.0.0.0.12's ``MultiStepLIFNode`` on its cupy backend: besides the
  one kernel each way, its zero-filled V/H/S buffer, the concatenation behind the starting
  potential, the zero gradient autograd hands the unused V output, the zero-filled gradient
  buffer, and 16-bit H and S kept for the backward pass (:class:`_CupyNodeTraffic`);
* **CUDA fallback**: the same reference path with this package's CUDA LIF (reads X, writes S
  and H; reads the gradient and H, writes the input gradient), what CUDA runs where the Triton
  units are missing or fail their self-check. Its ratio shows what the Triton route gains
  beyond a lean neuron;
* **fast, Triton**: the fast path's Triton route (the CUDA default), each Triton launch counted
  without running it; ``--torch-ops`` adds the fast path as torch ops (the CPU's
  ``QKFORMER_CPU_KERNELS=0`` form, never a CUDA route).

The counter adds up (per image unless said):

* kernel launches per step (they do not grow with the batch): every ATen op that is not a view
  or an empty allocation, a convolution's backward as one per gradient it returns (cuDNN's
  data and weight gradients are separate kernels); the LIF as one launch per forward and one
  per backward (the CUDA kernel's);
* host synchronisations: ops that read a device value on the host (``.item()``, ``nonzero``, ...);
* bytes read and written by the non-GEMM kernels (every tensor argument and result, once);
* GEMM / convolution FLOPs (torch's FlopCounterMode formulas);
* the peak of live memory during the step (every storage allocated inside it, freed when its
  last reference goes), i.e. activations, temporaries and the weight gradients; parameters
  and optimizer state are listed apart.

Two steps are counted, of ``--count-batch`` images and of twice as many: bytes, FLOPs and the
peak are a part per image plus a part per step (weight casts, weight gradients), read off the
line through the two counts, and the figures are per image of a ``--batch``-image step (the
per-step part shared by its images).

The roofline model of the step time, clearly a model: GEMM FLOPs at a sustained fraction of the
dense fp16 tensor-core peak, plus bytes at a fraction of HBM bandwidth, plus launches at a fixed
cost each. It ranks the computations; it does not replace a measurement
(``benchmarks/gpu_check.sh`` on a GPU).

    python benchmarks/gpu_cost.py [--models cifar hst384] [--batch 32] [--quick] [--torch-ops]
                                  [--fused-gemms]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import weakref
from collections import Counter

os.environ["QKFORMER_CPU_KERNELS"] = "0"  # the fused units as torch ops, as on CUDA
os.environ.setdefault("QKFORMER_CUDA_FAST_PATH", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from _common import MODELS, batch, build  # noqa: E402

# Sustained fractions used by the model (not measured here): GEMMs at 60 % of the dense fp16
# tensor-core peak, memory-bound kernels at 70 % of HBM bandwidth, 4 us per launch.
GPUS = {"H100 SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
GEMM_EFF, BW_EFF, LAUNCH_S = 0.6, 0.7, 4e-6

_GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "conv2d", "convolution", "convolution_backward", "_convolution",
          "cudnn_convolution", "linear"}
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
              "detach", "lift_fresh", "_to_copy_noop", "set_", "resize_", "_unsafe_view",
              "alias", "view", "_reshape_alias", "as_strided", "expand", "permute", "t",
              "transpose", "unsqueeze", "squeeze", "select", "slice", "split", "split_with_sizes",
              "chunk", "unbind", "unflatten", "view_as", "_local_scalar_dense",
              "_record_function_enter_new", "_record_function_exit"}  # (profiler marks: host)
_SYNCS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "masked_select",
          "unique", "_unique2", "equal"}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _custom_op(func):
    """The Python definition of a ``qkformer::`` custom op, else None."""
    if getattr(func, "namespace", None) != "qkformer":
        return None
    from torch._library.custom_ops import _maybe_get_opdef

    return _maybe_get_opdef(func._name if hasattr(func, "_name") else str(func))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StepCounter(TorchDispatchMode):
    """Counts launches, syncs, non-GEMM bytes and live memory of the ops run inside it."""

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.syncs = 0
        self.bytes = 0
        self.by_op = Counter()
        self.launch_ops = Counter()
        self.live = 0
        self.peak = 0
        self._seen = set()
        self.quiet = 0  # > 0 inside the LIF, which is counted as its one kernel
        self._hidden = 0  # > 0: the counter's own stand-ins for a kernel's registers
        self.gemm_flops = 0  # of Triton kernels (FlopCounterMode sees torch's GEMMs only)

    def _track(self, out):
        for t in _tensors(out):
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = s.data_ptr()
            if key in self._seen or s.nbytes() == 0:
                continue
            self._seen.add(key)
            n = s.nbytes()
            self.live += n
            self.peak = max(self.peak, self.live)

            def freed(key=key, n=n, counter=weakref.ref(self)):
                c = counter()
                if c is not None:
                    c.live -= n
                    c._seen.discard(key)
            weakref.finalize(s, freed)

    @contextlib.contextmanager
    def hidden(self):
        """Ops that are neither counted nor tracked (values a kernel keeps in registers)."""
        self._hidden += 1
        try:
            yield
        finally:
            self._hidden -= 1

    def kernel(self, name: str, nbytes: int) -> None:
        self.launches += 1
        self.launch_ops[name] += 1
        self.bytes += nbytes
        self.by_op[name] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._hidden:
            return func(*args, **kwargs)
        opdef = _custom_op(func)
        if opdef is not None:  # this package's ops: count what they run, not the op itself
            with self:
                out = opdef._init_fn(*args, **kwargs)
            return out
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        self._track(out)
        if self.quiet or name in _NO_LAUNCH or func.is_view:
            if not self.quiet and name in _SYNCS:
                self.syncs += 1
            return out
        if name in _SYNCS:
            self.syncs += 1
        if name in _GEMMS:
            # a convolution's backward is one GEMM per gradient it returns (data, weight; the
            # bias gradient a reduction): cuDNN launches them apart
            n = sum(map(bool, args[-1])) if name == "convolution_backward" else 1
            self.launches += n
            self.launch_ops[name] += n
            return out
        nbytes = sum(_nbytes(t) for t in _tensors((args, kwargs, out)))
        self.kernel(name, nbytes)
        return out


def _count_lif_as_kernels(counter: StepCounter):
    """The LIF's forward and backward as the one launch each of the CUDA kernel: it reads the
    input (the gradient and H) and writes the spikes and H (the input gradient)."""
    from qkformer import neuron

    fwd, bwd = neuron._forward, neuron._backward

    def forward(x, tau, v_threshold, save_h, backend):
        counter.quiet += 1
        try:
            spikes, h = fwd(x, tau, v_threshold, save_h, backend)
        finally:
            counter.quiet -= 1
        counter.kernel("lif_forward (kernel)",
                       _nbytes(x) + _nbytes(spikes) + (_nbytes(h) if h is not None else 0))
        return spikes, h

    def backward(grad, h, tau, v_threshold, alpha, detach_reset, backend):
        counter.quiet += 1
        try:
            gx = bwd(grad, h, tau, v_threshold, alpha, detach_reset, backend)
        finally:
            counter.quiet -= 1
        counter.kernel("lif_backward (kernel)", _nbytes(grad) + _nbytes(h) + _nbytes(gx))
        return gx

    neuron._forward, neuron._backward = forward, backward
    return lambda: (setattr(neuron, "_forward", fwd), setattr(neuron, "_backward", bwd))


class _CupyNodeTraffic(torch.autograd.Function):
    """The tensors spikingjelly 0.0.0.0.12's ``MultiStepLIFNodePTT`` (the cupy backend the
    original trains with; ``clock_driven/neuron_kernel.py``) allocates, launches on and keeps,
    with the values from this package's torch loops (hidden from the counter: they stand for the
    kernel's registers). Forward: one zero-filled buffer of 3T rows split into V, H and S; V
    concatenated behind the previous potential (T + 1 rows); the kernel reads X and V and writes
    V, H and S; H and S (16-bit) are saved. Backward: autograd hands the unused V output a
    zero-filled gradient; a zero-filled buffer of T + 1 rows takes the input gradient and the
    potential's; the kernel reads both gradients, H and S and writes that buffer."""

    @staticmethod
    def forward(ctx, x, v_last, counter, tau, v_threshold, alpha):
        from qkformer.lif_loops import lif_forward_torch

        T = x.shape[0]
        v_seq, h_seq, s_seq = torch.zeros((3 * T, *x.shape[1:]), dtype=x.dtype).split(T)
        v_v_seq = torch.cat((v_last.unsqueeze(0), v_seq))
        with counter.hidden():
            s, h = lif_forward_torch(x, tau, v_threshold, True)
            s_seq.copy_(s)
            h_seq.copy_(h)
            v_v_seq[1:].copy_(h * (1 - s))
        counter.kernel("lif_forward (kernel)", sum(map(_nbytes, (x, v_v_seq, h_seq, s_seq))))
        ctx.save_for_backward(h_seq, s_seq)
        ctx.counter, ctx.params = counter, (tau, v_threshold, alpha)
        return s_seq, v_v_seq[1:]

    @staticmethod
    def backward(ctx, grad_s, grad_v):
        from qkformer.lif_loops import lif_backward_torch

        h_seq, s_seq = ctx.saved_tensors
        counter, (tau, v_threshold, alpha) = ctx.counter, ctx.params
        grads = torch.zeros((grad_s.shape[0] + 1, *grad_s.shape[1:]), dtype=grad_s.dtype)
        with counter.hidden():
            grads[:-1].copy_(lif_backward_torch(grad_s, h_seq, tau, v_threshold, alpha, True))
        counter.kernel("lif_backward (kernel)",
                       sum(map(_nbytes, (grad_s, grad_v, h_seq, s_seq, grads))))
        return grads[:-1], grads[-1], None, None, None, None


def _count_lif_as_cupy_node(counter: StepCounter):
    """Every neuron as the original's ``MultiStepLIFNode`` with the cupy backend: its state
    starts as zeros, the module keeps V for all steps and a copy of the last one until
    ``reset_net`` after the optimizer step. Returns (restore, reset_net)."""
    from qkformer.neuron import MultiStepLIF

    held = []
    forward = MultiStepLIF.forward

    def node_forward(self, x):
        if (self.tau, self.alpha, self.detach_reset) != (2.0, 4.0, True):
            raise ValueError("the original's neuron is tau=2, alpha=4, detach_reset")
        flat = x.flatten(1)
        v_last = torch.zeros(flat.shape[1:], dtype=flat.dtype)  # (a fill: nothing read)
        spikes, v_seq = _CupyNodeTraffic.apply(flat, v_last, counter, self.tau,
                                              self.v_threshold, self.alpha)
        held.append((v_seq, v_seq[-1].clone()))
        return spikes.reshape(x.shape)

    MultiStepLIF.forward = node_forward

    def restore():
        MultiStepLIF.forward = forward
    return restore, held.clear


def _ssa_flops(name: str, grid: tuple, args: tuple, meta: dict) -> int:
    """The products the SSA kernels compute with ``tl.dot`` (including what they recompute:
    kᵀ v per block of tokens, the charges in the backward pass); 0 for other kernels."""
    if not name.startswith("ssa_"):
        return 0
    B, heads, blocks = grid
    at = 5 if name == "ssa_bwd_kernel" else 3  # where (B, N, C, D) start in the arguments
    N, D = args[at + 1], args[at + 3]
    kv = 2 * N * D * D  # kᵀ v over every token
    own = 2 * math.ceil(N / blocks) * D * D  # one product over the program's block of tokens
    per_step = {"ssa_fwd_kernel": kv + own,
                "ssa_bwd_kernel": (kv + own) + kv + 2 * own + (2 * own if blocks == 1 else 0),
                "ssa_bwd_kv_kernel": 2 * own}[name]
    return meta["STEPS"] * B * heads * blocks * per_step


def _count_triton_launches(counter: StepCounter, checks_known: bool = True):
    """The fast path's Triton route without running its kernels: each launch counted as one
    kernel reading and writing every distinct tensor it is given, once (the launchers pass a
    one-element stand-in for pointers a kernel does not read). The outputs stay unwritten,
    which changes no count. ``checks_known``: the packing checks count as passed and known at
    once (the best case for memory: on a GPU the original is released once the device has run
    the check and the host has seen it); else as never known before the backward pass (the
    worst case: every original stays until then, and is what the backward pass reads)."""
    from qkformer import triton_units

    launch, packed_init = triton_units._launch, triton_units.Packed.__init__

    def counted(name, grid, *args, **meta):
        if name == "gemm_kernel":  # a GEMM (its work, as cuBLAS's); outside it only the partial
            I, J, K = args[6:9]    # sums its epilogue writes
            counter.launches += 1
            counter.launch_ops[f"{name} (triton)"] += 1
            counter.gemm_flops += 2 * I * J * K
            if meta["STATS"]:
                counter.bytes += _nbytes(args[5])
                counter.by_op[f"{name} (triton)"] += _nbytes(args[5])
            return
        seen = {(t.data_ptr(), _nbytes(t)) for t in _tensors((args, meta))}
        counter.kernel(f"{name} (triton)", sum(n for _, n in seen))
        counter.gemm_flops += _ssa_flops(name, grid, args, meta)

    def resolved_at_once(self, data, flag, original):
        self.data, self.flag, self.original = data, flag, None if checks_known else original
        self._ok = True if checks_known else None
        self._host = self._event = None

    triton_units._launch, triton_units.Packed.__init__ = counted, resolved_at_once

    def restore():
        triton_units._launch, triton_units.Packed.__init__ = launch, packed_init
    return restore


KINDS = {"original": "original", "reference": "CUDA fallback", "triton": "fast, Triton"}
TORCH_OPS = ("fast", "fast, torch ops")


def count_step(model_key: str, kind: str, size: int, dtype: torch.dtype,
               checks_known: bool = True) -> dict:
    """``kind``: 'original' (the reference path with the original's cupy neuron), 'reference'
    (the reference path with this package's CUDA LIF: the CUDA fallback), 'fast' (the fast
    path as torch ops) or 'triton' (the fast path's Triton route, the CUDA default)."""
    from qkformer import fused

    model = build(model_key, {"triton": "fast", "original": "reference"}.get(kind, kind))
    x, y = batch(model_key, model, size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    model.train()

    def forward_backward():
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    route = fused.forced_route("triton" if kind == "triton" else None)
    counter = StepCounter()
    with route:
        restore_triton = _count_triton_launches(StepCounter()) if kind == "triton" else None
        try:
            forward_backward()
            update()  # optimizer state exists before the counted step, as in a running job
        finally:
            if restore_triton:
                restore_triton()
        if kind == "original":
            restore, reset_net = _count_lif_as_cupy_node(counter)
        else:
            restore, reset_net = _count_lif_as_kernels(counter), lambda: None
        restore_triton = (_count_triton_launches(counter, checks_known) if kind == "triton"
                          else None)
        flops = FlopCounterMode(display=False)
        try:
            with flops, counter:
                forward_backward()
                syncs, step_bytes, step_ops = counter.syncs, counter.bytes, Counter(counter.by_op)
                update()  # AdamW's step counts are host scalars on a GPU too: no syncs counted
                reset_net()
                counter.syncs = syncs
        finally:
            restore()
            if restore_triton:
                restore_triton()
    params = sum(_nbytes(p) for p in model.parameters())
    state = sum(_nbytes(t) for s in opt.state.values() for t in _tensors(s))
    top = int(os.environ.get("GPU_COST_TOP", "6"))
    return dict(size=size, launches=counter.launches, syncs=counter.syncs, bytes=step_bytes,
                optimizer_bytes=counter.bytes - step_bytes,
                flops=flops.get_total_flops() + counter.gemm_flops,
                peak=counter.peak, fixed=params * 2 + state,
                top=[(n, b / size) for n, b in step_ops.most_common(top)],
                top_launches=counter.launch_ops.most_common(max(top, 8)))


def per_image(small: dict, large: dict, batch: int) -> dict:
    """Per-image figures of a step of ``batch`` images from the counts of two smaller steps:
    bytes, FLOPs and the peak are a part per image plus a part per step (weight casts, weight
    gradients), read off the line through the two counts; the per-step part is shared by the
    ``batch`` images. Launches and synchronisations are per step."""
    out = dict(small)
    for key in ("bytes", "flops", "peak"):
        slope = (large[key] - small[key]) / (large["size"] - small["size"])
        out[key] = slope + max(0.0, small[key] - slope * small["size"]) / batch
    out["launches"] = max(small["launches"], large["launches"])
    out["syncs"] = max(small["syncs"], large["syncs"])
    return out


def model_time(r: dict, peak_flops: float, bandwidth: float, size: int) -> float:
    """Seconds per step of ``size`` images by the roofline model."""
    return (size * (r["flops"] / (peak_flops * GEMM_EFF) + r["bytes"] / (bandwidth * BW_EFF))
            + r["optimizer_bytes"] / (bandwidth * BW_EFF) + r["launches"] * LAUNCH_S)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar", "hst384"], choices=list(MODELS))
    p.add_argument("--count-batch", type=int, default=2,
                   help="images in the smaller counted step (a second one has twice as many)")
    p.add_argument("--batch", type=int, default=32,
                   help="batch of the modelled GPU step, which the per-image figures are of")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="bfloat16",
                   help="the AMP dtype on the CPU (same sizes as the GPU's fp16)")
    p.add_argument("--quick", action="store_true", help="tiny models (a smoke test)")
    p.add_argument("--torch-ops", action="store_true",
                   help="also count the fast path as torch ops (QKFORMER_CPU_KERNELS=0 on the "
                        "CPU; never the CUDA route)")
    p.add_argument("--fused-gemms", action="store_true",
                   help="the Triton route with the projections as Triton GEMMs that take part "
                        "in the unit (QKFORMER_TRITON_GEMMS=1; not the default)")
    args = p.parse_args(argv)
    if args.fused_gemms:
        os.environ["QKFORMER_TRITON_GEMMS"] = "1"
        KINDS["triton"] = "Triton+GEMMs"
    if args.torch_ops:
        KINDS[TORCH_OPS[0]] = TORCH_OPS[1]
    models = ["quick", "quick-dvs"] if args.quick else args.models
    dtype = getattr(torch, args.dtype)
    print(f"counted on the CPU ({args.dtype} autocast as the GPU's 16-bit AMP), per image of a "
          f"{args.batch}-image step (from steps of {args.count_batch} and "
          f"{2 * args.count_batch} images). original: the reference path with spikingjelly "
          f"0.0.0.0.12's cupy neuron as the authors train; CUDA fallback: the reference path "
          f"with this package's CUDA LIF (one launch each way)")
    met_all = True
    def counted(key, kind, **kw):
        return per_image(count_step(key, kind, args.count_batch, dtype, **kw),
                         count_step(key, kind, 2 * args.count_batch, dtype, **kw), args.batch)

    for key in models:
        rows = {kind: counted(key, kind) for kind in KINDS}
        o = rows["original"]
        print(f"\n{key}: {MODELS[key][0]}, {MODELS[key][2]} px")
        print(f"{'':34s}" + "".join(f" {v:>16s}" for v in KINDS.values())
              + "   ratios to the original")
        for label, k, unit in (("kernel launches / step", "launches", 1),
                               ("non-GEMM bytes / image (MB)", "bytes", 1e6),
                               ("GEMM GFLOP / image", "flops", 1e9),
                               ("peak live memory / image (MB)", "peak", 1e6)):
            ratios = "  ".join(f"{rows[kd][k] / o[k]:.2f}x" if o[k] else "-" for kd in KINDS
                               if kd != "original")
            print(f"{label:34s}" + "".join(f" {rows[kd][k] / unit:16.1f}" for kd in KINDS)
                  + f"   {ratios}")
        print(f"{'optimizer bytes / step (MB)':34s}"
              + "".join(f" {rows[kd]['optimizer_bytes'] / 1e6:16.1f}" for kd in KINDS))
        print(f"{'host synchronisations / step':34s}"
              + "".join(f" {rows[kd]['syncs']:16d}" for kd in KINDS))
        print(f"parameters + gradients + AdamW state: {o['fixed'] / 1e6:.1f} MB")
        for gpu, (peak, bw) in GPUS.items():
            times = {kd: model_time(r, peak, bw, args.batch) for kd, r in rows.items()}
            print(f"model, {gpu}, batch {args.batch}: " + ", ".join(
                f"{KINDS[kd]} {t * 1e3:.0f} ms ({times['original'] / t:.2f}x)"
                for kd, t in times.items()))
        for kind, r in rows.items():
            print(f"most launched, {KINDS[kind]}: "
                  + ", ".join(f"{n} {c}" for n, c in r["top_launches"]))
        t = rows["triton"]
        late = counted(key, "triton", checks_known=False)
        print(f"  the Triton route's peak with the packing checks seen only at the backward pass "
              f"(the host far ahead of the device): {late['peak'] / 1e6:.1f} MB / image "
              f"({late['peak'] / o['peak']:.2f}x)")
        print(f"largest non-GEMM byte movers, {KINDS['triton']} (per image of the {args.count_batch}-image step): "
              + ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in t["top"]))
        checks = (("non-GEMM bytes", t["bytes"] / o["bytes"], 0.5),
                  ("launches", t["launches"] / o["launches"], 0.75),
                  ("peak live memory", t["peak"] / o["peak"], 0.5))
        f = rows["reference"]
        print(f"the Triton route / the CUDA fallback (the original's arithmetic with a lean LIF): "
              f"non-GEMM bytes {t['bytes'] / f['bytes']:.2f}x, launches "
              f"{t['launches'] / f['launches']:.2f}x, peak {t['peak'] / f['peak']:.2f}x")
        met = [r <= limit for _, r, limit in checks] + [t["syncs"] == 0]
        met_all &= all(met)
        print("targets (Triton route / original): " + ", ".join(
            f"{name} {r:.2f}x <= {limit}x {'met' if ok else 'NOT met'}"
            for (name, r, limit), ok in zip(checks, met))
            + f", host synchronisations {t['syncs']} {'met' if met[-1] else 'NOT met'}")
    print(f"\n{'all targets met' if met_all else 'targets not all met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
