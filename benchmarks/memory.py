"""Training memory: the bytes autograd keeps for backward, original vs ours vs ours checkpointed.

For each model, one training forward at the given batch, counted with
``torch.autograd.graph.saved_tensors_hooks`` (every storage once; the same on any device):

    original      the authors' computation (reference path + spikingjelly neurons)
    ours          the default: fast path, inputs of every fused unit kept as bits / bytes
    ours-plain    the fast path with compact storage off (the same values, kept as floats)
    checkpointed  ours + set_grad_checkpointing(True): each layer keeps only its input

It prints MB per image, the ratios to the original, and the train-step time of ours against
ours-plain (compact storage must not slow the step) and of checkpointed against ours, each kind
in a fresh process, the fastest median of ``--rounds`` alternating rounds. From the bytes it derives the largest per-GPU batch of HST-10-768
at 224 px under fp16 AMP in 32 GB and 80 GB, showing each term. On a CUDA device
(``--device cuda``) it adds the measured ``torch.cuda.max_memory_allocated`` of a train step.

    python benchmarks/memory.py [--models cifar hst384 hst768 dvs] [--step-models cifar dvs]
                                [--steps 3] [--threads 2] [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import MODELS, batch, build, saved_bytes

KINDS = ("original", "ours", "ours-plain", "checkpointed")
TARGET_DEFAULT, TARGET_CHECKPOINTED, TARGET_CKPT_TIME = 0.5, 0.2, 1.4
GPU_MEMORY_GB = (32, 80)
RESERVE_GB = 1.0  # CUDA context, library workspaces, allocator slack


def _model(key: str, kind: str, device: str):
    return build(key, {"original": "original", "ours": "fast", "ours-plain": "fast",
                       "checkpointed": "checkpointed"}[kind], device)


def _compact(kind: str):
    from qkformer import fused

    return fused.compact_storage(kind != "ours-plain")


def forward_saved(key: str, kind: str, size: int, device: str, amp: bool = False) -> int:
    model = _model(key, kind, device).train()
    x, _ = batch(key, model, size, device)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with _compact(kind), torch.autocast(device, dtype=dtype, enabled=amp):
        return saved_bytes(lambda: model(x))


def layer_profile(key: str, size: int, device: str, amp: bool):
    """Largest saved bytes of a single SPEDS or block and largest layer output (elements), per
    image, of the default model: what a checkpointed backward recomputes at once."""
    from qkformer import fused

    model = _model(key, "ours", device).train()
    x, _ = batch(key, model, size, device)
    layers = [m for embed, stage in model.embeds_and_stages() for m in (embed, *stage)]
    calls = {}

    def grab(module, args, kwargs):
        calls[module] = (args[0].detach(), dict(kwargs))

    hooks = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in layers]
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=amp):
        model(x)
    for h in hooks:
        h.remove()
    per_layer, largest_out = [], 0
    with fused.compact_storage(True), torch.autocast(device, dtype=dtype, enabled=amp):
        for layer in layers:
            inp, kwargs = calls[layer]
            out = []
            per_layer.append(saved_bytes(lambda: out.append(layer(inp, **kwargs))))
            largest_out = max(largest_out, out[0].numel())
    return max(per_layer) / size, largest_out / size


def step_time(kind: str, key: str, size: int, steps: int, device: str) -> float:
    """Median train-step time (forward + backward + SGD step) of one kind, after a warm-up."""
    model = _model(key, kind, device).train()
    x, y = batch(key, model, size, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    with _compact(kind):
        for r in range(steps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:  # the first step warms up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


STEP_KINDS = ("ours", "ours-plain", "checkpointed")


def step_times(key: str, size: int, args) -> dict:
    """Each kind in a fresh process (none inherits another's heap), ``--rounds`` times,
    alternating; the fastest median of each kind."""
    import json
    import subprocess
    import sys

    best = {}
    for _ in range(args.rounds):
        for kind in STEP_KINDS:
            cmd = [sys.executable, __file__, "--step-worker", kind, "--step-model", key, "--batch",
                   str(size), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not out:
                raise RuntimeError(f"step timing of {key}/{kind} failed:\n{proc.stderr[-2000:]}")
            best[kind] = min(best.get(kind, float("inf")), json.loads(out[0][len("RESULT "):]))
    return best


def cuda_peak(key: str, kind: str, size: int) -> float:
    model = _model(key, kind, "cuda").train()
    x, y = batch(key, model, size, "cuda")
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with _compact(kind):
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                   help="models whose saved bytes to count (default: cifar hst384 hst768 dvs)")
    p.add_argument("--step-models", nargs="+", default=None, choices=list(MODELS),
                   help="models whose step times to measure (default: cifar dvs)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default per model)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per kind")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    p.add_argument("--rounds", type=int, default=3, help="step-time rounds (the fastest kept)")
    p.add_argument("--step-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step_worker:
        import json

        torch.set_num_threads(args.threads)
        t = step_time(args.step_worker, args.step_model, args.batch, args.steps, args.device)
        print("RESULT " + json.dumps(t), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU memory benchmark skipped")
        return 0
    torch.set_num_threads(args.threads)
    models = args.models or (["quick", "quick-dvs"] if args.quick else ["cifar", "hst384", "hst768", "dvs"])
    step_models = args.step_models or (["quick"] if args.quick else ["cifar", "dvs"])
    projection = "quick" if args.quick else "hst768"
    missed = []

    print(f"saved-for-backward bytes of one training forward (fp32, {args.device}), per image")
    print(f"{'model':<10} {'batch':>5} " + " ".join(f"{k:>13}" for k in KINDS)
          + f" {'ours/orig':>9} {'ckpt/orig':>9}")
    results = {}
    for key in models:
        size = args.batch or MODELS[key][3]
        mb = {k: forward_saved(key, k, size, args.device) / size / 1e6 for k in KINDS}
        results[key] = mb
        r_default, r_ckpt = mb["ours"] / mb["original"], mb["checkpointed"] / mb["original"]
        print(f"{key:<10} {size:>5} " + " ".join(f"{mb[k]:10.1f} MB" for k in KINDS)
              + f" {r_default:8.2f}x {r_ckpt:8.3f}x")
    for key, mb in results.items():
        for label, value, target in (("ours (default)", mb["ours"] / mb["original"], TARGET_DEFAULT),
                                     ("checkpointed", mb["checkpointed"] / mb["original"],
                                      TARGET_CHECKPOINTED)):
            ok = value <= target
            if not ok:
                missed.append(f"{key} {label}")
            print(f"ratio: {key} saved bytes per image, {label} vs original: {value:.3f}x "
                  f"(target <= {target}x) {'PASS' if ok else 'FAIL'}")

    print()
    print(f"train-step time (forward + backward + SGD, fp32, {args.threads} threads, median of "
          f"{args.steps} steps, each kind in a fresh process, fastest of {args.rounds} rounds)")
    for key in step_models:
        size = args.batch or MODELS[key][3]
        t = step_times(key, size, args)
        print(f"  {key} (batch {size}): ours {t['ours']:.3f} s, ours-plain {t['ours-plain']:.3f} s, "
              f"checkpointed {t['checkpointed']:.3f} s")
        r_plain, r_ckpt = t["ours"] / t["ours-plain"], t["checkpointed"] / t["ours"]
        print(f"ratio: {key} step time, compact storage on vs off: {r_plain:.2f}x "
              f"(target: no slower, <= 1.05x with noise) {'PASS' if r_plain <= 1.05 else 'FAIL'}")
        ok = r_ckpt <= TARGET_CKPT_TIME
        missed += [f"{key} step time"] if (not ok or r_plain > 1.05) else []
        print(f"ratio: {key} step time, checkpointed vs ours: {r_ckpt:.2f}x "
              f"(target <= {TARGET_CKPT_TIME}x) {'PASS' if ok else 'FAIL'}")

    # ---- the largest batch of HST-10-768 at 224 px under fp16 AMP ------------------------------
    size = args.batch or MODELS[projection][3]
    print()
    print(f"largest per-GPU batch of {MODELS[projection][0]} at {MODELS[projection][2]} px under "
          f"fp16 AMP, derived from the bytes (AMP measured as {'fp16' if args.device == 'cuda' else 'bf16 autocast: the same 2-byte storage as fp16'}):")
    model = _model(projection, "ours", "meta" if args.device == "cpu" else args.device)
    params = sum(p.numel() for p in model.parameters())
    fixed = 16 * params  # fp32 weights + fp32 grads + AdamW exp_avg + exp_avg_sq
    amp = {k: forward_saved(projection, k, size, args.device, amp=True) / size
           for k in ("original", "ours", "checkpointed")}
    layer_max, out_max = layer_profile(projection, size, args.device, amp=True)
    grads = 2 * 2 * out_max  # the gradients of one layer's output and input, fp16
    print(f"  fixed: 16 B x {params:,} parameters (weights, grads, 2 AdamW states, fp32) = "
          f"{fixed / 1e9:.2f} GB; reserve {RESERVE_GB:.1f} GB (CUDA context, workspaces)")
    print(f"  per image: saved bytes (AMP) + activation gradients of one layer "
          f"({grads / 1e6:.0f} MB); checkpointed also holds one recomputed layer "
          f"({layer_max / 1e6:.0f} MB)")
    for kind in ("original", "ours", "checkpointed"):
        per_image = amp[kind] + grads + (layer_max if kind == "checkpointed" else 0)
        fits = [int((gb * 1e9 - fixed - RESERVE_GB * 1e9) // per_image) for gb in GPU_MEMORY_GB]
        print(f"  {kind:<13} {amp[kind] / 1e6:8.1f} MB saved + transients = {per_image / 1e6:8.1f} "
              f"MB/image -> batch {fits[0]} in {GPU_MEMORY_GB[0]} GB, {fits[1]} in "
              f"{GPU_MEMORY_GB[1]} GB")
    if not args.quick:
        print("  (the authors' logs: 24 images per 32 GB V100 at 30.3 GB, original code)")
    if args.device == "cuda":
        print()
        print("measured on this GPU: torch.cuda.max_memory_allocated of a train step (fp16 AMP), "
              "per image")
        for kind in ("original", "ours", "checkpointed"):
            print(f"  {projection} {kind}: {cuda_peak(projection, kind, size) / 1e6:.1f} MB/image")
    if missed:  # printed, not an exit status: a smoke run's ratios mean nothing
        print(f"targets missed: {missed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
