"""The training set as same-shape groups, and the seeded order in which micro-batches are drawn from it.

A group holds positions, not latents: its rows are loaded (stacked, in the model's latent space) only when a
micro-batch is drawn, so the memory the data set takes is whatever its source holds (a memory-mapped file, the
caller's tensors), never a second copy of it."""
from __future__ import annotations

import copy
import math
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .streams import DrawFn, Layout


class DataError(ValueError):
    """Training data that cannot be trained on (an empty data set)."""


# Data-set positions -> their latents stacked into one (n, C, [T,] H, W) tensor, in the model's latent space.
LoadFn = Callable[[list[int]], torch.Tensor]


@dataclass
class Group:
    """Samples that share one latent shape, so they can be stacked into one batch."""

    shape: tuple[int, ...]  # one sample's latent shape (C, [T,] H, W), in the model's latent space (packed: see layout)
    sample_ids: list[int]  # position of each row in the whole data set (its caption index)
    load: LoadFn
    layout: Layout | None = None  # the streams packed into each row, for a latent of several (training.streams)

    def rows(self, rows: list[int]) -> torch.Tensor:
        """The latents of these rows of the group, stacked (where the data set waits; the caller moves them)."""
        return self.load([self.sample_ids[r] for r in rows])

    def all(self) -> torch.Tensor:
        return self.load(self.sample_ids)

    def noise(self, n: int, draw: DrawFn, generator: torch.Generator) -> torch.Tensor:
        """Noise for ``n`` rows: ``draw((n, *shape), generator)``, or, for packed streams, each stream's own
        (with its own per-channel offset), packed like the latents."""
        return draw((n, *self.shape), generator) if self.layout is None else self.layout.noise(n, draw, generator)


def groups_of(shapes: Sequence[tuple[int, ...]], load: LoadFn,
              layouts: Sequence[Layout | None] | None = None) -> list[Group]:
    """Groups of a data set whose sample i has latent shape ``shapes[i]`` (and, packed from streams,
    ``layouts[i]``), each loading its rows with ``load``. Samples of different streams never share a group, even
    where their packed rows are equally long."""
    if not shapes:
        raise DataError("latents: the data set is empty")
    layouts = layouts if layouts is not None else [None] * len(shapes)
    by_shape: dict[tuple[tuple[int, ...], Layout | None], list[int]] = {}
    for i, (shape, layout) in enumerate(zip(shapes, layouts, strict=True)):
        by_shape.setdefault((tuple(shape), layout), []).append(i)
    return [Group(shape, ids, load, layout) for (shape, layout), ids in by_shape.items()]


def group_by_shape(samples: Sequence[torch.Tensor]) -> list[Group]:
    """Groups of single latents without batch dimension, in data-set order, held by the caller."""
    return groups_of([tuple(s.shape) for s in samples], lambda ids: torch.stack([samples[i] for i in ids]))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A micro-batch's tensor on the training device. From the CPU to a GPU it goes through page-locked memory,
    whose copy is asynchronous: the CPU goes on preparing the step while the batch is in flight."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def out_of_inference(value: Any) -> Any:
    """``value`` with each tensor made under ``torch.inference_mode`` replaced by an ordinary copy, found through
    dicts, lists, tuples and the attributes of other data objects (a conditioning's constants can be any of these).

    Autograd refuses to save an inference tensor for backward, and ComfyUI runs every node in inference mode, so
    any tensor a node made (a text encoding, a reference latent, a model's own constant) may be one. Only inference
    tensors are copied, and only the containers on the way to one are rebuilt (shallow copies; the input is never
    changed): a value without any comes back as the very same object, at the cost of one look at each tensor.
    Callables (hooks, patches, modules) are code, not data, and are kept as they are. In inference mode (evaluation)
    nothing is copied: a copy made there would be an inference tensor again, and nothing is saved for backward."""
    return value if torch.is_inference_mode_enabled() else _copied_out(value, {})


