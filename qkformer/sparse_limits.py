"""Up to which fraction of non-zeros the spike-driven products beat the dense ones, measured on
this machine.

The crossover depends on the CPU (AVX-512 compress-stores and 512-bit gathers against 256-bit
AVX2), on the dense library and on the thread count, so it is not a constant of the code. The
first process that needs it times both products on a few shapes of this model (projections
over tokens and a 3x3 map, forward and weight gradient, float32) at several densities, takes
the density where the sparse product stops winning (interpolated, on the geometric mean over
the shapes), and stores the record beside the compiled kernels. Later processes read the record,
so what a machine decides is fixed once measured. A machine too busy to time anything (load
average above half its cores) gets fixed defaults for its instruction set instead, unstored. ``QKFORMER_SPARSE_MAX_DENSITY`` overrides both
limits (``F`` for both, ``F,W`` for forward and weight gradient; 0 turns the spike-driven
products off).

``python benchmarks/sparse_limits.py`` prints the record and the timed ratios (measuring them if
needed); ``--remeasure`` measures again.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from . import cpu

__all__ = ["DENSITIES", "limits", "measure", "record_path"]

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
CAP = 0.6  # above this the dense product wins on every CPU measured
# (name, input shape [N, H, W, C] or [R, C], kernel size (0: projection), output channels):
# the MLP's and the attention's projections and a SPEDS 3x3 map of the CIFAR/ImageNet models
SHAPES = (
    ("projection 384->384", (4096, 384), 0, 384),
    ("projection 384->1536", (2048, 384), 0, 1536),
    ("3x3 96->96", (8, 16, 16, 96), 3, 96),
)
_VERSION = 1


def record_path() -> Optional[Path]:
    """Where this machine's record lives: beside the kernels' build, per thread count."""
    build = cpu.build_file()
    if build is None:
        return None
    return build.with_name(f"{build.stem}.sparse-limits-{torch.get_num_threads()}t.json")


def _ratio(sparse_fn, dense_fn, repeats: int = 5) -> float:
    """Best sparse time over best dense time, the two timed alternately (a busy moment of the
    machine then slows both, not one)."""
    sparse_fn(), dense_fn()  # warm-up: first-touch pages, oneDNN primitive creation
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for i, fn in enumerate((sparse_fn, dense_fn)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] / best[1]


def _monotone(values):
    """The closest non-decreasing sequence (least squares, pool-adjacent-violators): the ratio
    grows with the density, so a dip or a spike is timing noise."""
    blocks = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    return [s / n for s, n in blocks for _ in range(n)]


def _crossover(densities, ratios) -> float:
    """The density where the ratio sparse/dense time reaches 1, interpolated in log-ratio
    between the last density where sparse wins and the first where it does not."""
    ratios = [math.exp(v) for v in _monotone([math.log(r) for r in ratios])]
    if ratios[0] >= 1:
        return 0.0
    for (d0, r0), (d1, r1) in zip(zip(densities, ratios), zip(densities[1:], ratios[1:])):
        if r1 >= 1:
            a, b = math.log(r0), math.log(r1)
            return round(d0 + (d1 - d0) * (-a) / (b - a), 3)
    return CAP


def measure(pairs: Callable) -> Dict:
    """Time the products on :data:`SHAPES` at :data:`DENSITIES`: the record (limits, ratios).
    ``pairs(shape, kernel_size, out_channels, density, generator)`` returns, per operation
    ('forward', 'weight_grad'), the spike-driven and the dense product as callables
    (:func:`qkformer.sparse.timing_pairs`)."""
    g = torch.Generator().manual_seed(0)
    ratios: Dict[str, Dict[str, list]] = {"forward": {}, "weight_grad": {}}
    t0 = time.perf_counter()
    for name, shape, k, co in SHAPES:
        for op in ratios:
            ratios[op][name] = []
        for d in DENSITIES:
            for op, (sp, dn) in pairs(shape, k, co, d, g).items():
                ratios[op][name].append(_ratio(sp, dn))
    mean = {op: [math.exp(sum(math.log(r[i]) for r in per.values()) / len(per))
                 for i in range(len(DENSITIES))] for op, per in ratios.items()}
    return {"version": _VERSION, "isa": cpu.isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "densities": list(DENSITIES),
            "forward": _crossover(DENSITIES, mean["forward"]),
            "weight_grad": _crossover(DENSITIES, mean["weight_grad"]),
            "ratios": {op: {n: [round(v, 3) for v in r] for n, r in per.items()}
                       for op, per in ratios.items()},
            "seconds": round(time.perf_counter() - t0, 2)}


def _load(path: Path) -> Optional[Dict]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(record, dict) and record.get("version") == _VERSION
          and record.get("torch") == torch.__version__
          and all(isinstance(record.get(k), (int, float)) for k in ("forward", "weight_grad")))
    return record if ok else None


def _save(record: Dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)  # atomic: concurrent ranks read a whole record or none
    except OSError:  # a read-only cache: measured again next time, nothing lost
        if tmp.exists():
            tmp.unlink()


def limits(pairs: Callable, remeasure: bool = False) -> Tuple[float, float, str]:
    """``(forward, weight gradient, where from)``: the densities up to which the spike-driven
    products are used (``pairs``: see :func:`measure`)."""
    forced = os.environ.get("QKFORMER_SPARSE_MAX_DENSITY")
    if forced not in (None, ""):  # "F" for both, or "F,W": forward, weight gradient
        try:
            values = [float(v) for v in forced.split(",")]
        except ValueError:
            raise ValueError(f"QKFORMER_SPARSE_MAX_DENSITY={forced!r} is not a number or a pair "
                             f"of numbers") from None
        if len(values) not in (1, 2) or not all(0 <= v <= 1 for v in values):
            raise ValueError(f"QKFORMER_SPARSE_MAX_DENSITY={forced!r}: one or two fractions in "
                             f"[0, 1] (forward[,weight gradient])")
        return values[0], values[-1], "QKFORMER_SPARSE_MAX_DENSITY"
    path = record_path()
    if path is None:  # no kernels: no spike-driven products
        return 0.0, 0.0, "no CPU kernels"
    record = None if remeasure else _load(path)
    if record is None:
        busy = _busy()
        if busy and not remeasure:  # timings now would decide for good on noise
            forward, weight_grad = UNMEASURED[_widest()]
            return forward, weight_grad, f"not measured ({busy}): defaults for {_widest()}"
        record = measure(pairs)
        _save(record, path)
    return float(record["forward"]), float(record["weight_grad"]), f"measured ({path.name})"


# Used while the machine is too busy to measure (not stored): on AVX-512 the limits found in the
# model's train step (docs/performance.md); on AVX2 the dense products, which never lose there.
UNMEASURED = {"avx512": (0.33, 0.25), "avx2": (0.0, 0.0), "other": (0.0, 0.0)}


def _widest() -> str:
    if cpu.isa() == "avx2":
        return "avx2"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "other"
    return "avx512" if " avx512f" in text else "avx2" if " avx2" in text else "other"


def _busy() -> str:
    """Why the machine is too busy to time products on (empty when it is not): more runnable
    work than a quarter of a core beyond the threads this process would use."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load average {load:.1f} on {cores} cores" if load > 0.25 + 0.5 * cores else ""
