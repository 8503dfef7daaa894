"""Data parallelism for training: which rank this process is, and summing over ranks.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` joins the
process group (gloo on CPU, nccl on CUDA) once and returns the rank and world
size; otherwise it returns a single-process :class:`Dist` and never imports
``torch.distributed``. Every rank takes its slice of each micro-batch, the
gradients are summed with :meth:`Dist.all_reduce`, and only the main rank
(rank 0) writes files or prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all ranks (a new tensor; ``tensor`` itself with one rank)."""
        if self.world > 1:
            import torch.distributed as dist

            tensor = tensor.clone()
            dist.all_reduce(tensor)
        return tensor


def init_distributed(device: str) -> Dist:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())
