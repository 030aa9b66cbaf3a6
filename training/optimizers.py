"""Optimizers by the names the node offers."""
from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")


def build(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr)
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"optimizer '{name}' is not one of {', '.join(OPTIMIZERS)}")
