"""What the benchmarks share: the models they compare, the original's neuron, inputs, counters.

The *original* is what the authors' code computes: this package's reference path (the original's
layer-by-layer computation, proven equal to the authors' modules by the golden tests) with every
neuron replaced by spikingjelly 0.0.0.0.14's ``MultiStepLIFNode`` (torch backend, reset before
every forward as the original's ``functional.reset_net`` after every batch).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name -> (timm model, overrides, input size, batch, events)
MODELS = {
    "cifar": ("qkformer_cifar10", {}, 32, 16, False),
    "hst384": ("qkformer_10_384", {}, 224, 2, False),
    "hst768": ("qkformer_10_768", {}, 224, 2, False),
    "dvs": ("qkformer_dvs128_gesture", {}, 128, 2, True),
    # smoke tests (CI): tiny members of two families, batch 2
    "quick": ("qkformer_cifar10", dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, T=2), 16, 2,
              False),
    "quick-dvs": ("qkformer_cifar10_dvs", dict(embed_dims=32, num_heads=2), 32, 2, True),
}


class SpikingjellyLIF(torch.nn.Module):
    """spikingjelly's multistep LIF (torch backend, or 'cupy' as the original trains on a GPU),
    reset before each forward."""

    def __init__(self, v_threshold: float, backend: str = "torch"):
        super().__init__()
        from spikingjelly.clock_driven.neuron import MultiStepLIFNode

        self.node = MultiStepLIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True,
                                     backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spikingjelly.clock_driven import functional

        functional.reset_net(self.node)
        return self.node(x)


def swap_in_spikingjelly(model: torch.nn.Module, backend: str = "torch") -> int:
    """Replace every MultiStepLIF by :class:`SpikingjellyLIF` in place; returns how many."""
    from qkformer.neuron import MultiStepLIF

    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, MultiStepLIF)]
    for parent, name, lif in swaps:
        if (lif.tau, lif.alpha, lif.detach_reset) != (2.0, 4.0, True):
            raise ValueError(f"{name}: the baseline neuron only covers tau=2, alpha=4, detach_reset")
        setattr(parent, name, SpikingjellyLIF(lif.v_threshold, backend))
    return len(swaps)


def build(model_key: str, kind: str, device: str = "cpu"):
    """``kind``: 'original', 'reference' (ours, layer by layer), 'fast' or 'checkpointed'."""
    import timm

    import qkformer  # noqa: F401  (registers the models)

    name, overrides, _, _, _ = MODELS[model_key]
    torch.manual_seed(0)
    model = timm.create_model(name, fast_path=kind in ("fast", "checkpointed"), **overrides)
    if kind == "original":
        swap_in_spikingjelly(model)
    model.set_grad_checkpointing(kind == "checkpointed")
    return model.to(device)


def batch(model_key: str, model, size: int, device: str = "cpu"):
    """A reproducible input batch and targets for ``model``."""
    _, _, img, _, events = MODELS[model_key]
    g = torch.Generator().manual_seed(1)
    if events:  # event counts, as the DVS loaders produce them
        x = torch.poisson(torch.full((size, model.T, model.in_chans, img, img), 0.5), generator=g)
    else:
        x = torch.randn(size, model.in_chans, img, img, generator=g)
    y = torch.randint(0, model.num_classes, (size,), generator=g)
    return x.to(device), y.to(device)


def saved_bytes(fn) -> int:
    """Bytes that autograd keeps for backward while ``fn()`` runs, each storage counted once
    (the same tensor saved by several nodes is one allocation)."""
    seen = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return t
        seen[(s.device.type, s.data_ptr())] = max(seen.get((s.device.type, s.data_ptr()), 0),
                                                  s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def calibrate_firing(model: torch.nn.Module, x: torch.Tensor, target: float = 0.15,
                     rounds: int = 8) -> float:
    """Shift the BatchNorm biases so that every LIF after a BatchNorm fires at about ``target``
    (a trained QKFormer's spike inputs are 10-25 % ones; a freshly initialised one fires far
    less, which would flatter the spike-driven products). Returns the mean rate reached. The
    running statistics are left as they were; ``model`` is left in train mode."""
    from qkformer.unit import spiking_units

    pairs = [(u.bn, u.lif) for u in spiking_units(model)
             if isinstance(u.bn, torch.nn.modules.batchnorm._BatchNorm)]
    rates = {}
    hooks = [lif.register_forward_hook(lambda m, a, o, i=i: rates.__setitem__(i, o.float().mean().item()))
             for i, (_, lif) in enumerate(pairs)]
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    with torch.no_grad(), model.reference_path():
        for _ in range(rounds):
            model(x)
            for i, (bn, _) in enumerate(pairs):
                bn.bias.add_(2.0 * (target - rates[i]))
        for m in bns:  # running statistics = those of the calibrated batch, as in a trained model
            m.momentum = 1.0
        model(x)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    for h in hooks:
        h.remove()
    return sum(rates.values()) / len(rates)
