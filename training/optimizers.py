"""Optimizers by the names the node offers."""
from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")


def build(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    # Adam(W): the fused kernel (CPU and CUDA) is ~4x faster than foreach on many small adapter tensors.
    # SGD/RMSprop: foreach, one batched update for all tensors (torch picks it on CUDA only; it helps on the CPU too).
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, fused=True)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, foreach=True)
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    raise ValueError(f"optimizer '{name}' is not one of {', '.join(OPTIMIZERS)}")
