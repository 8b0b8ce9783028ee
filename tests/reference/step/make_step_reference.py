"""Make the STEP reference data in this folder from the STEP benchmark's own code.

    python tests/reference/step/make_step_reference.py STEP_CHECKOUT [OUT_DIR]

STEP_CHECKOUT is a checkout of github.com/Fancyssc/STEP (its ``cls`` folder holds the models);
the environment needs what STEP's QKFormer imports: BrainCog (``braincog``), timm 0.5.4,
einops, spikingjelly 0.0.0.0.14, pandas. None of it is needed by the tests.

What it writes (OUT_DIR, default: this folder):

* ``cifar_tiny.pth.tar`` / ``imagenet_tiny.pth.tar``: reduced-width models built by STEP's
  ``qkformer_cifar`` / ``qkformer_imagenet`` factories, randomly initialised (BatchNorm biased so
  that the neurons fire), saved by timm 0.5.4's ``CheckpointSaver`` with the argparse namespace
  of STEP's own ``train.py`` parser and recipe (``configs/qkformer/*.yml``), as STEP's
  training does.
* ``outputs.pt``: for each, a fixed input and STEP's float64 results on it, in eval and in train
  mode: logits, the spikes leaving each stage, and (train) the gradients of a fixed weighting of
  the logits with respect to a few weights (STEP encodes the input under no_grad, so the input
  has none).
* ``full_keys.json``: key, shape and (for the neuron entries) value of every state_dict entry of
  the full-size STEP models (CIFAR-10/100 4-384, ImageNet 10-384), to check the key mapping,
  variant matching and hints on files of the real size without storing them.
"""
from __future__ import annotations

import argparse
import ast
import copy
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
T, BATCH = 4, 2
# weights whose gradients are recorded: the first convolution (every neuron lies behind it), a
# stage-1 attention projection and the head; the names are the same in both layouts
GRADS = ("patch_embed1.proj_conv.weight", "stage1.0.tssa.q_conv.weight", "head.weight")  # STEP's CIFAR q_lif and ImageNet SPEDS-2/3 neurons have step 4 built in

# (recipe, overrides of the recipe, input side): reduced widths keep the files small; the
# ImageNet model keeps its depth (STEP's factory always builds 1/1/7 blocks).
MODELS = {
    "cifar_tiny": ("cifar10.yml", dict(embed_dim=32, depths=3, img_size=16), 16),
    "imagenet_tiny": ("imgnet.yml", dict(embed_dim=8, num_heads=2, img_size=32, num_classes=10),
                      32),
}
FULL = {
    "cifar10": ("cifar10.yml", {}),
    "cifar100": ("cifar100.yml", {}),
    "imagenet_10_384": ("imgnet.yml", dict(embed_dim=384, num_heads=8)),
}


def step_args(cls_dir: Path, recipe: str, overrides: dict) -> argparse.Namespace:
    """The namespace STEP's train.py builds for ``--config configs/qkformer/<recipe>``.

    Runs the parser statements and ``_parse_args`` of STEP's own train.py (the rest of that
    script needs datasets and CUDA)."""
    import yaml

    tree = ast.parse((cls_dir / "train.py").read_text())

    def wanted(node):
        text = ast.unparse(node)
        if isinstance(node, ast.FunctionDef):
            return node.name == "_parse_args"
        if isinstance(node, ast.Assign):
            return text.split("=")[0].strip() in ("parser", "config_parser")
        return isinstance(node, ast.Expr) and text.startswith("parser.")

    module = ast.Module(body=[n for n in tree.body if wanted(n)], type_ignores=[])
    scope = {"argparse": argparse, "yaml": yaml}
    exec(compile(module, str(cls_dir / "train.py"), "exec"), scope)
    argv = sys.argv
    sys.argv = ["train.py", "--config", str(cls_dir / "configs" / "qkformer" / recipe)]
    try:
        args, _ = scope["_parse_args"]()
    finally:
        sys.argv = argv
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def build(args: argparse.Namespace):
    """The model STEP's train.py creates from ``args`` (its create_model keyword set)."""
    import timm
    from braincog.base.strategy.surrogate import SigmoidGrad
    from models.utils.node import LIFNode

    keys = ("step", "img_size", "patch_size", "in_channels", "num_classes", "embed_dim",
            "num_heads", "mlp_ratio", "attn_scale", "mlp_drop", "attn_drop", "depths", "tau",
            "threshold", "alpha")
    kwargs = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    return timm.create_model(args.model, node=LIFNode, act_func=SigmoidGrad, **kwargs)


