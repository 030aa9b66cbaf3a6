"""Data-parallel training over ``torch.distributed`` (launched by torchrun: gloo on the CPU, NCCL on CUDA).

Every rank draws the same global micro-batch (batch_size × world size rows, with its noise and timesteps) from the
same seeded generator and trains its own contiguous share of the rows; the adapter gradients and the loss are summed
across ranks once per optimizer step, so every rank applies the same update and the adapters stay identical. The
result equals one process training the global batch (up to float summation order)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """This process's place in the initialised default process group (a single process when there is none)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """The rank that writes files and reports progress."""
        return self.rank == 0

    def share(self, rows: int) -> slice:
        """This rank's contiguous part of a global micro-batch of ``rows`` rows (sizes differ by at most one; a rank
        may get none when the batch has fewer rows than there are ranks). A slice: the latents stay views."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_gradients_and(self, grads: list[torch.Tensor], loss: float, stop: bool = False) -> tuple[float, bool]:
        """Sums the gradient buffers (in place) and ``loss`` over all ranks, and tells whether any rank wants to
        ``stop`` (a cancel): one collective per optimizer step, so a rank that stops never leaves the others waiting
        in the next one."""
        if self.world == 1:
            return loss, stop
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor([loss, float(stop)], device=grads[0].device)])
        torch.distributed.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-2]), bool(flat[-1] > 0)