_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _copied_out(value: Any, seen: dict[int, Any]) -> Any:
    if isinstance(value, _ATOMS) or callable(value) or isinstance(value, types.ModuleType):
        return value
    if id(value) in seen:  # shared (or cyclic) parts are copied once, and a cycle ends at its start
        return seen[id(value)]
    seen[id(value)] = value
    if isinstance(value, torch.Tensor):
        out = value.clone() if value.is_inference() else value
    elif isinstance(value, dict):
        changed = {k: new for k, v in value.items() if (new := _copied_out(v, seen)) is not v}
        out = _updated(value, changed, lambda c, k, v: c.__setitem__(k, v))
    elif isinstance(value, (list, tuple)):
        items = [_copied_out(v, seen) for v in value]
        if all(new is old for new, old in zip(items, value)):
            out = value
        elif isinstance(value, list):
            out = copy.copy(value)
            out[:] = items
        else:  # a tuple, or a named tuple (built from its fields)
            out = type(value)._make(items) if hasattr(value, "_make") else type(value)(items)
    elif hasattr(value, "__dict__"):
        changed = {k: new for k, v in vars(value).items() if (new := _copied_out(v, seen)) is not v}
        out = _updated(value, changed, setattr)
    else:
        out = value
    seen[id(value)] = out
    return out


def _updated(value: Any, changed: dict, put: Callable[[Any, Any, Any], None]) -> Any:
    """``value`` itself when nothing changed, else a shallow copy of it with the ``changed`` entries put in."""
    if not changed:
        return value
    out = copy.copy(value)
    for key, new in changed.items():
        put(out, key, new)
    return out


class MicroBatches:
    """Endless epochs: each epoch shuffles every group, cuts it into batches of ≤ batch_size rows and shuffles the
    batches, so every sample is seen once per epoch and a batch never mixes shapes. Yields (group, row indices).

    Its position (the current epoch's order and how far it got) is part of a resumable training state: an epoch is
    drawn from ``generator`` only when the previous one is used up, so restoring the position together with the
    generator's state continues the exact sequence."""

    def __init__(self, groups: list[Group], batch_size: int, generator: torch.Generator):
        self.groups, self.batch_size, self.generator = groups, batch_size, generator
        self.order: list[tuple[int, list[int]]] = []  # (group index, rows) of the current epoch's micro-batches
        self.position = 0

    def __iter__(self) -> Iterator[tuple[Group, list[int]]]:
        return self

    def __next__(self) -> tuple[Group, list[int]]:
        if self.position >= len(self.order):
            self._draw_epoch()
        group, rows = self.order[self.position]
        self.position += 1
        return self.groups[group], rows

    def _draw_epoch(self) -> None:
        batches = []
        for g, group in enumerate(self.groups):
            rows = torch.randperm(len(group.sample_ids), generator=self.generator).tolist()
            batches += [(g, rows[i : i + self.batch_size]) for i in range(0, len(rows), self.batch_size)]
        self.order = [batches[j] for j in torch.randperm(len(batches), generator=self.generator).tolist()]
        self.position = 0

    def state(self) -> dict:
        return {"order": [[g, rows] for g, rows in self.order], "position": self.position}

    def restore(self, state: dict) -> None:
        order = [(int(g), [int(r) for r in rows]) for g, rows in state["order"]]
        if any(g >= len(self.groups) or max(rows, default=0) >= len(self.groups[g].sample_ids) for g, rows in order):
            raise DataError("the saved data order does not fit these latents")
        self.order, self.position = order, int(state["position"])


def micro_batches(groups: list[Group], batch_size: int, generator: torch.Generator) -> MicroBatches:
    return MicroBatches(groups, batch_size, generator)


def epoch_micro_batches(groups: list[Group], batch_size: int) -> int:
    return sum(math.ceil(len(g.sample_ids) / batch_size) for g in groups)