def fire(model: torch.nn.Module, seed: int) -> None:
    """BatchNorm far from its defaults, biased so that neurons fire in both modes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5 + 0.5)
                m.num_batches_tracked.fill_(3)


def save_like_step(model, args, path: Path) -> None:
    """timm 0.5.4's CheckpointSaver, as STEP's train.py sets it up (optimizer, native AMP scaler)."""
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, NativeScaler

    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=None,
                                amp_scaler=NativeScaler(), checkpoint_dir=tmp, recovery_dir=tmp,
                                decreasing=False, max_history=1)
        saver.save_checkpoint(0, metric=12.5)
        shutil.copyfile(Path(tmp) / "checkpoint-0.pth.tar", path)


def run(model, x, train: bool) -> dict:
    """float64 logits and per-stage spikes ``[T, B, C, H, W]`` of STEP's model on ``x``."""
    model = copy.deepcopy(model).double().train(train)
    stages = {}
    for i in (1, 2, 3):
        last = getattr(model, f"stage{i}")[-1]
        last.register_forward_hook(
            lambda m, inp, out, i=i: stages.__setitem__(i, out.detach().reshape(T, BATCH, *out.shape[1:])))
    logits = model(x)
    out = {"logits": logits.detach(), "stages": [stages[i].to(torch.int8) for i in (1, 2, 3)]}
    assert all(torch.equal(s.double(), stages[i]) for s, i in zip(out["stages"], (1, 2, 3)))
    if train:
        w = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).reshape(logits.shape)
        (logits * w).sum().backward()
        params = dict(model.named_parameters())
        out["grads"] = {k: params[k].grad.detach().clone() for k in GRADS}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step_checkout", type=Path)
    p.add_argument("out_dir", type=Path, nargs="?", default=HERE)
    a = p.parse_args(argv)
    cls_dir = a.step_checkout.resolve() / "cls"
    sys.path.insert(0, str(cls_dir))
    import models.static.qkformer_cifar  # noqa: F401  (registers qkformer_cifar with timm)
    import models.static.qkformer_imagenet  # noqa: F401  (registers qkformer_imagenet)

    a.out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for seed, (name, (recipe, overrides, side)) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        args = step_args(cls_dir, recipe, overrides)
        model = build(args)
        fire(model, seed)
        save_like_step(model, args, a.out_dir / f"{name}.pth.tar")
        x = torch.rand(BATCH, 3, side, side, generator=torch.Generator().manual_seed(100 + seed),
                       dtype=torch.float64)
        res = {"input": x, "eval": run(model, x, False), "train": run(model, x, True),
               "step_model": args.model}
        rates = [float((s != 0).double().mean()) for s in res["eval"]["stages"]]
        assert all(0.02 < r < 0.98 for r in rates), f"{name}: degenerate stage outputs {rates}"
        outputs[name] = res
        print(f"{name}: {sum(v.numel() for v in model.state_dict().values())} values, "
              f"stage activity {[round(r, 3) for r in rates]}")
    torch.save(outputs, a.out_dir / "outputs.pt")

    full = {}
    for name, (recipe, overrides) in FULL.items():
        model = build(step_args(cls_dir, recipe, overrides))
        full[name] = [[k, list(v.shape)] + ([v.item()] if v.dim() == 0 and v.is_floating_point() else [])
                      for k, v in model.state_dict().items()]
    (a.out_dir / "full_keys.json").write_text(json.dumps(full, indent=0) + "\n")
    for f in sorted(a.out_dir.iterdir()):
        print(f"{f.name}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
