"""Train-step and eval benchmark of the CIFAR-10 model against the original's neuron, in one run.

Builds HST-4-384 (``qkformer_cifar10``, T=4) at batch 16 on random 32x32 images, and a baseline
copy whose every ``MultiStepLIF`` is replaced by what the original computes: spikingjelly
0.0.0.0.14 ``MultiStepLIFNode(tau=2., v_threshold=<same>, detach_reset=True, backend='torch')``
(one autograd graph per time step), reset with ``functional.reset_net`` before every forward.
The SSA's legacy ``proj_lif`` call hands it ``[T*B, C*N]``, which spikingjelly takes as T*B steps
of C*N neurons, exactly as in the original.

Configurations (each in a fresh subprocess, so peak RSS is its own):

    baseline          spikingjelly neurons, fp32: eval, then train
    fp32              this package, fp32: eval, then train
    amp               this package, bf16 autocast on CPU (fp16 and bf16 on CUDA): eval, then train
    folded            qkformer.inference.prepare_for_inference (BN folded, no grad): eval
    folded-compile    the same, torch.compile'd: eval
    compile           torch.compile(model), fp32: eval, then train

A train step is forward + backward + AdamW step; eval is a ``no_grad`` forward. Each phase runs 1
warm-up step (compilation happens there) and ``--steps`` measured steps; the median is reported.
Peak memory is ``ru_maxrss`` minus the RSS before the first step (eval runs first, so the train
figure is the peak of the whole process; a train step holds more than an eval forward).

The GEMM limit: this process counts the GEMM FLOPs (convolutions, matmuls, their backward) of one
step with ``torch.utils.flop_counter.FlopCounterMode`` and times a large ``torch.mm`` and the same
product as a 1x1 convolution per dtype, before and after the configurations (the best counts);
each configuration's fraction is (FLOPs / step time) / peak of the dtype its GEMMs run in.

A configuration whose step would take longer than ``--max-step-seconds`` at the estimated speed
(FLOPs / GEMM peak; this happens to bf16 on CPUs without native bf16, where it is emulated) runs
at a smaller batch with one measured step; its times are scaled linearly to the requested batch
and marked ``*``, and its memory is not compared.

    python benchmarks/train_step.py [--batch 16] [--steps 3] [--configs fp32 amp ...]
                                    [--threads 2] [--quick] [--device cuda]

``--quick`` runs a tiny model at batch 2 (a smoke test for CI; its ratios mean nothing).
``--device cuda`` runs the GPU variant: the LIF backend 'auto' (the CuPy kernel when CuPy works),
CUDA AMP in fp16 (with a GradScaler) and bf16, peak memory from ``torch.cuda.max_memory_allocated``.
On a machine without CUDA it prints "no CUDA device: GPU train-step benchmark skipped" and exits 0.
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
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CPU_CONFIGS = ("baseline", "fp32", "amp", "folded", "folded-compile", "compile")
CUDA_CONFIGS = ("baseline", "fp32", "amp", "amp-bf16", "folded", "folded-compile", "compile")
QUICK_CONFIGS = ("baseline", "fp32", "amp", "folded")  # compiling takes minutes on a cold cache
# glibc malloc kept from returning freed memory to the OS (and from serving big tensors by mmap),
# so a step's activations reuse pages instead of faulting fresh zeroed pages in every step.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
TRAIN_PHASE = {"baseline", "fp32", "amp", "amp-bf16", "compile"}

FULL_MODEL = dict(name="qkformer_cifar10", kwargs={}, img=32)
QUICK_MODEL = dict(name="qkformer_cifar10",
                   kwargs=dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, T=2), img=16)

# Targets of the issue, each against the baseline fp32 of the same run.
TARGET_FP32_TRAIN = 1.3
TARGET_FP32_MEMORY = 0.5
TARGET_AMP_TRAIN = 3.0
TARGET_AMP_EVAL = 3.5


# --------------------------------------------------------------------------------------------
# model construction (shared by the parent's FLOP count and the workers)
# --------------------------------------------------------------------------------------------
def build_model(quick: bool, device: str, baseline: bool = False):
    import timm

    import qkformer  # noqa: F401  (registers the models)

    spec = QUICK_MODEL if quick else FULL_MODEL
    torch.manual_seed(0)
    model = timm.create_model(spec["name"], fast_path=not baseline, **spec["kwargs"])
    if baseline:  # the original's computation: the layer-by-layer path, spikingjelly's neuron
        swap_in_spikingjelly(model)
    return model.to(device), spec["img"]


class SpikingjellyLIF(torch.nn.Module):
    """spikingjelly's multistep LIF (torch backend), reset before each forward as the original's
    ``functional.reset_net(model)`` after each batch made every batch start from V = 0."""

    def __init__(self, v_threshold: float):
        super().__init__()
        from spikingjelly.clock_driven.neuron import MultiStepLIFNode

        self.node = MultiStepLIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True,
                                     backend="torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.clock_driven import functional

        functional.reset_net(self.node)
        return self.node(x)


def swap_in_spikingjelly(model: torch.nn.Module) -> int:
    """Replace every MultiStepLIF by :class:`SpikingjellyLIF` in place; returns how many."""
    from qkformer.neuron import MultiStepLIF

    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, MultiStepLIF)]
    for parent, name, lif in swaps:
        if (lif.tau, lif.alpha, lif.detach_reset) != (2.0, 4.0, True):
            raise ValueError(f"{name}: the baseline neuron only covers tau=2, alpha=4, detach_reset")
        setattr(parent, name, SpikingjellyLIF(lif.v_threshold))
    return len(swaps)


def random_batch(batch: int, img: int, device: str, num_classes: int = 10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def amp_dtype(config: str, device: str):
    if config == "amp-bf16" or (config == "amp" and device == "cpu"):
        return torch.bfloat16
    if config == "amp":
        return torch.float16
    return None


# --------------------------------------------------------------------------------------------
# measurements in the parent: GEMM peaks and GEMM FLOPs per step
# --------------------------------------------------------------------------------------------
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


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
    takes ``min_time``) and the same product as a 1x1 convolution (oneDNN on CPU, which has its
    own bf16 path)."""
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
    # [n/64 images, n channels, 8x8] x [n, n, 1, 1]: the same n^3 multiply-adds
    img = torch.randn(max(n // 64, 1), n, 8, 8, device=device).to(dtype)
    w = torch.randn(n, n, 1, 1, device=device).to(dtype)
    conv_flops = 2 * img.shape[0] * 64 * n * n
    rate_conv = _best_rate(lambda: torch.nn.functional.conv2d(img, w), conv_flops, device, reps)
    return max(rate, rate_conv)


def count_gemm_flops(args) -> dict:
    """GEMM FLOPs of one train step (forward + backward) and one eval forward, this package's
    model in fp32 (the baseline and every other configuration do the same GEMMs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, img = build_model(args.quick, args.device)
    x, y = random_batch(args.batch, img, args.device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    train = counter.get_total_flops()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return {"train": train, "eval": counter.get_total_flops()}


# --------------------------------------------------------------------------------------------
# worker: one configuration in a fresh process
# --------------------------------------------------------------------------------------------
def _rss_now() -> int:
    """Current resident set in bytes (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _rss_peak()


def _rss_peak() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _timed(fn, steps: int, device: str):
    """(first call seconds, median of ``steps`` further calls)."""
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


def run_worker(args) -> dict:
    import gc

    from qkformer.inference import prepare_for_inference

    config, device = args.worker, args.device
    torch.set_num_threads(args.threads)
    model, img = build_model(args.quick, device, baseline=(config == "baseline"))
    x, y = random_batch(args.batch, img, device)
    dtype = amp_dtype(config, device)

    def amp():
        return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
    out = {"config": config, "batch": args.batch, "threads": torch.get_num_threads()}

    if config.startswith("folded"):
        eval_model = prepare_for_inference(model, compile=(config == "folded-compile"))
    elif config == "compile":
        eval_model = torch.compile(model)
    else:
        eval_model = model

    compile_counters = None
    if "compile" in config:
        from torch._dynamo.utils import counters

        counters.clear()

    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()

    def peak() -> int:
        return (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak()) - base

    # eval first: its peak is below a train step's, so the process peak after training is the
    # train figure
    eval_model.eval()

    def eval_step():
        with torch.no_grad(), amp():
            eval_model(x)

    out["eval_first_s"], out["eval_s"] = _timed(eval_step, args.steps, device)
    out["eval_peak_bytes"] = peak()

    if config in TRAIN_PHASE:
        # the compiled module is recompiled for training mode on its first train call
        train_model = eval_model if config == "compile" else model
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            with amp():
                loss = torch.nn.functional.cross_entropy(train_model(x), y)
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

    if "compile" in config:
        from torch._dynamo.utils import counters as c

        compile_counters = {
            "graph_breaks": sum(c["graph_break"].values()),
            "break_reasons": sorted({k.split("\n")[0][:120] for k in c["graph_break"]}),
            "frames_compiled": c["stats"].get("unique_graphs", 0),
        }
        out["compile"] = compile_counters
    return out


# --------------------------------------------------------------------------------------------
# parent: run the workers, print the table and the target checks
# --------------------------------------------------------------------------------------------
def _spawn(args, config: str, batch: int, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config,
           "--batch", str(batch), "--steps", str(steps), "--threads", str(args.threads),
           "--device", args.device] + (["--quick"] if args.quick else [])
    env = dict(os.environ)
    if args.tune_malloc:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - t0
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    if proc.returncode != 0 or result is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"  {config}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
        return {"config": config, "error": tail.strip().splitlines()[-1] if tail.strip() else "?"}
    result["wall_s"] = wall
    return result


def _fmt(v, spec="8.3f", none="       -"):
    return none if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (16; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps per phase after 1 warm-up (3; 1 with --quick)")
    p.add_argument("--configs", nargs="+", default=None, help="subset of the configurations")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in every process (2; 1 with --quick)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model, batch 2: a smoke test")
    p.add_argument("--max-step-seconds", type=float, default=45.0,
                   help="run a configuration at a smaller batch when its estimated step is longer")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration (except compiled or scaled ones) this many times, "
                        "alternating, and keep the fastest median: steadier on a shared machine")
    p.add_argument("--jobs", type=int, default=None,
                   help="configurations run at once (1; 2 with --quick, whose times mean nothing)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="run every configuration (baseline included) with GLIBC_TUNABLES that keep "
                        "freed memory in the heap: no page faults on fresh activations each step")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 16)
    args.steps = args.steps or (1 if args.quick else 3)
    args.jobs = args.jobs or (2 if args.quick else 1)
    args.threads = args.threads or (1 if args.quick else 2)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU train-step benchmark skipped")
        return 0
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0

    all_configs = CUDA_CONFIGS if args.device == "cuda" else CPU_CONFIGS
    configs = args.configs or (QUICK_CONFIGS if args.quick else all_configs)
    unknown = [c for c in configs if c not in all_configs]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {list(all_configs)}")
    if "baseline" not in configs:
        configs = ["baseline", *configs]  # every ratio is against it
    torch.set_num_threads(args.threads)

    model_name = "tiny cifar (quick)" if args.quick else "qkformer_cifar10 (HST-4-384, T=4)"
    print(f"{model_name}, batch {args.batch}, {args.threads} threads, device {args.device}, "
          f"torch {torch.__version__}, 1 warm-up + {args.steps} measured steps, {args.rounds} "
          f"round(s){', GLIBC_TUNABLES=' + MALLOC_TUNABLES if args.tune_malloc else ''}", flush=True)
    if args.device == "cpu":
        try:
            print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), "
                  f"{os.cpu_count()} logical CPUs", flush=True)
        except OSError:
            pass
    else:
        from qkformer import cuda as lif_cuda

        print(f"GPU: {torch.cuda.get_device_name()}; LIF kernel: "
              f"{'CuPy (backend auto)' if lif_cuda.is_available() else 'torch, since ' + str(lif_cuda.unavailable_reason())}",
              flush=True)

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.device == "cuda":
        dtypes["fp16"] = torch.float16
    min_time = 0.02 if args.quick else 0.2
    peaks = {k: gemm_peak(dt, args.device, min_time=min_time) for k, dt in dtypes.items()}
    print("GEMM peak (large torch.mm or 1x1 conv): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()),
          flush=True)
    flops = count_gemm_flops(args)
    peaks_first = dict(peaks)
    print(f"GEMM FLOPs per step: train {flops['train'] / 1e9:.1f} GFLOP (forward + backward), "
          f"eval {flops['eval'] / 1e9:.1f} GFLOP", flush=True)

    plan = {}
    for config in configs:
        dt = amp_dtype(config, args.device)
        peak = peaks["fp32" if dt is None else ("bf16" if dt == torch.bfloat16 else "fp16")]
        est = (flops["train"] if config in TRAIN_PHASE else flops["eval"]) / (peak * 1e9)
        batch, steps = args.batch, args.steps
        if est > args.max_step_seconds:
            batch = max(1, int(args.batch * args.max_step_seconds / est))
            steps = 1
            print(f"  {config}: estimated {est:.0f} s per step at {peak:.1f} GFLOP/s; measuring "
                  f"at batch {batch}, 1 step, scaled to batch {args.batch}", flush=True)
        plan[config] = (batch, steps, dt)

    runs = {config: [] for config in configs}
    jobs = []
    for round_ in range(args.rounds):
        for config, (batch, steps, dt) in plan.items():
            if round_ and ("compile" in config or batch != args.batch):
                continue  # one round: compile time dominates / too slow to repeat
            jobs.append((round_, config, batch, steps, dt))

    def job(spec):
        round_, config, batch, steps, dt = spec
        print(f"  running {config}" + (f" (round {round_ + 1})" if args.rounds > 1 else "")
              + " ...", flush=True)
        r = _spawn(args, config, batch, steps)
        if "error" not in r and batch != args.batch:
            scale = args.batch / batch
            for k in ("eval_s", "train_s"):
                if k in r:
                    r[k] *= scale
            r["scaled_from_batch"] = batch
        r["gemm_dtype"] = "fp32" if dt is None else ("bf16" if dt == torch.bfloat16 else "fp16")
        return config, r

    if args.jobs > 1:  # smoke tests only: concurrent configurations disturb each other's timing
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(job, jobs))
    else:
        done = [job(spec) for spec in jobs]
    for config, r in done:
        runs[config].append(r)

    # the peaks again, now that the configurations ran: keep the higher of the two measurements
    for k, dt in dtypes.items():
        peaks[k] = max(peaks[k], gemm_peak(dt, args.device, min_time=min_time))
    if peaks != peaks_first:
        print("GEMM peak, best of before and after: "
              + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)

    # several rounds: the fastest median per phase (the least disturbed by other load), the
    # largest memory peak
    results = {}
    for config, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[config] = rs[0]
            continue
        r = dict(ok[0])
        for k in ("eval_s", "train_s"):
            if k in r:
                r[k] = min(x[k] for x in ok)
        for k in ("eval_peak_bytes", "train_peak_bytes"):
            if k in r:
                r[k] = max(x[k] for x in ok)
        r["rounds"] = len(ok)
        results[config] = r

    # ---- table -------------------------------------------------------------------------------
    print()
    print(f"{'config':<15} {'train s':>8} {'img/s':>7} {'GFLOP/s':>8} {'of peak':>7} "
          f"{'eval s':>8} {'img/s':>7} {'GFLOP/s':>8} {'of peak':>7} {'train MiB':>9} "
          f"{'eval MiB':>8} {'1st train':>9} {'1st eval':>8}")
    mem_unit = 2 ** 20
    for config, r in results.items():
        if "error" in r:
            print(f"{config:<15} FAILED: {r['error']}")
            continue
        peak = peaks[r["gemm_dtype"]]
        row = [f"{config + ('*' if 'scaled_from_batch' in r else ''):<15}"]
        for phase in ("train", "eval"):
            s = r.get(f"{phase}_s")
            if s is None:
                row += ["       -", "      -", "       -", "      -"]
                continue
            gf = flops[phase] / s / 1e9
            row += [f"{s:8.3f}", f"{args.batch / s:7.1f}", f"{gf:8.1f}", f"{gf / peak:6.0%} "]
        scaled = "scaled_from_batch" in r
        for phase in ("train", "eval"):
            b = r.get(f"{phase}_peak_bytes")
            row.append(("   n/a  " if scaled else f"{b / mem_unit:9.0f}") if b is not None
                       else "        -")
        row += [_fmt(r.get("train_first_s"), "9.2f", "        -"), _fmt(r.get("eval_first_s"), "8.2f")]
        print(" ".join(row))
    print(f"(GFLOP/s = GEMM FLOPs / time; 'of peak' = that / the GEMM peak of the dtype the GEMMs "
          f"run in; '*' = measured at batch {', '.join(str(r['scaled_from_batch']) for r in results.values() if 'scaled_from_batch' in r) or '-'}"
          f" and scaled; memory = {'max_memory_allocated' if args.device == 'cuda' else 'peak RSS'} "
          f"above the process before its first step; '1st' = the warm-up step, compilation included)")
    for config, r in results.items():
        if "compile" in r:
            c = r["compile"]
            print(f"{config}: {c['graph_breaks']} graph breaks, {c['frames_compiled']} graphs compiled"
                  + (f"; reasons: {'; '.join(c['break_reasons'][:3])}" if c["break_reasons"] else ""))

    # ---- ratios against the baseline -----------------------------------------------------------
    print()
    base = results.get("baseline", {})

    def ratio(config, key, inverse=True):
        r = results.get(config, {})
        if key not in r or key not in base:
            return None
        return base[key] / r[key] if inverse else r[key] / base[key]

    def check(label, value, target, kind, note=""):
        if value is None:
            print(f"ratio: {label}: not measured (target {kind} {target}x)")
            return
        ok = value >= target if kind == ">=" else value <= target
        print(f"ratio: {label}: {value:.2f}x (target {kind} {target}x) {'PASS' if ok else 'FAIL'}"
              + (f" - {note}" if note and not ok else ""))

    emulated = peaks["bf16"] < peaks["fp32"]
    bf16_note = (f"bf16 GEMMs run at {peaks['bf16']:.1f} GFLOP/s here vs {peaks['fp32']:.1f} fp32: "
                 "this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated"
                 if emulated and args.device == "cpu" else "")
    check("fp32 train step speed-up vs baseline fp32", ratio("fp32", "train_s"), TARGET_FP32_TRAIN, ">=")
    check("fp32 train peak memory vs baseline fp32", ratio("fp32", "train_peak_bytes", inverse=False),
          TARGET_FP32_MEMORY, "<=")
    check(f"amp ({'bf16' if args.device == 'cpu' else 'fp16'}) train step speed-up vs baseline fp32",
          ratio("amp", "train_s"), TARGET_AMP_TRAIN, ">=", bf16_note)
    check(f"amp ({'bf16' if args.device == 'cpu' else 'fp16'}) eval speed-up vs baseline fp32",
          ratio("amp", "eval_s"), TARGET_AMP_EVAL, ">=", bf16_note)
    if "amp-bf16" in results:
        check("amp (bf16) train step speed-up vs baseline fp32", ratio("amp-bf16", "train_s"),
              TARGET_AMP_TRAIN, ">=")
    for config in ("fp32", "folded", "folded-compile", "compile"):
        v = ratio(config, "eval_s")
        if v is not None:
            print(f"ratio: {config} eval speed-up vs baseline fp32: {v:.2f}x")
    fp32 = results.get("fp32", {})
    for config, key, what in (("compile", "train_s", "train"), ("compile", "eval_s", "eval"),
                              ("folded", "eval_s", "eval"), ("folded-compile", "eval_s", "eval")):
        r = results.get(config, {})
        if key in r and key in fp32:
            v = fp32[key] / r[key]
            print(f"ratio: {config} {what} vs eager fp32: {v:.2f}x "
                  f"({'helps' if v > 1.03 else 'no gain' if v > 0.97 else 'slower'})")
    failed = [c for c, r in results.items() if "error" in r]
    if failed:
        print(f"failed configurations: {failed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks_gflops": peaks, "gemm_flops": flops,
                                               "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
