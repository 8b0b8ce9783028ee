"""torchrun set-up and exact distributed evaluation.

``torchrun --nproc_per_node=N script.py`` sets RANK/WORLD_SIZE/LOCAL_RANK; ``srun`` (one task
per GPU, MASTER_ADDR exported by the job script) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID,
used when RANK is not set; without either everything runs as a single process. NCCL is used on
GPU, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["DistInfo", "init_distributed", "is_main", "all_reduce_sum", "ShardSampler",
           "barrier", "cleanup", "any_rank", "gather_objects", "DIST_TIMEOUT_S"]

# A collective that waits longer than this fails instead of hanging: a rank that died leaves its
# peers blocked in their next all-reduce (QKFORMER_DIST_TIMEOUT_S overrides it).
DIST_TIMEOUT_S = 600


def _slurm_env() -> None:
    """Launched by srun without torchrun: take rank and world size from SLURM's variables."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if "SLURM_PROCID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_PORT", "29500")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (or srun), and pick this rank's
    device."""
    _slurm_env()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device (e.g. auto, cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu or auto)")
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(
            seconds=float(os.environ.get("QKFORMER_DIST_TIMEOUT_S", DIST_TIMEOUT_S)))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # torchrun keeps one store across restarts: without a prefix per attempt, a restarted
            # rank can read a dead peer's address left by the previous attempt and fail to connect
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            store = dist.PrefixStore(f"qkformer-attempt-{attempt}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)
    return DistInfo(rank, world, local, dev)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values, device) -> torch.Tensor:
    """Sum a list of numbers over ranks (float64, so large counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on at least one (all ranks then act alike)."""
    if not dist.is_initialized():
        return bool(flag)
    return bool(all_reduce_sum([float(bool(flag))], device).item() > 0)


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardSampler(Sampler):
    """Rank r gets indices r, r+W, r+2W, ... in order: every sample exactly once over all ranks.

    torch's DistributedSampler pads the last batch with duplicates, which skews accuracy.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
