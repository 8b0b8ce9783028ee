"""QKTA token-attention maps (paper Figure 3a).

In every QKTokenAttention of the chosen stages, the binary token vector A = attn_lif(sum of Q over
a head's channels), shape ``[T, B, heads, 1, N]``, is captured with a forward hook on its
``attn_lif`` neuron, averaged over heads and time steps and reshaped to the stage's token grid.
A value of 1 means every head selected the token at every step. Each block's map is drawn over
the (preprocessed) input image, one panel per block.

CLI::

    python -m qkformer.analysis.attention_maps --model qkformer_10_384 --checkpoint ck.pth \
        --image cat.jpg --out attention_maps/    # writes attention_maps/attention_maps.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from qkformer.attention import QKTokenAttention
from qkformer.config import run_cli

from ._common import (add_model_args, add_out_arg, eval_transform, is_event_model, layer_stage,
                      model_from_args, output_folder, reference_path, run_title)

__all__ = ["token_attention_maps", "display_image", "attention_map_figure", "render_attention_maps",
           "load_image"]


@torch.no_grad()
def token_attention_maps(model: nn.Module, x: torch.Tensor,
                         stages: Iterable[int] = (1, 2)) -> Dict[str, torch.Tensor]:
    """``{module name: [B, H, W] map in [0, 1]}`` for every QKTA block of ``stages``."""
    stages = set(stages)
    grids: Dict[str, Tuple[int, int]] = {}
    maps: Dict[str, torch.Tensor] = {}
    handles = []

    def grid_hook(name):
        def hook(module, args):
            grids[name] = tuple(args[0].shape[-2:])  # input [T, B, C, H, W]
        return hook

    def mask_hook(name):
        def hook(module, args, out):  # out [T, B, heads, 1, N] in {0, 1}
            H, W = grids[name]
            maps[name] = out.float().mean(dim=(0, 2, 3)).reshape(-1, H, W).cpu()
        return hook

    for name, m in model.named_modules():
        if isinstance(m, QKTokenAttention) and layer_stage(name) in stages:
            handles.append(m.register_forward_pre_hook(grid_hook(name)))
            handles.append(m.attn_lif.register_forward_hook(mask_hook(name)))
    if not handles:
        raise ValueError(f"the model has no QKTokenAttention in stages {sorted(stages)}")
    model.eval()
    try:
        with reference_path(model):
            model(x.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return maps


def display_image(x: torch.Tensor) -> torch.Tensor:
    """One model input (``[C, H, W]`` image or ``[T, C, H, W]`` events) as an ``[H, W, 3]``
    array in [0, 1]: min-max scaled, so no normalisation constants are needed."""
    if x.dim() == 4:  # events: total count per pixel
        x = x.sum(dim=(0, 1), keepdim=False)[None]
    x = x.float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    x = x.expand(3, *x.shape[-2:]) if x.shape[0] == 1 else x[:3]
    return x.permute(1, 2, 0)


def attention_map_figure(image: torch.Tensor, maps: Dict[str, torch.Tensor], alpha: float = 0.55,
                         title: Optional[str] = None):
    """The matplotlib figure of ``image`` ([H, W, 3] in [0, 1]) and each ``[h, w]`` map over it,
    one panel per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, W = image.shape[:2]
    # One extent for image and map: pixel edges at 0..W and 0..H. (imshow's default puts pixel
    # centres on the integers, half a pixel off a map stretched over (0, W, H, 0).)
    extent = (0, W, H, 0)
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.3), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image.numpy(), extent=extent)
    axes[0].set_title("input", fontsize=9)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(image.numpy(), extent=extent)
        # the token grid stretched over the image; nearest keeps tokens as blocks
        im = ax.imshow(m.numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1, extent=extent,
                       interpolation="nearest")
        ax.set_title(f"{name}\n{m.shape[0]}x{m.shape[1]} tokens, mean {m.mean():.2f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    if maps:
        fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def render_attention_maps(image: torch.Tensor, maps: Dict[str, torch.Tensor], path,
                          alpha: float = 0.55, title: Optional[str] = None) -> Path:
    """Write :func:`attention_map_figure` as a PNG to ``path``."""
    fig = attention_map_figure(image, maps, alpha, title)  # (selects the Agg backend first)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def load_image(model: nn.Module, path) -> torch.Tensor:
    """``[1, 3, S, S]`` tensor of an image file through the model family's eval transform."""
    from PIL import Image

    if is_event_model(model):
        raise ValueError("--image needs a static-image model; use --synthetic for event models")
    with Image.open(path) as img:
        return eval_transform(model)(img.convert("RGB")).unsqueeze(0)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m qkformer.analysis.attention_maps",
                                description=__doc__.split("\n\n")[0])
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="image file")
    src.add_argument("--synthetic", action="store_true", help="a random input")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    add_out_arg(p, "attention_maps")
    args = p.parse_args(argv)
    run_cli(lambda: _run(args), from_command_line=argv is None)


def _run(args) -> None:
    from ._common import synthetic_batches

    out = output_folder(args.out)
    model = model_from_args(args)
    x = load_image(model, args.image) if args.image else synthetic_batches(model, 1, 1)[0]
    maps = token_attention_maps(model, x, args.stages)
    for name, m in maps.items():
        print(f"{name:30s} grid {tuple(m.shape[1:])}  mean attention {m.mean():.3f}")
    title = run_title(args.model, args.image or "synthetic input", model.T)
    path = render_attention_maps(display_image(x[0]), {k: v[0] for k, v in maps.items()},
                                 out / "attention_maps.png", title=title)
    print(f"wrote png: {path}")


if __name__ == "__main__":
    main()
