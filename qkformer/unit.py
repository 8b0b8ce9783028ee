"""The spiking unit, conv -> BatchNorm -> [max-pool] -> LIF: the pattern every QKFormer layer is
made of, defined in one place.

A :class:`SpikingUnit` does not own parameters. It names submodules that its layer registers
under the original's attribute names (``<name>_conv``, ``<name>_bn``, an optional pool,
``<name>_lif``), so every checkpoint key stays where the released files have it. The unit reads
its geometry (kernel, stride, padding, pool, BatchNorm eps and momentum, neuron constants) from
those modules, runs either path, and refuses what the fused path cannot express. BatchNorm
folding (:mod:`qkformer.inference`) and the analysis tools find the units through
:func:`spiking_units` instead of attribute-name patterns.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import nn

from . import fused
from .functional import per_frame

__all__ = ["SpikingUnit", "spiking_units", "fused_units"]


class SpikingUnit:
    """One conv -> BN -> [pool] -> LIF of ``owner``.

    Args:
        owner: the layer that registers the submodules (see :meth:`add_to`).
        name: the prefix of their attribute names: ``<name>_conv``, ``<name>_bn``, ``<name>_lif``.
        pool: the attribute name of a ``nn.MaxPool2d`` between BN and LIF, or None.

    The submodules are looked up by name on every use, so a BatchNorm folded away (replaced by
    ``nn.Identity``) or a converted copy of the layer is seen as it is now.

    Shape:
        - Input: reference path (``unit(x)``): ``[T, B, Cin, *]`` (``*`` = N for a ``Conv1d``
          projection, H, W for a ``Conv2d``); fast path (:meth:`fused`): token-major, see there
        - Output: spikes ``[T, B, Cout, *']``, ``*'`` after the conv's stride and the pool;
          the fast path keeps the input's layout
    """

    __slots__ = ("owner", "name", "pool_name")

    def __init__(self, owner: nn.Module, name: str, pool: Optional[str] = None):
        self.owner, self.name, self.pool_name = owner, name, pool

    @classmethod
    def add_to(cls, owner: nn.Module, name: str, conv: nn.Module, bn: nn.Module, lif: nn.Module,
               pool: Optional[nn.Module] = None, pool_name: Optional[str] = None) -> "SpikingUnit":
        """Register ``conv``, ``bn``, [``pool``], ``lif`` on ``owner`` in that order (the order of
        the released state_dicts) and return the unit; ``owner.spiking_units[name]`` lists it."""
        owner.add_module(f"{name}_conv", conv)
        owner.add_module(f"{name}_bn", bn)
        if pool is not None:
            owner.add_module(pool_name, pool)
        owner.add_module(f"{name}_lif", lif)
        unit = cls(owner, name, pool_name if pool is not None else None)
        if "spiking_units" not in owner.__dict__:
            owner.spiking_units = {}
        owner.spiking_units[name] = unit
        return unit

    @property
    def conv(self) -> nn.Module:
        return getattr(self.owner, f"{self.name}_conv")

    @property
    def bn(self) -> nn.Module:
        return getattr(self.owner, f"{self.name}_bn")

    @property
    def lif(self) -> nn.Module:
        return getattr(self.owner, f"{self.name}_lif")

    @property
    def pool(self) -> Optional[nn.Module]:
        return getattr(self.owner, self.pool_name) if self.pool_name else None

    def __repr__(self) -> str:
        pool = f" -> {self.pool_name}" if self.pool_name else ""
        return f"SpikingUnit({self.name}_conv -> {self.name}_bn{pool} -> {self.name}_lif)"

    # -- reference path: the modules themselves, frame by frame -----------------------------
    def conv_bn(self, x: torch.Tensor) -> torch.Tensor:
        """BN(conv(x)) (and the pool) on ``[T, B, C, ...]`` through the ``[T*B, ...]`` view: the
        unit without its neuron, for a layer that runs the LIF itself (SSA's ``proj_lif``).
        Returns ``[T, B, Cout, ...]``, analog."""
        mods = (self.conv, self.bn) + ((self.pool,) if self.pool_name else ())
        return per_frame(x, *mods)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path: ``lif(pool?(bn(conv(x))))`` on ``[T, B, Cin, ...]``; returns
        spikes ``[T, B, Cout, ...]``."""
        return self.lif(self.conv_bn(x))

    # -- fast path ---------------------------------------------------------------------------
    def geometry(self) -> Dict[str, object]:
        """The fused path's description of the convolution and the pool: ``kernel_size`` (0 for
        a 1x1 projection over tokens), ``stride`` and ``pool``. Raises ValueError for what the
        fused kernels do not compute (dilation, groups, other padding, another pool)."""
        conv = self.conv
        k, s = conv.kernel_size, conv.stride
        if (len(set(k)) != 1 or len(set(s)) != 1 or set(conv.dilation) != {1} or conv.groups != 1
                or conv.padding_mode != "zeros" or tuple(conv.padding) != (k[0] // 2,) * len(k)
                or k[0] % 2 == 0):
            raise ValueError(f"{self}: the fused path computes square odd kernels with padding "
                             f"k // 2, stride s, no dilation or groups; not {conv}")
        pool = self.pool
        if pool is not None:
            expected = dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False)
            got = {a: getattr(pool, a) for a in expected}
            if (not isinstance(pool, nn.MaxPool2d) or pool.return_indices
                    or any(_pair(got[a]) != _pair(v) for a, v in expected.items())):
                raise ValueError(f"{self}: the fused path pools with MaxPool2d(3, 2, 1), not {pool}")
        if isinstance(conv, nn.Conv1d):
            if k[0] != 1 or s[0] != 1:
                raise ValueError(f"{self}: token projections must be 1x1, stride 1: {conv}")
            return dict(kernel_size=0, stride=1, pool=False)
        return dict(kernel_size=k[0], stride=s[0], pool=pool is not None)

    def fused(self, x: torch.Tensor, steps: int, x_kind: int, bcast: bool = False) -> torch.Tensor:
        """The fast path on token-major ``x``, as one autograd node
        (:func:`qkformer.fused.spiking_unit`).

        Args:
            x: ``[..., Cin]`` (e.g. ``[T, B, N, Cin]``) for a ``Conv1d`` projection or a 1x1,
                stride-1 ``Conv2d``; ``[T*B, H, W, Cin]`` for any other convolution.
            steps: the LIF time steps, the t-major leading extent (T; T*B for the legacy SSA
                ``proj_lif``).
            x_kind: ``fused.ANALOG``, ``SPIKES`` or ``COUNTS``: how ``x`` is kept for backward.
            bcast: ``x`` is a static image batch ``[B, H, W, Cin]`` fed at each of ``steps``
                steps.

        Returns:
            Spikes, token-major: ``[..., Cout]`` for a projection, ``[T*B, H', W', Cout]`` for
            a convolution (after stride and pool).
        """
        conv = self.conv
        return fused.spiking_unit(x, conv.weight, conv.bias, self.bn, self.lif, steps=steps,
                                  bcast=bcast, x_kind=x_kind, **self.geometry())


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _lif_key(lif):
    return (type(lif), lif.tau, lif.v_threshold, lif.alpha, lif.detach_reset)


def _bn_key(bn):
    if isinstance(bn, nn.Identity):
        return (nn.Identity,)
    return (type(bn), bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training)


def fused_units(units: Sequence[SpikingUnit], x: torch.Tensor, x_kind: int,
                steps: int) -> torch.Tensor:
    """The fast path of several projection units that read the same token-major ``x``,
    concatenated along the channels. Units that agree in everything but their weights (neuron
    constants, BatchNorm settings, bias or not) run as one GEMM with their weights stacked, so
    ``x`` is also kept for backward only once; others run one by one."""
    if len(units) == 1:
        return units[0].fused(x, steps, x_kind)
    geometries = [u.geometry() for u in units]
    convs = [u.conv for u in units]
    same = (len({_lif_key(u.lif) for u in units}) == 1
            and len({_bn_key(u.bn) for u in units}) == 1
            and len({c.bias is None for c in convs}) == 1
            and all(g == dict(kernel_size=0, stride=1, pool=False) for g in geometries))
    if not same:
        return torch.cat([u.fused(x, steps, x_kind) for u in units], -1)
    weight = torch.cat([c.weight for c in convs])
    bias = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
    return fused.spiking_unit(x, weight, bias, [u.bn for u in units], units[0].lif, steps=steps,
                              x_kind=x_kind)


def spiking_units(model: nn.Module) -> Iterator[SpikingUnit]:
    """Every unit of ``model``'s layers, in module order."""
    for m in model.modules():
        yield from m.__dict__.get("spiking_units", {}).values()
