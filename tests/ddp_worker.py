"""Run under torchrun by test_training.py: a few DDP steps through the real engine (gloo, CPU).

``ddp_worker.py OUT [checkpointing]``: with a second argument the model runs with gradient
checkpointing, and each rank accumulates two micro-batches per step (DDP's no_sync on the first).
"""
import sys
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import qkformer  # noqa: F401
from qkformer.distributed import init_distributed
from qkformer.engine import train_one_epoch

STEPS, PER_RANK, WORLD = 3, 4, 2


def make_model(checkpointing: bool = False):
    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=(8, 16, 32), depths=(1, 1, 1),
                              num_heads=2, num_classes=3, T=2)
    model.set_grad_checkpointing(checkpointing)
    return model


def make_data():
    g = torch.Generator().manual_seed(1)
    n = STEPS * PER_RANK * WORLD
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3)


def _optimizer(model):
    # SGD, not Adam: conv biases in front of BN have an exactly-zero true gradient, and Adam would
    # blow the float noise of DDP's all-reduce up to full-size steps.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _accum(checkpointing: bool) -> int:
    return 2 if checkpointing else 1


def single_process_reference(checkpointing: bool = False):
    """Same global batches, each split into the ranks' (micro-)batches as accumulation steps."""
    data = make_data()
    accum = _accum(checkpointing)
    micro = PER_RANK // accum
    shards = [list(DistributedSampler(data, WORLD, r, shuffle=False)) for r in range(WORLD)]
    order = [i for s in range(STEPS) for r in range(WORLD)
             for i in shards[r][s * PER_RANK:(s + 1) * PER_RANK]]
    loader = DataLoader(torch.utils.data.Subset(data, order), batch_size=micro)
    model = make_model(checkpointing)
    opt = _optimizer(model)
    train_one_epoch(model, loader, opt, torch.nn.functional.cross_entropy, torch.device("cpu"), 0,
                    accum_iter=WORLD * accum, progress=False)
    return {k: v.detach() for k, v in model.named_parameters()}


def main(out: Path, checkpointing: bool):
    dist = init_distributed("cpu")
    data = make_data()
    accum = _accum(checkpointing)
    loader = DataLoader(data, batch_size=PER_RANK // accum,
                        sampler=DistributedSampler(data, dist.world_size, dist.rank, shuffle=False))
    model = make_model(checkpointing)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(model)
    train_one_epoch(ddp, loader, opt, torch.nn.functional.cross_entropy, dist.device, 0,
                    accum_iter=accum, progress=False)
    torch.save({k: v.detach() for k, v in model.named_parameters()}, out / f"rank{dist.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), len(sys.argv) > 2)
