"""Synaptic operations (SOPs) and energy per image, measured on real inputs.

Method (the convention of Spikformer/Spikingformer, docs/original.md §7.3)::

    E = E_MAC * FLOPs(encoding conv) + E_AC * sum_l SOP_l,   SOP_l = r_l * FLOPs_l * T_l

* FLOPs_l: multiply-accumulates of layer l for one image and one time step, from the shapes seen
  in the forward pass: conv/linear = output elements x fan-in; SSA ``k^T v`` and ``q (k^T v)`` =
  N*d*d per head; the QKTA/QKCA sum of Q and the mask of K = one operation per element (C*N).
  BN is assumed folded into the preceding conv; bias, max-pool and the neuron updates are not
  counted (as in the reference method).
* T_l: the number of time steps the layer runs per image, read from its input (T for every layer
  of the network, 1 for the head, which runs once on the T-averaged features). T enters once.
* r_l: the mean of the layer's actual input tensor, captured with a forward pre-hook. For a binary
  (spike) input this is the firing rate and r_l * FLOPs_l is the exact count of accumulates.
* The first conv reads analog pixels: it is the MAC layer, counted densely. With ``encode_once``
  (default for static images) it is counted for one time step, because the image is identical at
  every step and its conv output can be reused; event input is counted at every step.

docs/original.md Q9 caveat: the residual stream is a *sum* of spike tensors, and several convs read it
directly (the SPEDS-2/3 main and shortcut convs, the q/k/v convs and first MLP conv of every
block, the head). Their input is not binary, so r_l is a mean *count* and r_l * FLOPs_l counts
one accumulate per unit of count (an input of 2 = two accumulates of the same weight). These
layers are detected from the data (is every input value 0 or 1?), flagged ``spike_driven=False``
and reported separately; they are still counted as AC.

CLI::

    python -m qkformer.analysis.energy --model qkformer_10_384 --checkpoint ck.pth \
        --data-dir /data/imagenet --batches 10 --out energy/
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from qkformer.attention import SpikingSelfAttention, QKAttentionBase
from qkformer.config import run_cli

from ._common import (add_data_args, add_model_args, batches_from_args, is_event_model, iter_inputs,
                      max_batches, layer_stage, model_from_args, write_csv, write_json, add_out_arg,
                      output_folder, reference_path)

__all__ = ["E_MAC_PJ", "E_AC_PJ", "LayerEnergy", "EnergyReport", "EnergyMeter", "measure_energy",
           "save_energy"]

E_MAC_PJ = 4.6  # 32-bit float multiply-accumulate, 45 nm (Horowitz 2014)
E_AC_PJ = 0.9   # 32-bit float accumulate, 45 nm
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class LayerEnergy:
    name: str
    stage: int
    kind: str           # conv | linear | qk_sum | qk_mask | kv_matmul | qkv_matmul
    op: str             # MAC (encoding layer) or AC
    flops: float        # per image and time step
    steps: int          # time steps the layer runs per image
    input_rate: float   # mean input: firing rate (binary input) or mean count (Q9); 1 for MAC
    spike_driven: bool  # every input value seen was 0 or 1
    ops: float          # per image: MACs for the MAC layer, SOPs otherwise
    energy_mj: float    # per image


@dataclass
class EnergyReport:
    layers: List[LayerEnergy]
    images: int
    T: int
    e_mac_pj: float
    e_ac_pj: float
    encode_once: bool

    def _sum(self, attr, pick=lambda l: True) -> float:
        return float(sum(getattr(l, attr) for l in self.layers if pick(l)))

    @property
    def total_mj(self) -> float:
        return self._sum("energy_mj")

    @property
    def mac_ops(self) -> float:
        return self._sum("ops", lambda l: l.op == "MAC")

    @property
    def sops(self) -> float:
        return self._sum("ops", lambda l: l.op == "AC")

    @property
    def sops_non_binary(self) -> float:
        """SOPs of AC layers whose input is not binary (docs/original.md Q9): counts, not spikes."""
        return self._sum("ops", lambda l: l.op == "AC" and not l.spike_driven)

    @property
    def energy_mj_non_binary(self) -> float:
        return self._sum("energy_mj", lambda l: l.op == "AC" and not l.spike_driven)

    def summary(self) -> Dict[str, float]:
        return {"images": self.images, "T": self.T, "e_mac_pj": self.e_mac_pj,
                "e_ac_pj": self.e_ac_pj, "encode_once": self.encode_once,
                "total_mj": self.total_mj, "mac_ops": self.mac_ops, "sops": self.sops,
                "sops_spike_driven": self.sops - self.sops_non_binary,
                "sops_non_binary": self.sops_non_binary,
                "energy_mj_non_binary": self.energy_mj_non_binary,
                "non_binary_layers": [l.name for l in self.layers
                                      if l.op == "AC" and not l.spike_driven]}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layers": [asdict(l) for l in self.layers]}

    def table(self) -> str:
        lines = [f"{'layer':46s} {'op':3s} {'MFLOPs/step':>11s} {'T':>2s} {'rate':>7s} "
                 f"{'binary':>6s} {'MOPs':>9s} {'mJ':>9s}"]
        for l in self.layers:
            lines.append(f"{l.name:46s} {l.op:3s} {l.flops / 1e6:11.3f} {l.steps:2d} "
                         f"{l.input_rate:7.4f} {str(l.spike_driven):>6s} {l.ops / 1e6:9.3f} "
                         f"{l.energy_mj:9.5f}")
        s = self.summary()
        lines.append(f"total {s['total_mj']:.4g} mJ/image = {s['mac_ops'] / 1e9:.4g} G MAC x "
                     f"{self.e_mac_pj} pJ + {s['sops'] / 1e9:.4g} G SOP x {self.e_ac_pj} pJ; "
                     f"non-binary-input (Q9) layers: {s['sops_non_binary'] / 1e9:.4g} G SOP, "
                     f"{s['energy_mj_non_binary']:.4g} mJ")
        return "\n".join(lines)


@dataclass
class _Acc:
    kind: str
    in_sum: float = 0.0
    in_numel: int = 0
    binary: bool = True
    flops: float = 0.0  # summed over calls, images and steps
    steps: int = 1


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _fan_in(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    return m.in_channels // m.groups * math.prod(m.kernel_size)


class EnergyMeter:
    """Context manager collecting per-layer FLOPs and input rates over every forward of ``model``.

    >>> with EnergyMeter(model) as meter:
    ...     model(x)
    >>> print(meter.report().table())
    """

    def __init__(self, model: nn.Module, e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ,
                 encode_once: Optional[bool] = None):
        self.model = model
        self.e_mac_pj, self.e_ac_pj = e_mac_pj, e_ac_pj
        self.encode_once = (not is_event_model(model)) if encode_once is None else encode_once
        self.acc: Dict[str, _Acc] = {}
        self.images = 0
        self._batch = 1
        self._q_numel: Dict[int, int] = {}
        self._handles = []

    # -- accumulation ------------------------------------------------------------------------
    def _add(self, name, kind, x: torch.Tensor, flops: float, steps: int):
        a = self.acc.get(name)
        if a is None:
            a = self.acc[name] = _Acc(kind)  # insertion order = order of first execution
        x = x.detach()
        a.in_sum += float(x.sum(dtype=torch.float64))
        a.in_numel += x.numel()
        a.binary = a.binary and _is_binary(x)
        a.flops += flops
        a.steps = steps

    def _on_model_input(self, module, args):
        self._batch = args[0].shape[0]
        self.images += self._batch

    def _weighted_hooks(self, name, kind):
        def pre(module, args):  # the actual input tensor, before the layer runs
            x = args[0]
            # Layers run on the [T*B, ...] view, so the leading axis / B is the number of steps.
            self._add(name, kind, x, 0.0, max(1, x.shape[0] // self._batch))

        def post(module, args, out):  # FLOPs need the output shape
            self.acc[name].flops += out.numel() * _fan_in(module)
        return pre, post

    def _attn_hook(self, name, attn, role):
        """Hooks on the q/k/attn neurons of an attention module: their (binary) outputs are the
        operands of the attention's matmuls / sum / mask, so they give the exact op counts."""
        d = attn.dim // attn.num_heads
        ssa = isinstance(attn, SpikingSelfAttention)

        def hook(module, args, out):
            T = out.shape[0]
            if role == "q":
                self._q_numel[id(attn)] = out.numel()
                if ssa:  # q (k^T v): each q spike adds one d-row of kv
                    self._add(f"{name}.qkv_matmul", "qkv_matmul", out, out.numel() * d, T)
                else:    # sum of q over the head's channels (QKTA) or tokens (QKCA)
                    self._add(f"{name}.qk_sum", "qk_sum", out, out.numel(), T)
            elif role == "k" and ssa:  # k^T v: each k spike adds one d-row of v
                self._add(f"{name}.kv_matmul", "kv_matmul", out, out.numel() * d, T)
            elif role == "attn" and not ssa:  # mask: each open gate passes C*N/|A| elements of k
                self._add(f"{name}.qk_mask", "qk_mask", out, float(self._q_numel[id(attn)]), T)
        return hook

    def __enter__(self):
        self._path = reference_path(self.model)
        self._path.__enter__()
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._on_model_input))
        for name, m in self.model.named_modules():
            if isinstance(m, _WEIGHTED):
                pre, post = self._weighted_hooks(name, "linear" if isinstance(m, nn.Linear) else "conv")
                h += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
            if isinstance(m, (QKAttentionBase, SpikingSelfAttention)):
                for role, lif in (("q", m.spiking_units["q"].lif),
                                  ("k", m.spiking_units["k"].lif), ("attn", m.attn_lif)):
                    h.append(lif.register_forward_hook(self._attn_hook(name, m, role)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._path.__exit__(*exc)

    # -- report ------------------------------------------------------------------------------
    def report(self) -> EnergyReport:
        if not self.images:
            raise RuntimeError("no forward pass was run inside the EnergyMeter")
        items = list(self.acc.items())
        # The encoding layer is the first conv to run (it reads the model input).
        mac_name = next((n for n, a in items if a.kind == "conv"), None)
        layers = []
        for name, a in items:
            flops = a.flops / (self.images * a.steps)  # per image and time step
            if name == mac_name:
                steps = 1 if self.encode_once else a.steps
                rate, ops, op, pj = 1.0, flops * steps, "MAC", self.e_mac_pj
                binary = False
            else:
                rate = a.in_sum / a.in_numel
                steps, op, pj, binary = a.steps, "AC", self.e_ac_pj, a.binary
                ops = rate * flops * steps  # T enters exactly once, here
            layers.append(LayerEnergy(name, layer_stage(name), a.kind, op, flops, steps, rate,
                                      binary, ops, ops * pj * 1e-9))
        T = max((l.steps for l in layers if l.op == "AC"), default=1)
        return EnergyReport(layers, self.images, T, self.e_mac_pj, self.e_ac_pj, self.encode_once)


@torch.no_grad()
def measure_energy(model: nn.Module, batches: Iterable, max_batches: Optional[int] = None,
                   e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ,
                   encode_once: Optional[bool] = None, device=None) -> EnergyReport:
    """Energy per image of ``model`` (eval mode) averaged over ``batches`` (DataLoader or tensors)."""
    model.eval()
    device = device or next(model.parameters()).device
    with EnergyMeter(model, e_mac_pj, e_ac_pj, encode_once) as meter:
        for x, _ in iter_inputs(batches, max_batches):
            model(x.to(device))
    return meter.report()


def save_energy(report: EnergyReport, out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"json": write_json(out / "energy.json", report.to_dict()),
            "csv": write_csv(out / "energy.csv", [asdict(l) for l in report.layers])}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.energy",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--e-mac", type=float, default=E_MAC_PJ, help="pJ per MAC")
    p.add_argument("--e-ac", type=float, default=E_AC_PJ, help="pJ per AC")
    p.add_argument("--encode-every-step", action="store_true",
                   help="count the encoding conv at all T steps (default: once for static images)")
    add_out_arg(p, "energy")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    out = output_folder(args.out)
    model = model_from_args(args)
    report = measure_energy(model, batches_from_args(args, model), max_batches(args), args.e_mac,
                            args.e_ac, False if args.encode_every_step else None)
    print(report.table())
    for kind, path in save_energy(report, out).items():
        print(f"wrote {kind}: {path}")


if __name__ == "__main__":
    main()
