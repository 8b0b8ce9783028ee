"""One fp16 AMP training step on CUDA: this package's default against the original.

    default   the model as built by default (the fast path where the Triton units pass their
              self-check on this device, else the reference path; the line printed says which),
              as this package's entry points run it (cudnn.benchmark off)
    original  the reference path (the original's layer-by-layer computation, NCHW as the
              original) with cudnn.benchmark on and, as the authors train, spikingjelly's
              MultiStepLIFNode on its cupy backend in the AMP dtype, where spikingjelly loads
              and its kernel gives the reference LIF's spikes here; else this package's CuPy
              LIF (the same arithmetic with fewer buffers; the line printed says which and why)

A step is forward under fp16 autocast, cross-entropy, backward through a GradScaler and an AdamW
update. Both variants load the same weights, whose BatchNorm biases are first shifted so that
the neurons fire at about 15 % (as a trained network; benchmarks/_common.py).

    python benchmarks/gpu_step.py time   [--model hst384] [--batch 32] [--warmup 3] [--steps 10]
    python benchmarks/gpu_step.py memory [--model hst384] [--batches 32 64]

``time``: ms per step by CUDA events over ``--steps`` steps after ``--warmup``, the ratio, the
device kernels per step and the host synchronisations in forward + backward of each, and the
profiler's top 10 by CUDA time of the default. ``memory``: torch.cuda.max_memory_allocated over
one step (after a warm-up step), in all and above what was allocated before it (activations and
temporaries, per image), for each batch; to be read beside the counted "peak live memory /
image" of ``benchmarks/gpu_cost.py``. Without CUDA it prints "no CUDA device: GPU step benchmark
skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import sys
import warnings

import torch

from _common import MODELS, SpikingjellyLIF, batch, build, calibrate_firing, swap_in_spikingjelly

VARIANTS = ("default", "original")


def _lif_input_dtypes(model) -> tuple[dict, list]:
    """Counts of the dtypes that reach the model's neuron modules, and the hooks to remove."""
    from qkformer.neuron import MultiStepLIF

    seen: dict = {}

    def hook(module, args):
        name = str(args[0].dtype).replace("torch.", "")
        seen[name] = seen.get(name, 0) + 1

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules()
             if isinstance(m, (MultiStepLIF, SpikingjellyLIF))]
    return seen, hooks


