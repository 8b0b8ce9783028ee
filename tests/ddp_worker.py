"""Run under torchrun by test_training.py: a few DDP steps through the real engine (gloo, CPU)."""
import sys
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import qkformer  # noqa: F401
from qkformer.distributed import init_distributed
from qkformer.engine import train_one_epoch

STEPS, PER_RANK, WORLD = 3, 4, 2


def make_model():
    torch.manual_seed(0)
    return timm.create_model("qkformer_cifar10", embed_dims=(8, 16, 32), depths=(1, 1, 1),
                             num_heads=2, num_classes=3, T=2)


def make_data():
    g = torch.Generator().manual_seed(1)
    n = STEPS * PER_RANK * WORLD
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3)


def _optimizer(model):
    # SGD, not Adam: conv biases in front of BN have an exactly-zero true gradient, and Adam would
    # blow the float noise of DDP's all-reduce up to full-size steps.
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def single_process_reference():
    """Same global batches, each split into the two ranks' shards as accumulation steps."""
    data = make_data()
    shards = [list(DistributedSampler(data, WORLD, r, shuffle=False)) for r in range(WORLD)]
    order = [i for s in range(STEPS) for r in range(WORLD)
             for i in shards[r][s * PER_RANK:(s + 1) * PER_RANK]]
    loader = DataLoader(torch.utils.data.Subset(data, order), batch_size=PER_RANK)
    model = make_model()
    opt = _optimizer(model)
    train_one_epoch(model, loader, opt, torch.nn.functional.cross_entropy, torch.device("cpu"), 0,
                    accum_iter=WORLD, progress=False)
    return {k: v.detach() for k, v in model.named_parameters()}


def main(out: Path):
    dist = init_distributed("cpu")
    data = make_data()
    loader = DataLoader(data, batch_size=PER_RANK,
                        sampler=DistributedSampler(data, dist.world_size, dist.rank, shuffle=False))
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(model)
    train_one_epoch(ddp, loader, opt, torch.nn.functional.cross_entropy, dist.device, 0,
                    progress=False)
    torch.save({k: v.detach() for k, v in model.named_parameters()}, out / f"rank{dist.rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
