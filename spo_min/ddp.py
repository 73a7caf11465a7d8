"""Data parallelism in a few lines: what DistributedDataParallel does, spelled out.

Under `torchrun --nproc_per_node=K`, every process holds a full copy of the policy and takes
1/K of each global batch (`shard`). After backward, gradients are averaged over processes
(`average_gradients`), so every copy takes the same optimizer step. Because each process's
loss is the mean over its equal share of pairs, the average of the K gradients is exactly the
gradient of the mean loss over the global batch: a K-process run matches a 1-process run at the
same global batch size, up to float summation order.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Distributed:
    def __init__(self, rank=0, world_size=1, local_rank=0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_main = rank == 0

    @classmethod
    def from_env(cls):
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def active(self):
        return self.world_size > 1

    def device(self, requested="auto"):
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        if requested == "cuda":  # torch.cuda.set_device needs an index: this process's GPU (0 alone)
            requested = f"cuda:{self.local_rank}"
        device = torch.device(requested)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def shard(self, indices):
        """This process's share of a global batch of indices."""
        if len(indices) % self.world_size:
            raise ValueError(f"batch of {len(indices)} does not split over {self.world_size} processes: "
                             "make --batch-size a multiple of --nproc_per_node")
        return indices[self.rank :: self.world_size]

    def average_gradients(self, model):
        if not self.active:
            return
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def mean(self, value):
        """Mean of a scalar tensor over processes, as a Python float (for logging)."""
        value = value.detach().float().reshape(1).clone()
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value.item()

    def barrier(self):
        if self.active:
            dist.barrier()

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def close(self):
        if self.active:
            dist.destroy_process_group()
