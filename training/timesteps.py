"""How each training sample gets its noise level and noise, and how much its loss counts.

Default: a noise level drawn uniformly from the model's own table of training sigmas, plain Gaussian noise, weight 1
(what the node has always done, draw for draw)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import objectives

TIMESTEP_SAMPLINGS = ("uniform",)


@dataclass(frozen=True)
class TimestepSampling:
    kind: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: '{self.kind}' is not one of {', '.join(TIMESTEP_SAMPLINGS)}")

    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """The Gaussian noise of a micro-batch of latents of ``shape`` (drawn before the sigmas)."""
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def sigmas(self, schedule: objectives.Schedule, n: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample noise levels for ``n`` samples."""
        table = schedule.sigmas
        return table[torch.randint(0, len(table), (n,), generator=generator)]

    def loss_weights(self, schedule: objectives.Schedule, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights at these noise levels, or None for all ones."""
        return None
