"""Train-step and eval speed of this package against the original's computation, in one run.

For each model (default: the CIFAR-10 model HST-4-384 at 32 px, batch 16, and HST-10-384 at
224 px, batch 2; T = 4), each configuration runs in a fresh process (so its peak RSS is its own):

    baseline   the original: reference path + spikingjelly's neuron, fp32 (benchmarks/_common.py)
    reference  this package's reference path, fp32 (layer by layer, our neuron)
    fp32       the fast path (default), fp32: train step, and plain ``model.eval()`` under no_grad
    folded     qkformer.inference.prepare_for_inference (BatchNorm folded, no grad): eval
    amp        the fast path under autocast: bf16 on a CPU with native bf16 (AVX512-BF16/AMX;
               emulated bf16 is slower than fp32, so it is measured only with --force-bf16),
               fp16 with a GradScaler on CUDA
    compile    torch.compile of the fast path, fp32 (opt-in: compiling takes minutes on a CPU)

A train step is forward + backward + AdamW step; eval is one forward under ``no_grad``. Each
phase runs 1 warm-up step and ``--steps`` measured steps (the median is kept; with ``--rounds``
the configurations run several times, alternating, and the fastest median is kept).

Firing: a freshly initialised QKFormer fires far less than a trained one, which would flatter
the spike-driven products of the fast path. The BatchNorm biases are therefore first shifted so
that every neuron fires at about ``--firing`` (15 %; trained networks: 10-25 %), once, and every
configuration loads the same weights. The input densities the fast path then sees are printed.

The GEMM limit: FLOPs of the convolutions and matmuls of one step (torch's FlopCounterMode on
the reference path), and the GEMM peak of this machine (a large torch.mm or 1x1 convolution per
dtype, before and after the runs, the best kept); each configuration's fraction of the limit is
(FLOPs / time) / peak. Above 100 % means the spike-driven products skipped work.

Memory allocation: every configuration runs with the same allocator settings, by default
those of qkformer's CPU entry points (:func:`qkformer.cpu.memory.keep_freed_memory`: glibc keeps
freed memory for reuse, so no step pages in its large tensors afresh; the configuration that
allocates most would gain most). ``--default-malloc``: glibc's own defaults in every configuration.

    python benchmarks/train_step.py [--models cifar hst384] [--configs ...] [--steps 3]
                                    [--rounds 1] [--threads 2] [--default-malloc] [--quick]
                                    [--device cuda] [--json FILE]

``--quick``: a tiny model, batch 2, one step (a smoke test; its ratios mean nothing).
``--device cuda``: the GPU variant (CuPy LIF kernel, fp16 AMP); without CUDA it prints
"no CUDA device: GPU train-step benchmark skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import MODELS, REPO, batch, build, calibrate_firing
from qkformer.cpu import memory

CPU_CONFIGS = ("baseline", "reference", "fp32", "folded", "amp", "compile")
CUDA_CONFIGS = ("baseline", "reference", "fp32", "folded", "amp", "compile")
DEFAULT_CONFIGS = ("baseline", "reference", "fp32", "folded", "amp")
TRAIN_PHASE = {"baseline", "reference", "fp32", "amp", "compile"}

# Targets, each against the baseline of the same run.
TARGET_TRAIN = 1.4        # fp32 train step, x faster
TARGET_MEMORY = 0.6       # fp32 train peak RSS, x of the baseline
TARGET_FOLDED_EVAL = 1.5  # prepare_for_inference eval, x faster
TARGET_PLAIN_EVAL = 1.2   # model.eval() under no_grad, x faster
TARGET_BF16_TRAIN = 2.5   # bf16 train step vs the fp32 baseline (native bf16 CPUs only)


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# measurements in the parent
# --------------------------------------------------------------------------------------------
def _best_rate(fn, flops: float, device: str, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


def gemm_peak(dtype: torch.dtype, device: str, max_n: int = 4096, min_time: float = 0.2) -> float:
    """GFLOP/s of a large GEMM: the faster of a square ``torch.mm`` (n doubled until one product
    takes ``min_time``) and the same product as a 1x1 convolution (oneDNN on CPU)."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        once = 2 * n ** 3 / _best_rate(lambda: torch.mm(a, b), 2 * n ** 3, device, 1) / 1e9
        if once >= min_time or n >= max_n:
            break
        n *= 2
    reps = max(2, min(10, int(1.0 / max(once, 1e-6))))
    rate = _best_rate(lambda: torch.mm(a, b), 2 * n ** 3, device, reps)
    img = torch.randn(max(n // 64, 1), n, 8, 8, device=device).to(dtype)
    w = torch.randn(n, n, 1, 1, device=device).to(dtype)
    conv_flops = 2 * img.shape[0] * 64 * n * n
    return max(rate, _best_rate(lambda: torch.nn.functional.conv2d(img, w), conv_flops, device, reps))


def count_gemm_flops(key: str, size: int, device: str) -> dict:
    """GEMM FLOPs of one train step (forward + backward) and one eval forward. Counted on the
    reference path: the counter cannot see into the fused units (the same GEMMs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(key, "reference", device)
    x, y = batch(key, model, size, device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {"train": train, "eval": counter.get_total_flops()}


def input_densities(key: str, state_path: str, size: int) -> dict:
    """Mean fraction of non-zeros in the inputs of the fast path's fused units, in train mode:
    spike inputs and count (residual-stream) inputs separately."""
    from qkformer import fused

    model = build(key, "fast")
    model.load_state_dict(torch.load(state_path, weights_only=True))
    x, _ = batch(key, model, size)
    seen = {fused.SPIKES: [], fused.COUNTS: []}
    original = fused._spiking_unit

    def spy(*args):
        kind = args[-2]
        if kind in seen:
            seen[kind].append((args[0] != 0).float().mean().item())
        return original(*args)

    fused._spiking_unit = spy
    try:
        with torch.no_grad():
            model.train()(x)
    finally:
        fused._spiking_unit = original
    return {name: statistics.mean(v) if v else float("nan")
            for name, v in (("spikes", seen[fused.SPIKES]), ("counts", seen[fused.COUNTS]))}


# --------------------------------------------------------------------------------------------
# worker: one configuration in a fresh process
# --------------------------------------------------------------------------------------------
def _rss_now() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak()


def _rss_peak() -> int:
    """Peak RSS of this process's own memory. Linux's ru_maxrss would carry the parent's peak
    over the exec (the parent holds calibrated models), so read VmHWM where there is one."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _timed(fn, steps: int, device: str):
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def amp_dtype(config: str, device: str):
    if config != "amp":
        return None
    return torch.float16 if device == "cuda" else torch.bfloat16


def run_worker(args) -> dict:
    import gc

    from qkformer.inference import prepare_for_inference

    config, device, key = args.worker, args.device, args.worker_model
    torch.set_num_threads(args.threads)
    allocator = memory.setup_for(device)  # what the entry points do (off: --default-malloc)
    kind = {"baseline": "original", "reference": "reference"}.get(config, "fast")
    model = build(key, kind, device)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    x, y = batch(key, model, args.batch, device)
    dtype = amp_dtype(config, device)

    def amp():
        return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    out = {"config": config, "model": key, "batch": args.batch, "threads": torch.get_num_threads(),
           "allocator": allocator}
    if config == "folded":
        eval_model = prepare_for_inference(model)
    elif config == "compile":
        eval_model = torch.compile(model)
    else:
        eval_model = model

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()

    def peak() -> int:
        return (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak()) - base

    eval_model.eval()  # eval first: a train step holds more, so the later peak is the train one

    def eval_step():
        with torch.no_grad(), amp():
            eval_model(x)

    out["eval_first_s"], out["eval_s"] = _timed(eval_step, args.steps, device)
    out["eval_peak_bytes"] = peak()
    if config in TRAIN_PHASE:
        train_model = eval_model if config == "compile" else model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            with amp():
                loss = torch.nn.functional.cross_entropy(train_model(x).float(), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        out["train_first_s"], out["train_s"] = _timed(train_step, args.steps, device)
        out["train_peak_bytes"] = peak()
    return out


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def _spawn(args, key: str, config: str, state: str, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config, "--worker-model", key,
           "--state", state, "--batch", str(args.batch_for[key]), "--steps", str(steps),
           "--threads", str(args.threads), "--device", args.device]
    env = dict(os.environ)
    if args.default_malloc:
        env[memory.ENV] = "0"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"  {key}/{config}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"config": config, "error": tail.strip().splitlines()[-1] if tail.strip() else "?"}
    result["wall_s"] = time.perf_counter() - t0
    return result


def cpu_isa_line() -> str:
    """Which instruction sets ran: the CPU's widest vectors, what ATen, oneDNN and our kernels were
    held to, and the spike-driven products' limits (measured on this machine, or forced)."""
    from qkformer import cpu, sparse

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    held = ", ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                      "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
    forward, weight_grad = sparse.limits()
    return (f"ISA: CPU {widest}; ATen {torch.backends.cpu.get_cpu_capability()}; our kernels "
            f"{cpu.isa()}{'; ' + held if held else ''}; spike-driven products up to "
            f"{forward:.0%} forward, {weight_grad:.0%} weight gradient")


def _bf16_pays(device: str):
    """(whether --amp auto would use 16-bit autocast here, why)."""
    if device == "cuda":
        return True, "CUDA"
    from qkformer.precision import cpu_bf16_pays

    return cpu_bf16_pays()


def _report(key: str, results: dict, flops: dict, peaks: dict, args, bf16_pays) -> list:
    """Print the table and the ratio lines of one model; returns the failed checks."""
    print(f"\n{key}: {MODELS[key][0]}, {MODELS[key][2]} px, batch {args.batch_for[key]}")
    print(f"{'config':<10} {'train s':>8} {'img/s':>7} {'of limit':>8} {'eval s':>8} {'img/s':>7} "
          f"{'of limit':>8} {'train MiB':>9} {'eval MiB':>8}")
    b = args.batch_for[key]
    for config, r in results.items():
        if "error" in r:
            print(f"{config:<10} FAILED: {r['error']}")
            continue
        peak = peaks["fp32" if amp_dtype(config, args.device) is None else
                     ("bf16" if args.device == "cpu" else "fp16")]
        row = [f"{config:<10}"]
        for phase in ("train", "eval"):
            s = r.get(f"{phase}_s")
            if s is None:
                row += ["       -", "      -", "       -"]
                continue
            frac = flops[phase] / s / 1e9 / peak
            row += [f"{s:8.3f}", f"{b / s:7.1f}", f"{frac:7.0%} "]
        for phase in ("train", "eval"):
            v = r.get(f"{phase}_peak_bytes")
            row.append(f"{v / 2 ** 20:9.0f}" if v is not None else "        -")
        print(" ".join(row))
    base = results.get("baseline", {})
    failed = []

    def ratio(config, k, inverse=True):
        r = results.get(config, {})
        if k not in r or k not in base:
            return None
        return base[k] / r[k] if inverse else r[k] / base[k]

    def check(label, value, target, le=False, note=""):
        if value is None:
            print(f"ratio: {key} {label}: not measured (target {'<=' if le else '>='} {target}x)"
                  + (f" - {note}" if note else ""))
            return
        ok = value <= target if le else value >= target
        if not ok:
            failed.append(f"{key} {label}")
        print(f"ratio: {key} {label}: {value:.2f}x (target {'<=' if le else '>='} {target}x) "
              f"{'PASS' if ok else 'FAIL'}")

    check("fp32 train step vs baseline", ratio("fp32", "train_s"), TARGET_TRAIN)
    check("fp32 train peak memory vs baseline", ratio("fp32", "train_peak_bytes", False),
          TARGET_MEMORY, le=True)
    check("folded eval vs baseline", ratio("folded", "eval_s"), TARGET_FOLDED_EVAL)
    check("plain eval (model.eval(), no_grad) vs baseline", ratio("fp32", "eval_s"),
          TARGET_PLAIN_EVAL)
    if args.device == "cpu":
        pays, why = bf16_pays
        note = "" if pays else f"not applicable here: {why}"
        check("bf16 train step vs fp32 baseline", ratio("amp", "train_s"), TARGET_BF16_TRAIN,
              note=note)
        v = ratio("amp", "eval_s")
        if v is not None:
            print(f"ratio: {key} bf16 eval vs fp32 baseline: {v:.2f}x")
    else:
        check("fp16 AMP train step vs fp32 baseline", ratio("amp", "train_s"), TARGET_BF16_TRAIN)
    v = ratio("reference", "train_s")
    if v is not None:
        print(f"ratio: {key} reference path train step vs baseline: {v:.2f}x (our neuron only)")
    v = ratio("compile", "train_s")
    if v is not None:
        print(f"ratio: {key} compiled train step vs baseline: {v:.2f}x")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=[k for k in MODELS if "quick" not in k])
    p.add_argument("--configs", nargs="+", default=None)
    p.add_argument("--batch", type=int, default=None, help="batch size (default per model)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per phase (3)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (2)")
    p.add_argument("--firing", type=float, default=0.15, help="calibrated firing rate")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, batch 2: a smoke test")
    p.add_argument("--default-malloc", action="store_true",
                   help="glibc's default allocator settings in every configuration (default: "
                        "freed memory kept for reuse, as qkformer's CPU entry points run)")
    p.add_argument("--force-bf16", action="store_true",
                   help="measure the bf16 configuration also where bf16 is emulated")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--state", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 3)
    args.threads = args.threads or (1 if args.quick else 2)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU train-step benchmark skipped")
        return 0
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0

    models = ["quick"] if args.quick else (args.models or ["cifar", "hst384"])
    all_configs = CUDA_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    configs = list(args.configs or (("baseline", "fp32", "folded", "amp") if args.quick
                                    else DEFAULT_CONFIGS))
    unknown = [c for c in configs if c not in all_configs]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {list(all_configs)}")
    if "baseline" not in configs:
        configs.insert(0, "baseline")
    bf16_pays = _bf16_pays(args.device)
    if "amp" in configs and args.device == "cpu" and not bf16_pays[0] and not args.force_bf16:
        configs.remove("amp")
    args.batch_for = {k: args.batch or MODELS[k][3] for k in models}
    torch.set_num_threads(args.threads)

    print(f"{', '.join(models)}; configurations {', '.join(configs)}; {args.threads} threads, "
          f"device {args.device}, torch {torch.__version__}, 1 warm-up + {args.steps} measured "
          f"steps, {args.rounds} round(s), firing calibrated to {args.firing:.0%}, "
          f"{'default allocator' if args.default_malloc else 'freed memory kept for reuse'}",
          flush=True)
    if args.device == "cpu":
        pays = "pays" if bf16_pays[0] else "does not pay"
        print(f"bf16 autocast: {pays} ({bf16_pays[1]}); load average before: "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} logical CPUs", flush=True)
        print(cpu_isa_line(), flush=True)
    dtypes = {"fp32": torch.float32, ("bf16" if args.device == "cpu" else "fp16"):
              torch.bfloat16 if args.device == "cpu" else torch.float16}
    min_time = 0.02 if args.quick else 0.2
    peaks = {k: gemm_peak(dt, args.device, min_time=min_time) for k, dt in dtypes.items()}
    print("GEMM peak (large torch.mm or 1x1 conv): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    tmp = tempfile.mkdtemp(prefix="qkformer-bench-")
    states, flops, results = {}, {}, {}
    for key in models:
        model = build(key, "fast")
        x, _ = batch(key, model, args.batch_for[key])
        rate = calibrate_firing(model, x, args.firing)
        states[key] = os.path.join(tmp, f"{key}.pt")
        torch.save(model.state_dict(), states[key])
        flops[key] = count_gemm_flops(key, args.batch_for[key], "cpu")
        dens = input_densities(key, states[key], args.batch_for[key])
        print(f"{key}: mean firing {rate:.1%}; fast-path inputs: spikes {dens['spikes']:.1%} "
              f"non-zero, residual counts {dens['counts']:.1%}; GEMM FLOPs per step: train "
              f"{flops[key]['train'] / 1e9:.1f} G, eval {flops[key]['eval'] / 1e9:.1f} G", flush=True)
        runs = {c: [] for c in configs}
        for round_ in range(args.rounds):
            for config in configs:
                if round_ and config == "compile":
                    continue
                print(f"  running {key}/{config}" + (f" (round {round_ + 1})" if args.rounds > 1 else "")
                      + " ...", flush=True)
                runs[config].append(_spawn(args, key, config, states[key], args.steps))
        results[key] = {}
        for config, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                results[key][config] = rs[0]
                continue
            r = dict(ok[0])
            for k in ("eval_s", "train_s"):
                if k in r:
                    r[k] = min(x[k] for x in ok)
            for k in ("eval_peak_bytes", "train_peak_bytes"):
                if k in r:
                    r[k] = max(x[k] for x in ok)
            results[key][config] = r
    for k, dt in dtypes.items():
        peaks[k] = max(peaks[k], gemm_peak(dt, args.device, min_time=min_time))
    print("\nGEMM peak, best of before and after: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    print("('of limit' = GEMM FLOPs / time / peak of the dtype the GEMMs run in; memory = peak RSS "
          "(CUDA: max_memory_allocated) above the process before its first step)")
    failed = []
    for key in models:
        failed += _report(key, results[key], flops[key], peaks, args, bf16_pays)
    broken = [f"{k}/{c}" for k in models for c, r in results[k].items() if "error" in r]
    if broken:
        print(f"failed configurations: {broken}")
    if failed:
        print(f"targets missed: {failed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks_gflops": peaks, "gemm_flops": flops,
                                               "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
