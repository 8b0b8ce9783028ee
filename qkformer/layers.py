"""Building blocks around the attention: spiking MLP, transformer block, SPEDS patch embedding.

Everything works on ``[T, B, C, H, W]``. Convolutions and BatchNorm see the ``T*B``-flattened
view; neurons see ``[T, ...]``. With ``token_major = True`` (the model's fast path) the layers
take and return ``[T, B, H, W, C]`` and run as fused units (:mod:`qkformer.fused`). Attribute names are passed in, so one class serves every
family's naming (``fc1_``/``mlp1_``, ``attn``/``ssa``, ``proj3_``/``proj_``) and each variant's
``state_dict`` carries exactly the original keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import fused
from .attention import ATTENTION_TYPES, SpikingSelfAttention
from .neuron import MultiStepLIF
from .unit import SpikingUnit

__all__ = ["SpikingMLP", "SpikingBlock", "ConvUnit", "SPEDS", "attention_attr_name"]


class SpikingMLP(nn.Module):
    """Spiking MLP: two 1x1 conv -> BN -> LIF layers (docs/original.md §2.1).

    Widens to ``hidden_dim`` and back; both layers end in a LIF, so the output is spikes.

    Args:
        dim: channels C of input and output.
        hidden_dim: channels of the hidden layer (``dim * mlp_ratio`` in a block).
        prefix: attribute prefix, 'fc' (ImageNet: ``fc1_conv``, ...) or 'mlp' (CIFAR, DVS:
            ``mlp1_conv``, ...), so the state_dict keys are the original's. Default: 'fc'

    Shape:
        - Input: ``[T, B, C, H, W]``; token-major ``[T, B, H, W, C]`` when ``token_major``
        - Output: spikes of the input's shape and layout
    """

    def __init__(self, dim: int, hidden_dim: int, prefix: str = "fc"):
        super().__init__()
        self.prefix = prefix
        self.layers = tuple(
            SpikingUnit.add_to(self, f"{prefix}{i}", nn.Conv2d(cin, cout, kernel_size=1, bias=True),
                               nn.BatchNorm2d(cout), MultiStepLIF())
            for i, (cin, cout) in enumerate(((dim, hidden_dim), (hidden_dim, dim)), start=1))
        self.token_major = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.layers
        if self.token_major:  # [T, B, H, W, C]: both layers are GEMMs over the tokens
            x = first.fused(x, x.shape[0], fused.COUNTS)
            return second.fused(x, x.shape[0], fused.SPIKES)
        return second(first(x))


def attention_attr_name(attn_type: str, ssa_name: str) -> str:
    """Attribute the attention registers under: QKTA is ``tssa`` everywhere (original name);
    SSA is ``attn`` (ImageNet) or ``ssa`` (CIFAR/DVS); QKCA, new here, is ``qkca``."""
    return {"qkta": "tssa", "qkca": "qkca", "ssa": ssa_name}[attn_type]


class SpikingBlock(nn.Module):
    """Spiking transformer block: x = x + attention(x); x = x + mlp(x) (docs/original.md §2.4).

    No norm and no LIF on the shortcut, so the residual stream is a sum of spike tensors
    (integer valued).

    Args:
        dim: channels C of input and output.
        num_heads: attention heads; must divide ``dim``.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``. Default: 4.0
        attn_type: 'qkta', 'qkca' or 'ssa' (see ``ATTENTION_TYPES``). Default: 'qkta'
        ssa_name: attribute of an SSA module, 'attn' (ImageNet) or 'ssa' (CIFAR, DVS).
            Default: 'attn'
        mlp_prefix: attribute prefix of the MLP's units, 'fc' or 'mlp'. Default: 'fc'
        legacy_ssa: SSA only: the original's ``proj_lif`` batch coupling
            (docs/original.md §2.5). Default: True

    Shape:
        - Input: ``[T, B, C, H, W]`` integer counts; token-major ``[T, B, H, W, C]`` when
          ``token_major`` is set on its layers
        - Output: integer counts of the input's shape and layout
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_type: str = "qkta",
                 ssa_name: str = "attn", mlp_prefix: str = "fc", legacy_ssa: bool = True):
        super().__init__()
        if attn_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention {attn_type!r}; expected one of {list(ATTENTION_TYPES)}")
        self.attn_name = attention_attr_name(attn_type, ssa_name)
        cls = ATTENTION_TYPES[attn_type]
        attn = (cls(dim, num_heads, legacy_proj_lif=legacy_ssa) if cls is SpikingSelfAttention
                else cls(dim, num_heads))
        self.add_module(self.attn_name, attn)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), prefix=mlp_prefix)

    @property
    def attention(self) -> nn.Module:
        return getattr(self, self.attn_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        add = fused.add_counts if self.mlp.token_major else torch.add
        x = add(x, self.attention(x))
        return add(x, self.mlp(x))


@dataclass(frozen=True)
class ConvUnit:
    """One conv3x3 -> BN -> [MaxPool 3/2/1] -> LIF step of a SPEDS main path.

    ``name`` prefixes the conv/bn/lif attributes; ``pool`` names the max-pool (None: no pool).
    ``out_div`` sets the output width as ``out_width // out_div``.
    """

    name: str
    out_div: int = 1
    pool: Optional[str] = None


class SPEDS(nn.Module):
    """Spiking patch embedding with deformed shortcut (docs/original.md §3.2-3.4).

    Main path: a chain of :class:`ConvUnit`. Shortcut: 1x1 conv (stride ``shortcut_stride``) ->
    BN -> LIF from the spikes of unit ``shortcut_from`` (or from the raw input when -1).
    Output = main + shortcut, values in {0, 1, 2}.

    Args:
        in_chans: channels of the input.
        out_chans: channels of the output; unit i outputs ``out_chans // units[i].out_div``.
        units: the main path, each a 3x3 conv -> BN -> [MaxPool(3, 2, 1)] -> LIF.
        shortcut_from: index of the unit whose spikes feed the shortcut, -1 for the input.
            Default: -1
        shortcut_stride: stride of the shortcut's 1x1 conv; must equal the downsampling by the
            pools after ``shortcut_from``. Default: 2

    Shape:
        - Input: ``[T, B, in_chans, H, W]``; token-major ``[T, B, H, W, in_chans]``, or with
          ``steps`` a static image batch ``[B, H, W, in_chans]``
        - Output: ``[T, B, out_chans, H', W']``, token-major ``[T, B, H', W', out_chans]``,
          where H' = ceil(H / r), W' = ceil(W / r), r = ``downsample`` = 2 ** (number of pools)
    """

    def __init__(self, in_chans: int, out_chans: int, units: Sequence[ConvUnit],
                 shortcut_from: int = -1, shortcut_stride: int = 2):
        super().__init__()
        self.units = tuple(units)
        self.shortcut_from = shortcut_from
        widths = [in_chans] + [out_chans // u.out_div for u in self.units]
        self.main = tuple(
            SpikingUnit.add_to(self, u.name, nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(cout), MultiStepLIF(),
                               nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if u.pool else None,
                               u.pool)
            for u, cin, cout in zip(self.units, widths[:-1], widths[1:]))
        res_in = widths[shortcut_from + 1]
        self.shortcut = SpikingUnit.add_to(
            self, "proj_res", nn.Conv2d(res_in, out_chans, 1, shortcut_stride, 0, bias=False),
            nn.BatchNorm2d(out_chans), MultiStepLIF())
        # The shortcut must skip exactly the pools that lie after its source.
        pools_after = sum(1 for u in self.units[shortcut_from + 1:] if u.pool)
        if shortcut_stride != 2 ** pools_after:
            raise ValueError(f"SPEDS shortcut stride {shortcut_stride} does not match the "
                             f"{pools_after} max-pools after unit {shortcut_from}")
        self.downsample = 2 ** sum(1 for u in self.units if u.pool)
        self.token_major = False

    def forward(self, x: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """``x``: ``[T, B, C, H, W]``; token-major: ``[T, B, H, W, C]``, or with ``steps`` a
        static image batch ``[B, H, W, C]`` that is the input at each of ``steps`` time steps."""
        if self.token_major:
            return self.forward_tokens(x, steps)
        if steps is not None:
            raise ValueError("SPEDS: steps= is for token-major input only")
        shortcut_in = x
        for i, unit in enumerate(self.main):
            x = unit(x)
            if i == self.shortcut_from:
                shortcut_in = x
        return x + self.shortcut(shortcut_in)

    def forward_tokens(self, x: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        # A static image (steps given) is convolved once: the first unit repeats its output.
        bcast = steps is not None
        T, B = (steps, x.shape[0]) if bcast else x.shape[:2]
        frames = x if bcast else x.flatten(0, 1)  # [N, H, W, C]
        kind = fused.ANALOG if bcast else fused.COUNTS  # pixels, or event / residual counts
        source = (frames, bcast, kind)
        for i, unit in enumerate(self.main):
            frames = unit.fused(frames, T, kind, bcast)
            bcast, kind = False, fused.SPIKES
            if i == self.shortcut_from:
                source = (frames, False, fused.SPIKES)
        out = fused.add_counts(frames, self.shortcut.fused(source[0], T, source[2], source[1]))
        return out.reshape(T, B, *out.shape[1:])
