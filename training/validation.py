"""Validation loss: the native-objective loss of held-out latents at fixed noise levels and fixed noise, so that two
evaluations differ only by what training changed (unlike the training loss, whose noise is new every step). It has
its own generator: evaluating never changes the training's random draws."""
from __future__ import annotations

from collections.abc import Callable

import torch

from . import objectives
from .data import Group, to_device

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
POINTS = 4  # noise levels per latent: evenly spaced quantiles of the model's sigma table


def _gaussian(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


class Validation:
    def __init__(self, groups: list[Group], schedule: objectives.Schedule, seed: int, points: int = POINTS,
                 device: torch.device | None = None):
        table = schedule.sigmas
        picks = [int((i + 0.5) / points * len(table)) for i in range(points)]
        self.sigmas = table[picks]  # the same levels at every evaluation
        generator = torch.Generator().manual_seed(seed)
        self.groups = groups
        self.device = device  # the training device the latents go to per evaluation (None: where they are)
        self.noise = []
        for g in groups:  # points · n rows: for a plain latent the same values as one (points, n, ...) draw
            n = len(g.sample_ids)
            self.noise.append(g.noise(points * n, _gaussian, generator).reshape(points, n, *g.shape))

    def loss(self, sample_loss: Callable[..., torch.Tensor], denoise: DenoiseFn) -> float:
        """The mean per-sample loss over every latent and noise level. ``sample_loss(denoise, x0, ids, noise, sigma)``
        is the training's own loss of a batch (see loop.sample_loss)."""
        total, count = 0.0, 0
        with torch.no_grad():
            for group, noise in zip(self.groups, self.noise):
                latents = group.all() if self.device is None else to_device(group.all(), self.device)
                for point, sigma in enumerate(self.sigmas):
                    n = len(group.sample_ids)
                    losses = sample_loss(denoise, latents, group.sample_ids, noise[point], sigma.repeat(n))
                    total += float(losses.sum())
                    count += n
        return total / count
