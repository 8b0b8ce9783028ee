"""``--finetune``: a head the checkpoint carries is kept, whatever the file's layout; a head it
lacks (or of another class count) is drawn afresh with std 2e-5 (docs/original.md Q12)."""
import pytest
import timm
import torch

import qkformer  # noqa: F401
from qkformer import train

KW = dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, T=1)


def _layouts(sd):
    return {
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "bare": dict(sd),
        "ddp-prefixed": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }


@pytest.mark.parametrize("layout", list(_layouts({})))
def test_a_loaded_head_is_kept(tmp_path, layout):
    torch.manual_seed(0)
    source = timm.create_model("qkformer_cifar10", num_classes=10, **KW)
    path = tmp_path / "ckpt.pth"
    torch.save(_layouts(source.state_dict())[layout], path)
    torch.manual_seed(1)
    model = timm.create_model("qkformer_cifar10", num_classes=10, **KW)
    train._finetune(model, path)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("layout", ["model", "state_dict"])
def test_a_head_of_another_size_is_drawn_afresh(tmp_path, layout):
    torch.manual_seed(0)
    source = timm.create_model("qkformer_cifar10", num_classes=100, **KW)
    path = tmp_path / "ckpt.pth"
    torch.save(_layouts(source.state_dict())[layout], path)
    model = timm.create_model("qkformer_cifar10", num_classes=10, **KW)
    train._finetune(model, path)
    w = model.head.weight
    assert 0 < w.std() < 1e-4  # the small re-draw, not the default init
    assert torch.equal(model.patch_embed1.proj_conv.weight, source.patch_embed1.proj_conv.weight)
