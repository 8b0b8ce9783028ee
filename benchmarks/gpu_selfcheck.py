"""The CUDA verdicts in one run: the CuPy LIF kernel's self-check per dtype (and proof that it
launched), the Triton units' self-check, and which path a model takes by default on CUDA.

    python benchmarks/gpu_selfcheck.py

Exit status 1 when the LIF kernel is unusable for a dtype, when the path line cannot be formed
or when one AMP training step of a small model on the default path is not finite. The Triton
units being off is not a failure here: the default then takes the reference path, and this
prints why. Without CUDA it prints "no CUDA device: GPU self-checks skipped" and exits 0.
"""
from __future__ import annotations

import os
import sys

import torch

from _common import batch, build

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lif_verdicts() -> tuple[list, list]:
    """(dtypes the kernel served, problems)."""
    from qkformer import cuda as lif_cuda
    from qkformer.neuron import lif_multistep

    ok, problems = [], []
    if not lif_cuda.is_available():
        return ok, [f"LIF kernel: {lif_cuda.unavailable_reason()}"]
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        before = sum(lif_cuda.launch_counts().values())
        try:
            x = (torch.randn(4, 257, device="cuda") + 0.6).to(dtype).requires_grad_()
            lif_multistep(x, backend="cupy").float().sum().backward()  # first use: self-check
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any failure is this dtype's verdict
            problems.append(f"LIF kernel {name}: {type(e).__name__}: {e}")
            continue
        launched = sum(lif_cuda.launch_counts().values()) - before
        reason = lif_cuda.disabled_reason(x.device, dtype)
        if reason is not None or launched < 2:  # forward and backward
            problems.append(f"LIF kernel {name}: {reason or f'{launched} launches, expected 2'}")
        else:
            ok.append(name)
    return ok, problems


def triton_line(device: torch.device) -> str:
    try:
        from qkformer import triton_units
    except ImportError:
        return "triton units: module not present"
    from qkformer import fused

    # Without the override the default's rule runs the Triton self-check for every AMP dtype.
    os.environ.pop("QKFORMER_CUDA_FAST_PATH", None)
    fused.fast_path_ready(device)
    return triton_units.describe(device)


def default_step(device: torch.device) -> str:
    """One fp16 AMP training step of a small model as built by default; its path line."""
    from qkformer import fused

    model = build("quick", "fast", str(device)).train()
    x, y = batch("quick", model, 4, str(device))
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    if not torch.isfinite(loss) or not all(torch.isfinite(p.grad).all()
                                           for p in model.parameters() if p.grad is not None):
        raise RuntimeError(f"the default path's AMP step is not finite (loss {loss.item()})")
    return fused.describe(model, device)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: GPU self-checks skipped")
        return 0
    device = torch.device("cuda")
    failed = False
    ok, problems = lif_verdicts()
    for line in problems:
        print(line)
    failed |= bool(problems)
    lif = f"LIF kernel: ok ({', '.join(ok)})" if not problems else "LIF kernel: FAILED"
    print(lif)
    triton = triton_line(device)
    print(triton)
    try:
        path = default_step(device)
    except Exception as e:  # noqa: BLE001 - reported as this part's failure
        path = f"default path: FAILED ({type(e).__name__}: {e})"
        failed = True
    print(f"default on CUDA: {path}")
    if "triton units" in triton and "module not present" not in triton:
        from qkformer import triton_units

        print(f"after a model step: {triton_units.describe(torch.device('cuda', 0))}")
    short = path.split("(")[0].strip()
    print(f"{lif}; {triton.split(' (')[0]}; default {short}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
