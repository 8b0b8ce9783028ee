"""The demo's epoch time on a quiet and on a shared CPU, for the default thread settings and for
one thread, in one run.

Each configuration trains the demo (``python -m qkformer.demo``'s command line: its model, data,
batch and loader workers) for two shortened epochs of ``--iters`` batches in a fresh process, and
the second epoch's time is kept (the first also pays one-off costs: kernel loading, the
spike-driven product limits). An epoch's time is its training batches plus the evaluation of
the 359 held-out digits, as the demo logs it. Two loads:

    quiet   nothing else started by the benchmark (the load average is printed: other users'
            processes are not controlled)
    busy    one competing busy process (``python -c 'while True: pass'``) per core available

Configurations (``--config NAME[:VAR=VALUE,...]``, environment variables for the child):

    default     the package's defaults (nothing set: the threads of the cores free at start)
    1-thread    OMP_NUM_THREADS=1
    all-cores   OMP_NUM_THREADS=<the cores available>: every core whatever the load (the
                default before the free cores were counted)

Printed: each time, and the ratios the rule of docs/performance.md reads: under load, default /
1-thread (at most 1) and default busy / default quiet (at most ~2); quiet, default / 1-thread.

    python benchmarks/shared_cpu.py [--iters 30] [--rounds 2] [--config NAME[:VAR=VALUE,...]]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"default": {}, "1-thread": {"OMP_NUM_THREADS": "1"},
           "all-cores": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)) if hasattr(
               os, "sched_getaffinity") else os.cpu_count() or 1)}}
# what the child must not inherit from the caller's shell: each configuration sets its own
_CLEARED = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def _child(data: str, out: str, iters: int) -> None:
    from qkformer import demo, threads, train

    threads.fit_for_command_line(True)  # as python -m qkformer.demo does at start
    args = demo.training_args(data, out, epochs=2, progress=False)
    train.main(args + ["--max-iters", str(iters)], default_config="cifar10")
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "epoch_time_s" in r]
    print(json.dumps({"epoch_time_s": epochs[-1]["epoch_time_s"],
                      "acc1": epochs[-1].get("test_acc1")}))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _parse_config(text: str):
    name, _, assignments = text.partition(":")
    if not assignments:
        if name not in CONFIGS:
            raise SystemExit(f"error: unknown --config {name!r}; give NAME:VAR=VALUE,... or one "
                             f"of {', '.join(CONFIGS)}")
        return name, CONFIGS[name]
    env = {}
    for item in assignments.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --config {text!r}: {item!r} is not VAR=VALUE")
        env[key] = value
    return name, env


def _run_one(env_extra, data: Path, iters: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, __file__, "--child", str(data), out, str(iters)],
                           env=env, cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: a child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _busy(n: int):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=30, help="training batches per epoch (demo: 90)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every measurement, the order of the configurations rotated "
                        "each round; the fastest is kept")
    p.add_argument("--config", action="append", default=None,
                   help="NAME[:VAR=VALUE,...] (repeatable; default: default, 1-thread, all-cores)")
    args = p.parse_args(argv)
    configs = dict(_parse_config(c) for c in (args.config or list(CONFIGS)))
    from qkformer.data.synthetic_images import write_digits_image_folder

    cores = _cores()
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_digits_image_folder(Path(tmp) / "digits32", size=32)
        for r in range(args.rounds):
            for load in ("quiet", "busy"):
                hogs = _busy(cores) if load == "busy" else []
                try:
                    time.sleep(1.0 if hogs else 0.0)  # the competitors are running
                    names = list(configs)
                    shift = r % len(names)  # each configuration first in turn: no order bias
                    for name in names[shift:] + names[:shift]:
                        t = _run_one(configs[name], data, args.iters)["epoch_time_s"]
                        key = (load, name)
                        times[key] = min(times.get(key, float("inf")), t)
                        print(f"round {r + 1} {load:5s} {name:10s} {t:7.2f} s   "
                              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
                finally:
                    for h in hogs:
                        h.kill()
                        h.wait()
    print(f"\n{cores} cores; epoch of {args.iters} batches + evaluation; fastest of "
          f"{args.rounds} round(s)")
    for name in configs:
        print(f"{name:10s} quiet {times['quiet', name]:7.2f} s   busy {times['busy', name]:7.2f} s"
              f"   busy / quiet {times['busy', name] / times['quiet', name]:.2f}")
    if "default" in configs and "1-thread" in configs:
        for load in ("quiet", "busy"):
            print(f"{load}: default / 1-thread = "
                  f"{times[load, 'default'] / times[load, '1-thread']:.2f}")
    return {f"{load}/{name}": t for (load, name), t in times.items()}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:4], int(sys.argv[4]))
    else:
        main()
