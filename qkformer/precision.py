"""Which precision a run uses: fp16 autocast on CUDA (as the original), bf16 autocast on a CPU
that computes bf16 natively and measurably faster than fp32, fp32 otherwise; one line says
which and why."""
from __future__ import annotations

import functools
import platform
import time
from contextlib import nullcontext

import torch

__all__ = ["cpu_bf16_native", "cpu_bf16_gemm_speedup", "cpu_bf16_pays", "resolve_amp",
           "autocast_for"]


# CPU features with which oneDNN computes bf16 natively (dot-product / matrix instructions);
# without them torch still runs bf16, by converting to fp32 and back around every operation,
# which is several times slower than fp32 itself. Keyed by torch.cpu.get_capabilities() names.
_NATIVE_BF16 = {"x86_64": ("amx_bf16", "avx512_bf16"), "aarch64": ("bf16", "sve_bf16"),
                "arm64": ("bf16", "sve_bf16")}


def _cpu_capabilities() -> dict:
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    caps = {"architecture": platform.machine().lower()}  # torch < 2.10: the older probes
    for name, probe in (("avx512_bf16", "_is_avx512_bf16_supported"),
                        ("amx_bf16", "_is_amx_tile_supported")):  # AMX tiles come with AMX-BF16
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            caps[name] = bool(fn())
    return caps


def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, as torch reports it, and the feature that says so
    (or what is missing)."""
    caps = _cpu_capabilities()
    arch = str(caps.get("architecture", platform.machine())).lower()
    wanted = _NATIVE_BF16.get(arch, ())
    found = [f for f in wanted if caps.get(f)]
    if not torch.backends.mkldnn.is_available():
        return False, "torch is built without oneDNN"
    if found:
        return True, found[0].upper()
    return False, f"no {'/'.join(f.upper() for f in wanted) or 'bf16 instructions'} on {arch}"


# A CPU can report native bf16 (AVX512_BF16) and still run bf16 GEMMs slower than fp32 ones
# (a 2-core Xeon VM measured 0.52-0.63x); autocast only pays where its GEMMs are clearly faster.
_BF16_WORTH = 1.25
_PROBE_SHAPE = (2048, 512, 512)  # tokens x channels of a projection, as in the models' units


@functools.lru_cache(maxsize=None)
def cpu_bf16_gemm_speedup(threads: int) -> float:
    """fp32 time / bf16 time of one GEMM the size of a model's projection on this CPU at
    ``threads`` threads (best of 5 each, alternating; about 0.1 s, once per process)."""
    m, k, n = _PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    pairs = {dt: (torch.randn(m, k, generator=g).to(dt), torch.randn(k, n, generator=g).to(dt))
             for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dt, (a, b) in pairs.items():
            torch.mm(a, b)  # warm-up: oneDNN's first call picks and builds its kernel
        for _ in range(5):
            for dt, (a, b) in pairs.items():
                t = time.perf_counter()
                torch.mm(a, b)
                best[dt] = min(best[dt], time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return best[torch.float32] / best[torch.bfloat16]


def cpu_bf16_pays() -> tuple[bool, str]:
    """Whether bf16 autocast should speed up training on this CPU: bf16 native (as torch
    reports it) and its GEMMs measured at least 1.25x fp32's speed; and why, in words."""
    native, why = cpu_bf16_native()
    if not native:
        return False, f"bf16 would be emulated on this CPU, {why}"
    speedup = cpu_bf16_gemm_speedup(torch.get_num_threads())
    if speedup < _BF16_WORTH:
        return False, (f"this CPU computes bf16 natively ({why}) but its bf16 GEMMs measured "
                       f"{speedup:.2f}x fp32's speed")
    return True, (f"this CPU computes bf16 natively, {why}; its bf16 GEMMs measured "
                  f"{speedup:.1f}x fp32's speed")


def resolve_amp(device: torch.device, amp=None, training: bool = True) -> tuple[bool, str]:
    """``(use autocast, one line saying which precision and why)`` for ``--amp`` = True (force
    on), False (force off) or None / 'auto': fp16 on CUDA; on CPU bf16 only where it is native
    and measurably faster (:func:`cpu_bf16_pays`)."""
    device = torch.device(device)
    if isinstance(amp, str):
        if amp.lower() != "auto":
            raise ValueError(f"amp must be true, false or auto, got {amp!r}")
        amp = None
    if device.type == "cuda":
        kind = "fp16 autocast" + (" with GradScaler" if training else "")
        if amp is False:
            return False, "precision: fp32 (amp forced off)"
        return True, f"precision: {kind} (CUDA{', amp forced on' if amp else ''})"
    native, why = cpu_bf16_native()
    if amp is False:
        return False, "precision: fp32 (amp forced off)"
    if amp:
        note = f"native: {why}" if native else f"emulated, slower than fp32: {why}"
        return True, f"precision: bf16 autocast (amp forced on; on this CPU bf16 is {note})"
    pays, reason = cpu_bf16_pays()
    if pays:
        return True, f"precision: bf16 autocast (auto: {reason})"
    return False, f"precision: fp32 (auto: {reason}; --amp forces bf16 on)"


def autocast_for(device: torch.device, amp: bool):
    """Mixed precision: fp16 on CUDA (as the original), bf16 on CPU (no fp16 GEMMs there).
    Whether to use it at all is :func:`resolve_amp`'s answer."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
