"""The training data set file: per-image latents and caption tensors, plus a JSON manifest in the safetensors
metadata for everything else. Only tensors and JSON: reading one never unpickles anything."""
from __future__ import annotations

import json
import logging

import torch

from .streamed_safetensors import Entry

log = logging.getLogger("lora_trainer")
FORMAT = "lora_trainer.dataset/3"
# /2 adds captions stored once for several images ("same_as"); /3 lists of tensors in a caption ("tensor_lists", e.g.
# an edit model's reference_latents), which an older reader would drop without a word.
READS = ("lora_trainer.dataset/1", "lora_trainer.dataset/2", FORMAT)


def plan(samples: list[torch.Tensor], captions: list[list]) -> tuple[list[Entry], dict[str, str]]:
    """The file's tensors, as entries that make each tensor only when its bytes are written (no copy of the data set
    is ever made), and its metadata. A caption entry that several images share (the same object, e.g. one caption
    given for all) is stored once; the others name it."""
    entries: list[Entry] = []
    manifest = {"format": FORMAT, "count": len(samples), "captions": []}
    first_of: dict[int, int] = {}
    for i, (latent, caption) in enumerate(zip(samples, captions)):
        entries.append(Entry(f"latent.{i}", torch.float32, tuple(latent.shape),
                             lambda latent=latent: latent.detach().to(torch.float32)))
        if id(caption) in first_of:
            manifest["captions"].append({"same_as": first_of[id(caption)]})
            continue
        first_of[id(caption)] = i
        cross_attn, extra = caption
        entries.append(_as_is(f"cond.{i}.cross_attn", cross_attn))
        values, tensor_keys, tensor_lists = {}, [], {}
        for key, value in extra.items():
            if torch.is_tensor(value):
                entries.append(_as_is(f"cond.{i}.{key}", value))
                tensor_keys.append(key)
            elif _is_tensor_list(value):
                entries.extend(_as_is(f"cond.{i}.{key}.{j}", t) for j, t in enumerate(value))
                tensor_lists[key] = len(value)
            else:
                try:
                    json.dumps(value)
                    values[key] = value
                except TypeError:
                    log.warning("training data set: caption %d key '%s' (%s) is not saved", i, key, type(value).__name__)
        manifest["captions"].append({"tensors": tensor_keys, "values": values,
                                     **({"tensor_lists": tensor_lists} if tensor_lists else {})})
    return entries, {"manifest": json.dumps(manifest)}


def _is_tensor_list(value) -> bool:
    """A conditioning value that is a list of tensors, e.g. reference_latents (one latent per reference image)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(torch.is_tensor(v) for v in value)


def _as_is(name: str, tensor: torch.Tensor) -> Entry:
    return Entry(name, tensor.dtype, tuple(tensor.shape), lambda: tensor.detach())


def pack(samples: list[torch.Tensor], captions: list[list]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors made at once (``plan`` for writing; this for small sets and tests)."""
    entries, metadata = plan(samples, captions)
    return {entry.name: entry.make() for entry in entries}, metadata


def shards(samples: list[torch.Tensor], captions: list[list], max_bytes: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of items, in order, whose files each hold at most ``max_bytes`` of tensors (an item
    larger than that gets a file of its own). A caption shared by items of several shards is stored in each."""
    ranges, start, size, seen = [], 0, 0, set()
    for i, (latent, caption) in enumerate(zip(samples, captions)):
        item = latent.numel() * 4  # stored as fp32
        if id(caption) not in seen:
            item += _caption_bytes(caption)
        if i > start and size + item > max_bytes:
            ranges.append((start, i))
            start, size, seen = i, 0, set()
            item = latent.numel() * 4 + _caption_bytes(caption)
        seen.add(id(caption))
        size += item
    if samples:
        ranges.append((start, len(samples)))
    return ranges


def _caption_bytes(caption: list) -> int:
    cross_attn, extra = caption
    listed = [t for v in extra.values() if _is_tensor_list(v) for t in v]
    return sum(t.numel() * t.element_size() for t in (cross_attn, *extra.values(), *listed) if torch.is_tensor(t))


def unpack(tensors: dict[str, torch.Tensor], metadata: dict[str, str], name: str):
    """(latents, caption entries) of one file; a caption stored once for several images is one shared entry."""
    try:
        manifest = json.loads(metadata["manifest"])
        if manifest["format"] not in READS:
            raise ValueError(f"format {manifest['format']!r}, expected one of {READS}")
        samples, captions = [], []
        for i, cap in enumerate(manifest["captions"]):
            samples.append(tensors[f"latent.{i}"])
            if "same_as" in cap:
                first = int(cap["same_as"])
                if not 0 <= first < i:
                    raise ValueError(f"caption {i} is the same as caption {first}, which does not come before it")
                captions.append(captions[first])
                continue
            extra = dict(cap["values"])
            extra.update({k: tensors[f"cond.{i}.{k}"] for k in cap["tensors"]})
            extra.update({k: [tensors[f"cond.{i}.{k}.{j}"] for j in range(int(n))]
                          for k, n in cap.get("tensor_lists", {}).items()})
            captions.append([tensors[f"cond.{i}.cross_attn"], extra])
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:  # JSONDecodeError: a ValueError
        raise ValueError(f"dataset: '{name}' is not a training data set file of this pack ({e!r})") from None
    return samples, captions
