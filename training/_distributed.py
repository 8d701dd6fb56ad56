"""DDP under ``torchrun``: process group, barrier and per-epoch subject shards."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["barrier", "distributed", "shard_subjects"]


def distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def shard_subjects(sampler, train, weights, rank, world, seed, epoch) -> None:
    """This process's share of the training subjects for one epoch (DistributedSampler)."""
    from torch.utils.data.distributed import DistributedSampler

    shard = DistributedSampler(range(len(train)), num_replicas=world, rank=rank, shuffle=True,
                               seed=seed)
    shard.set_epoch(epoch)
    idx = list(shard)
    sampler.subjects = [train[i] for i in idx]
    w = np.asarray([weights[i] for i in idx], dtype=float)
    sampler.p = w / w.sum()
