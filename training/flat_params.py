"""Trainable tensors moved into one contiguous buffer per (device, dtype), with their gradients in another.

The optimizer then updates one tensor per buffer instead of hundreds of small ones: on adapter-sized tensors the
per-tensor bookkeeping of ``torch.optim`` costs more than the arithmetic (AdamW on 48 LoRA tensors: ~0.77 ms per step
as a list, ~0.10 ms as one buffer, 1 CPU thread). Each Parameter keeps its identity (modules and hooks still hold
it); only its storage and its ``.grad`` become views into the buffers, and autograd accumulates into them in place.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class FlatParams:
    def __init__(self, params: Iterable[nn.Parameter]):
        unique = list({id(p): p for p in params}.values())
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in unique:
            groups.setdefault((p.device, p.dtype), []).append(p)
        self.members = unique
        self.tensors: list[nn.Parameter] = []  # what the optimizer updates
        for (device, dtype), members in groups.items():
            total = sum(p.numel() for p in members)
            data = torch.empty(total, device=device, dtype=dtype)
            grad = torch.zeros(total, device=device, dtype=dtype)
            offset = 0
            for p in members:
                n = p.numel()
                data[offset : offset + n].copy_(p.detach().reshape(-1))
                p.data = data[offset : offset + n].view_as(p)
                p.grad = grad[offset : offset + n].view_as(p)
                offset += n
            flat = nn.Parameter(data)
            flat.grad = grad
            self.tensors.append(flat)

    def zero_grad(self) -> None:
        for flat in self.tensors:
            flat.grad.zero_()

    def grad_norm(self) -> float:
        """The L2 norm of all gradients together (NaN or inf when any gradient is not finite); one device sync."""
        norms = [torch.linalg.vector_norm(flat.grad.float()) for flat in self.tensors]
        if not norms:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))

    def scale_grads(self, factor: float) -> None:
        for flat in self.tensors:
            flat.grad.mul_(factor)

    def release_grads(self) -> None:
        """Back to ordinary parameters without gradients (their values stay in the buffers)."""
        for p in self.members:
            p.grad = None
        for flat in self.tensors:
            flat.grad = None
