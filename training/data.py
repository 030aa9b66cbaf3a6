"""The training set as same-shape groups, and the seeded order in which micro-batches are drawn from it."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class DataError(ValueError):
    """Training data that cannot be trained on (an empty data set)."""


@dataclass
class Group:
    """Samples that share one latent shape, so they can be stacked into one batch."""

    latents: torch.Tensor  # (n, C, [T,] H, W) on the training device, already in the model's latent space
    sample_ids: list[int]  # position of each row in the whole data set (its caption index)


def group_by_shape(samples: list[torch.Tensor]) -> list[Group]:
    """``samples`` are single latents without batch dimension, in data-set order."""
    if not samples:
        raise DataError("latents: the data set is empty")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        by_shape.setdefault(tuple(s.shape), []).append(i)
    return [Group(torch.stack([samples[i] for i in ids]), ids) for ids in by_shape.values()]


def micro_batches(groups: list[Group], batch_size: int, generator: torch.Generator) -> Iterator[tuple[Group, list[int]]]:
    """Endless epochs: each epoch shuffles every group, cuts it into batches of ≤ batch_size rows and shuffles the
    batches, so every sample is seen once per epoch and a batch never mixes shapes. Yields (group, row indices)."""
    while True:
        batches = []
        for group in groups:
            rows = torch.randperm(len(group.sample_ids), generator=generator).tolist()
            batches += [(group, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
        for j in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[j]


def epoch_micro_batches(groups: list[Group], batch_size: int) -> int:
    return sum(math.ceil(len(g.sample_ids) / batch_size) for g in groups)
