"""The training data set file: per-image latents and caption tensors, plus a JSON manifest in the safetensors
metadata for everything else. Only tensors and JSON: reading one never unpickles anything."""
from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("lora_trainer")
FORMAT = "lora_trainer.dataset/2"
READS = ("lora_trainer.dataset/1", FORMAT)  # /2 adds captions stored once for several images ("same_as")


def pack(samples: list[torch.Tensor], captions: list[list]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata. A caption entry that several images share (the same object, e.g. one
    caption given for all) is stored once; the others name it."""
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "count": len(samples), "captions": []}
    first_of: dict[int, int] = {}
    for i, (latent, caption) in enumerate(zip(samples, captions)):
        # each tensor is its own copy: safetensors refuses tensors that share memory (rows of one batch)
        tensors[f"latent.{i}"] = latent.detach().to(torch.float32, copy=True).contiguous()
        if id(caption) in first_of:
            manifest["captions"].append({"same_as": first_of[id(caption)]})
            continue
        first_of[id(caption)] = i
        cross_attn, extra = caption
        tensors[f"cond.{i}.cross_attn"] = cross_attn.detach().clone().contiguous()
        values, tensor_keys = {}, []
        for key, value in extra.items():
            if torch.is_tensor(value):
                tensors[f"cond.{i}.{key}"] = value.detach().clone().contiguous()
                tensor_keys.append(key)
            else:
                try:
                    json.dumps(value)
                    values[key] = value
                except TypeError:
                    log.warning("training data set: caption %d key '%s' (%s) is not saved", i, key, type(value).__name__)
        manifest["captions"].append({"tensors": tensor_keys, "values": values})
    return tensors, {"manifest": json.dumps(manifest)}


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
            captions.append([tensors[f"cond.{i}.cross_attn"], extra])
    except (KeyError, ValueError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"dataset: '{name}' is not a training data set file of this pack ({e!r})") from None
    return samples, captions
