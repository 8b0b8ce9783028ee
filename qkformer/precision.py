"""Which precision a run uses: fp16 autocast on CUDA (as the original), bf16 autocast on a CPU
that computes bf16 natively, fp32 otherwise; one line says which and why."""
from __future__ import annotations

import platform
from contextlib import nullcontext

import torch

__all__ = ["cpu_bf16_native", "resolve_amp", "autocast_for"]


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


def resolve_amp(device: torch.device, amp=None, training: bool = True) -> tuple[bool, str]:
    """``(use autocast, one line saying which precision and why)`` for ``--amp`` = True (force
    on), False (force off) or None / 'auto': fp16 on CUDA; on CPU bf16 only where it is native."""
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
    if native:
        return True, f"precision: bf16 autocast (auto: this CPU computes bf16 natively, {why})"
    return False, (f"precision: fp32 (auto: bf16 would be emulated on this CPU, {why}; "
                   f"--amp forces it on)")


def autocast_for(device: torch.device, amp: bool):
    """Mixed precision: fp16 on CUDA (as the original), bf16 on CPU (no fp16 GEMMs there).
    Whether to use it at all is :func:`resolve_amp`'s answer."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)
