"""Process-group setup for single-process, ``torchrun`` and ``deepspeed`` launches (CPU: gloo, GPU: NCCL)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "setup_distributed"]


@dataclass
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks (in place, returned for convenience)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (one tiny all-reduce)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return bool(t.item() > 0)

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(use_deepspeed: bool, local_rank_arg: int | None = None) -> DistEnv:
    """Read the launcher's environment (RANK, LOCAL_RANK, WORLD_SIZE) and start the process group if needed.

    With ``use_deepspeed`` the group is created through ``deepspeed.init_distributed`` (the ``deepspeed`` launcher
    also works with a single process). On the CPU DeepSpeed's shared-memory comm op is disabled: it compiles for over
    a minute on first use and gloo is enough.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if use_deepspeed:
        import deepspeed
        import deepspeed.ops

        if not cuda:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "MASTER_ADDR" not in os.environ:  # a plain `python train.py` with DeepSpeed: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=30))
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)
    if world_size > 1:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)
    return DistEnv(0, 0, 1, device, None)
