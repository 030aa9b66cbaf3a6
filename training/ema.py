"""An exponential moving average of the trainable weights: smoother than the last step's weights, often the better
LoRA after a long run. Kept in fp32 beside the flat weight buffers and updated after every applied step."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .flat_params import FlatParams


class EMA:
    def __init__(self, flat: FlatParams, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay: {decay} must be between 0 and 1 (0 = off)")
        self.decay = decay
        self.shadow = [t.detach().clone() for t in flat.tensors]

    def update(self, flat: FlatParams) -> None:
        with torch.no_grad():
            for average, value in zip(self.shadow, flat.tensors):
                average.lerp_(value.detach(), 1.0 - self.decay)

    def copy_to(self, flat: FlatParams) -> None:
        """Makes the EMA the weights (the adapters read their weights from the flat buffers)."""
        with torch.no_grad():
            for target, average in zip(flat.tensors, self.shadow):
                target.copy_(average)

    @contextlib.contextmanager
    def applied(self, flat: FlatParams) -> Iterator[None]:
        """The EMA as the weights for the duration (e.g. to save it), then the trained weights again."""
        kept = [t.detach().clone() for t in flat.tensors]
        self.copy_to(flat)
        try:
            yield
        finally:
            with torch.no_grad():
                for target, value in zip(flat.tensors, kept):
                    target.copy_(value)