def _original_neurons(model) -> str:
    """Swap in spikingjelly's cupy neuron where it loads and agrees with the reference LIF on a
    probe (forward spikes, fp16 under autocast); returns a line saying which neuron runs."""
    from qkformer.neuron import lif_multistep

    try:
        import importlib.metadata
        version = importlib.metadata.version("spikingjelly")
        probe = SpikingjellyLIF(1.0, "cupy").cuda()
        x = torch.linspace(-1, 3, 4 * 2 * 8, device="cuda").view(4, 2, 8)
        with torch.autocast("cuda", dtype=torch.float16):
            spikes = probe(x.half())
        if not torch.equal(spikes.float(), lif_multistep(x.half(), backend="torch").float()):
            raise ValueError("its spikes differ from the reference LIF's")
    except Exception as e:  # any failure leaves this package's CuPy LIF in place
        return (f"neurons: this package's CuPy LIF (spikingjelly's cupy backend unavailable: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    n = swap_in_spikingjelly(model, "cupy")
    return f"neurons: spikingjelly {version} MultiStepLIFNode, cupy backend, x{n} (the original's)"


class Runner:
    """One variant: its model, optimizer, scaler and batch on the GPU."""

    def __init__(self, variant: str, key: str, state: dict, size: int):
        from qkformer import fused

        self.variant = variant
        self.model = build(key, "fast" if variant == "default" else "reference", "cuda")
        self.model.load_state_dict(state)
        self.model.train()
        self.x, self.y = batch(key, self.model, size, "cuda")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler("cuda")
        self.benchmark = variant == "original"
        self.path = fused.describe(self.model, "cuda")
        if variant == "original":
            self.path += "; " + _original_neurons(self.model)

    def forward_backward(self):
        torch.backends.cudnn.benchmark = self.benchmark
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(self.model(self.x).float(), self.y)
        self.scaler.scale(loss).backward()
        return loss

    def step(self):
        loss = self.forward_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def close(self):
        del self.model, self.optimizer, self.scaler, self.x, self.y
        gc.collect()
        torch.cuda.empty_cache()


def _state(key: str) -> dict:
    """Weights with calibrated firing, made on the GPU (a small batch: it only sets BN biases)."""
    model = build(key, "fast", "cuda")
    x, _ = batch(key, model, 4, "cuda")
    rate = calibrate_firing(model, x)
    print(f"{key}: firing calibrated to {rate:.1%}", flush=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model, x
    return state


def _host_syncs(runner: Runner) -> int | None:
    """Synchronising calls in one forward + backward, by torch's sync debug mode (None where
    this torch has none). The optimizer step is left out: GradScaler reads its inf flag there."""
    if not hasattr(torch.cuda, "set_sync_debug_mode"):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.forward_backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    runner.optimizer.zero_grad(set_to_none=True)
    return sum("synchroniz" in str(w.message) for w in caught)


def _profile(runner: Runner, table: bool) -> int:
    """Device events (kernels, copies, sets) in one profiled step; prints the top 10 if asked."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.step()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    if table:
        averages = prof.key_averages()
        try:
            text = averages.table(sort_by="self_device_time_total", row_limit=10)
        except (AttributeError, KeyError):  # torch before the device_* names
            text = averages.table(sort_by="self_cuda_time_total", row_limit=10)
        print(f"{runner.variant}: profiler, one step, top 10 by CUDA time\n{text}", flush=True)
    return kernels


def run_time(args) -> int:
    state = _state(args.model)
    ms, kernels = {}, {}
    for variant in VARIANTS:
        runner = Runner(variant, args.model, state, args.batch)
        seen, hooks = _lif_input_dtypes(runner.model)
        for _ in range(args.warmup):
            runner.step()
        for h in hooks:
            h.remove()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.steps):
            loss = runner.step()
        end.record()
        torch.cuda.synchronize()
        ms[variant] = start.elapsed_time(end) / args.steps
        syncs = _host_syncs(runner)
        kernels[variant] = _profile(runner, table=variant == "default")
        lif = (", LIF module inputs " + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items()))
               if seen else "")
        print(f"{variant}: {ms[variant]:.1f} ms/step ({args.steps} steps after {args.warmup}, "
              f"CUDA events), loss {loss.item():.3f}, {kernels[variant]} device kernels/step, "
              f"host syncs in forward+backward: {'n/a' if syncs is None else syncs}, "
              f"cudnn.benchmark {'on' if runner.benchmark else 'off'}{lif}; {runner.path}",
              flush=True)
        runner.close()
    print(f"{args.model} batch {args.batch}, fp16 AMP: default {ms['default']:.1f} ms/step, "
          f"original {ms['original']:.1f} ms/step, default/original {ms['default'] / ms['original']:.2f}x "
          f"time, {kernels['default'] / max(kernels['original'], 1):.2f}x kernels")
    return 0


def run_memory(args) -> int:
    state = _state(args.model)
    per_image = {}
    for variant in VARIANTS:
        for size in args.batches:
            runner = Runner(variant, args.model, state, size)
            runner.step()  # optimizer state, gradients' first allocation, cuDNN's choice
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            runner.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            per_image[variant, size] = (peak - base) / size
            print(f"{variant} batch {size}: peak allocated {peak / 1e9:.2f} GB, of which the step "
                  f"{(peak - base) / 1e9:.2f} GB = {per_image[variant, size] / 1e6:.0f} MB/image "
                  f"(weights, gradients, optimizer state: {base / 1e9:.2f} GB); {runner.path}",
                  flush=True)
            runner.close()
    first = args.batches[0]
    ratio = per_image["default", first] / per_image["original", first]
    print(f"{args.model} batch {first}: step memory per image, default/original {ratio:.2f}x "
          f"(counted figures: python benchmarks/gpu_cost.py, 'peak live memory / image')")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("time", "memory"))
    p.add_argument("--model", default="hst384", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU step benchmark skipped")
        return 0
    return run_time(args) if args.what == "time" else run_memory(args)


if __name__ == "__main__":
    sys.exit(main())
