"""The training data set file: per-image latents and caption tensors, plus a JSON manifest in the safetensors
metadata for everything else. Only tensors and JSON: reading one never unpickles anything."""
from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("lora_trainer")
FORMAT = "lora_trainer.dataset/1"


def pack(samples: list[torch.Tensor], captions: list[list]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    manifest = {"format": FORMAT, "count": len(samples), "captions": []}
    for i, (latent, (cross_attn, extra)) in enumerate(zip(samples, captions)):
        tensors[f"latent.{i}"] = latent.contiguous()
        tensors[f"cond.{i}.cross_attn"] = cross_attn.contiguous()
        values, tensor_keys = {}, []
        for key, value in extra.items():
            if torch.is_tensor(value):
                tensors[f"cond.{i}.{key}"] = value.contiguous()
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
    try:
        manifest = json.loads(metadata["manifest"])
        if manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r}, expected {FORMAT!r}")
        samples, captions = [], []
        for i, cap in enumerate(manifest["captions"]):
            samples.append(tensors[f"latent.{i}"])
            extra = dict(cap["values"])
            extra.update({k: tensors[f"cond.{i}.{k}"] for k in cap["tensors"]})
            captions.append([tensors[f"cond.{i}.cross_attn"], extra])
    except (KeyError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"dataset: '{name}' is not a training data set file of this pack ({e!r})") from None
    return samples, captions


