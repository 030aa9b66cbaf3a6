"""Latents made of several streams, e.g. LTX-2's video and audio latents of one clip (ComfyUI's NestedTensor).

ComfyUI's samplers hand such a latent to the model packed: each sample's streams flattened and concatenated into
one row, which the model splits again by the streams' shapes. Training does the same: the latent, its noise and the
model's output are packed rows, so noising and the loss (over every stream) work on them as on any latent. Only the
noise is drawn stream by stream (as ComfyUI's samplers draw it), so each stream gets its own per-channel offset.
The packing itself is ComfyUI's, handed in by the caller (``Layout.pack``)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# A batch of each stream, (n, *stream shape) in stream order -> the packed batch (n, *packed shape).
PackFn = Callable[[list[torch.Tensor]], torch.Tensor]
# (shape, generator) -> noise of that shape: e.g. training.timesteps.TimestepSampling.noise.
DrawFn = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


class Streams:
    """One sample of a latent of several streams, each stream without batch dimension, in the stream order of its
    LATENT (LTX-2: video, then audio). Views of the input: nothing copies or writes into them."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        if len(tensors) < 1 or not all(torch.is_tensor(t) for t in tensors):
            raise ValueError("a latent of streams needs at least one tensor")
        self.tensors = tuple(tensors)

    @property
    def shape(self) -> torch.Size:
        """The first stream's shape, as ComfyUI's NestedTensor reports it (LTX-2's video: what gives the
        resolution)."""
        return self.tensors[0].shape

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.tensors)


def parts(sample: torch.Tensor | Streams) -> tuple[torch.Tensor, ...]:
    """The tensors a sample is made of: itself, or its streams."""
    return sample.tensors if isinstance(sample, Streams) else (sample,)


@dataclass(frozen=True)
class Layout:
    """How the samples of one group are packed: each stream's shape (without batch dimension) and the packing."""

    shapes: tuple[tuple[int, ...], ...]
    pack: PackFn = field(compare=False, repr=False)

    @property
    def size(self) -> int:
        """Values in one sample's packed row: every stream's."""
        return sum(math.prod(s) for s in self.shapes)

    def noise(self, n: int, draw: DrawFn, generator: torch.Generator) -> torch.Tensor:
        """Noise for ``n`` samples: each stream's drawn in turn at its own shape, then packed like the latents."""
        return self.pack([draw((n, *shape), generator) for shape in self.shapes])
