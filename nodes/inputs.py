"""Turning the node's (list-mode) LATENT and CONDITIONING inputs into per-sample latents and captions."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..lora.finite import first_non_finite
from ..training.mapped_safetensors import release
from ..training.streams import Streams


def one(values, name: str):
    """A widget value from list-mode input (ComfyUI passes every input as a list when INPUT_IS_LIST is set)."""
    if isinstance(values, list):
        if not values:
            raise ValueError(f"{name}: no value")
        return values[0]
    return values


def latent_samples(latents, model_dims: tuple[int, str] | None = None) -> list[torch.Tensor | Streams]:
    """Every image of one LATENT batch or of a list of LATENTs, as single latents (C, [T,] H, W), or (C, N) for 3-D
    shape models; a latent of several streams (ComfyUI's NestedTensor, e.g. LTX-2's audio+video) gives each image's
    streams as one ``Streams``. ``model_dims`` = (spatial dimensions, model name) the model takes: each item (its
    first stream) is checked against it before anything runs, so a wrong latent is blamed on ``latents``, not on a
    crash inside the model.

    The latents are views of the inputs, never copies (a data set may be larger than RAM, memory-mapped from its
    file): whoever uses one copies what it needs, and nothing writes into them. What the checks read of a
    memory-mapped data set is released again, so they leave resident memory as it was."""
    items = latents if isinstance(latents, list) else [latents]
    out: list[torch.Tensor | Streams] = []
    for i, item in enumerate(items):
        streams = _streams(i, item.get("samples") if isinstance(item, dict) else None)
        samples = streams[0]
        if samples.ndim not in (3, 4, 5):
            raise ValueError(f"latents: item {i} has shape {tuple(samples.shape)}; expected 4-D images, 5-D video "
                             "or 3-D shape latents (Hunyuan 3D)")
        if model_dims is not None:
            _check_dims(i, tuple(samples.shape), *model_dims)
        for b in range(samples.shape[0]):
            image = tuple(t[b] for t in streams)
            if where := first_non_finite(image if len(image) > 1 else image[0]):
                stream = f" (stream {where.strip('[]')})" if len(image) > 1 else ""
                raise ValueError(f"latents: item {i}, image {b}{stream} holds NaN or infinite values")
            release(*image)
            out.append(Streams(image) if len(image) > 1 else image[0])
    if not out:
        raise ValueError("latents: the data set is empty (0 images)")
    return out


def _streams(i: int, samples) -> list[torch.Tensor]:
    """The tensors of item i's ``samples``: the tensor itself, or each stream of a latent of several (ComfyUI's
    NestedTensor), batches of equally many images."""
    if torch.is_tensor(samples):
        return [samples]
    if not (getattr(samples, "is_nested", False) and callable(getattr(samples, "unbind", None))):
        raise ValueError(f"latents: item {i} is not a LATENT (no 'samples' tensor)")
    streams = list(samples.unbind())
    if not streams or not all(torch.is_tensor(t) and t.ndim >= 3 for t in streams):
        raise ValueError(f"latents: item {i} is a latent of streams that are not all batches of latents")
    if len({t.shape[0] for t in streams}) != 1:
        raise ValueError(f"latents: item {i} has streams of different batch sizes "
                         f"({', '.join(str(tuple(t.shape)) for t in streams)})")
    return streams


def _check_dims(i: int, shape: tuple[int, ...], dims: int, model: str) -> None:
    kinds = {1: "3-D (B, C, N)", 2: "4-D images (B, C, H, W)", 3: "5-D video (B, C, T, H, W)"}
    if len(shape) - 2 != dims:
        raise ValueError(f"latents: item {i} has shape {shape}; this {model} model takes "
                         f"{kinds.get(dims, f'{dims + 2}-D')} latents")


def _split_entry(entry: list) -> list[list]:
    """One conditioning entry whose tensors hold B captions, as B single-caption entries."""
    tensor, extra = entry[0], entry[1]
    rows = tensor.shape[0] if torch.is_tensor(tensor) else 1
    if rows == 1:
        return [[tensor, dict(extra)]]
    out = []
    for b in range(rows):
        row_extra = {k: (v[b : b + 1] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows else v)
                     for k, v in extra.items()}
        out.append([tensor[b : b + 1], row_extra])
    return out


def _caption_entries(cond: list) -> list[list]:
    """One CONDITIONING as single-caption entries."""
    return [piece for entry in cond if entry for piece in _split_entry(entry)]


def caption_identity(entry: list) -> tuple:
    """Equal for caption entries made of the very same objects (one caption shared by many images, each image's
    entry a new list around it): they encode alike, so they are checked and encoded once."""
    return (id(entry[0]), tuple((k, id(v)) for k, v in sorted(entry[1].items())))


def release_caption(entry: list) -> None:
    """The caption's tensors, read, need not stay resident (see mapped_safetensors.release)."""
    release(entry[0], *(v for v in entry[1].values() if torch.is_tensor(v)))


def captions_for(positive, count: int) -> list[list]:
    """One conditioning entry per image: a single one is repeated; otherwise the counts must match."""
    items = positive if isinstance(positive, list) and positive and isinstance(positive[0], list) and \
        positive[0] and isinstance(positive[0][0], list) else [positive]
    entries = [piece for cond in items for piece in _caption_entries(cond)]
    if not entries:
        raise ValueError("positive: no conditioning given")
    checked = set()
    for j, entry in enumerate(entries):
        if (key := caption_identity(entry)) in checked:  # a caption many images share is read once
            continue
        checked.add(key)
        tensor, extra = entry
        where = "its embedding" if first_non_finite(tensor) else first_non_finite(extra)
        if where:
            raise ValueError(f"positive: caption {j} holds NaN or infinite values ({where})")
        release_caption(entry)
    if len(entries) == 1:
        return entries * count
    if len(entries) != count:
        raise ValueError(f"positive: {len(entries)} conditionings for {count} latent images; "
                         "give one per image or a single one for all")
    return entries


def check_pairing(latents, positive) -> None:
    """A list of LATENTs and a list of CONDITIONINGs pair item by item: item i of one holds as many images as item
    i of the other holds captions. Equal totals with another split mean they come from different nodes (e.g. a
    ResolutionBucket's latents with MakeTrainingDataset's conditioning): images would get other images' captions."""
    if not (isinstance(latents, list) and len(latents) > 1 and isinstance(positive, list) and len(positive) > 1):
        return
    images = [item["samples"].shape[0] for item in latents]
    captions = [len(_caption_entries(cond)) for cond in positive]
    if sum(captions) == sum(images) and captions != images:
        raise ValueError(f"positive: its items hold {captions} captions but the latents' items hold {images} images; "
                         "connect latents and positive from the same node (e.g. both from ResolutionBucket) so each "
                         "image keeps its own caption")


@contextlib.contextmanager
def as_validation_data() -> Iterator[None]:
    """The checks of ``latents`` and ``positive`` applied to the validation data: their errors name
    ``validation_latents`` / ``validation_positive`` instead."""
    try:
        yield
    except ValueError as e:
        message = str(e)
        raise ValueError(f"validation_{message}" if message.startswith(("latents:", "positive:")) else message) from None
