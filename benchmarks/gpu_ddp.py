"""Two DDP ranks on one GPU (gloo): a few fp16 AMP training steps of the smallest model through
the training engine, then the ranks' weights must be identical, finite and updated.

    python benchmarks/gpu_ddp.py [--ranks 2] [--steps 3]

It starts torchrun itself. NCCL refuses two ranks on one device, hence gloo, which reduces CUDA
tensors through the host: this checks the DDP wiring on CUDA (the default path, the LIF kernel,
the GradScaler, the engine's all-reduce), not its speed. Without CUDA it prints "no CUDA device:
GPU DDP check skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

PER_RANK = 4


def worker(steps: int) -> int:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from _common import MODELS, build
    from qkformer import cuda as lif_cuda
    from qkformer import fused
    from qkformer.engine import train_one_epoch

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", 0)  # every rank on the one GPU
    torch.cuda.set_device(device)
    model = build("quick", "fast", str(device))
    before = torch.cat([p.detach().flatten().float() for p in model.parameters()]).cpu()
    img = MODELS["quick"][2]
    g = torch.Generator().manual_seed(1)
    n = steps * PER_RANK * world
    data = TensorDataset(torch.randn(n, model.in_chans, img, img, generator=g),
                         torch.arange(n) % model.num_classes)
    loader = DataLoader(data, batch_size=PER_RANK,
                        sampler=DistributedSampler(data, world, rank, shuffle=False))
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # a moderate initial scale: an overflow would skip the few updates there are
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    stats = train_one_epoch(ddp, loader, optimizer, torch.nn.functional.cross_entropy, device, 0,
                            scaler=scaler, amp=True, progress=False)
    after = torch.cat([p.detach().flatten().float() for p in model.parameters()]).cpu()
    gathered = [torch.empty_like(after) for _ in range(world)]
    dist.all_gather(gathered, after)
    problems = []
    if not torch.isfinite(after).all():
        problems.append("non-finite weights")
    if torch.equal(after, before):
        problems.append("no update was applied")
    if rank == 0:
        differ = [r for r in range(1, world) if not torch.equal(gathered[r], gathered[0])]
        if differ:
            problems.append(f"ranks {differ} differ from rank 0 by up to "
                            f"{max((gathered[r] - gathered[0]).abs().max().item() for r in differ):.3g}")
        print(f"{world} ranks (gloo) on {torch.cuda.get_device_name(device)}: "
              f"{stats['train_images']} images, loss {stats['train_loss']:.4f}; "
              f"{fused.describe(model, device)}; LIF kernel launches on rank 0: "
              f"{sum(lif_cuda.launch_counts().values())}", flush=True)
    failed = torch.tensor([float(bool(problems))])
    dist.all_reduce(failed)
    for p in problems:
        print(f"rank {rank}: {p}", flush=True)
    dist.destroy_process_group()
    if rank == 0 and failed.item() == 0:
        print(f"DDP {world} ranks on one GPU: weights identical across ranks, finite, updated")
    return 1 if failed.item() else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU DDP check skipped")
        return 0
    if args.worker:
        return worker(args.steps)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.ranks}", str(Path(__file__).resolve()), "--worker",
           "--steps", str(args.steps)]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
