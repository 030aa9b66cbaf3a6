"""Save / load an encoded training data set (latents + captions) as one safetensors file with a JSON manifest.

Only tensors and JSON go in: loading never unpickles anything.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import folder_paths

from ..lora.file_format import save_new
from . import inputs
from .companions import confined

log = logging.getLogger("lora_trainer")
FORMAT = "lora_trainer.dataset/1"


def dataset_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "training_datasets"


def dataset_choices() -> list[str]:
    root = dataset_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")) if root.is_dir() else []


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
        assert manifest["format"] == FORMAT
        samples, captions = [], []
        for i, cap in enumerate(manifest["captions"]):
            samples.append(tensors[f"latent.{i}"])
            extra = dict(cap["values"])
            extra.update({k: tensors[f"cond.{i}.{k}"] for k in cap["tensors"]})
            captions.append([tensors[f"cond.{i}.cross_attn"], extra])
    except (KeyError, AssertionError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"dataset: '{name}' is not a training data set file of this pack ({e!r})") from None
    return samples, captions


class SaveTrainingDataset:
    DESCRIPTION = ("Saves encoded training data (latents and their captions' conditioning) as one safetensors file "
                   "in output/training_datasets, so encoding is done once.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "save"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latents": ("LATENT", {"tooltip": "One batch or a list of batches."}),
            "positive": ("CONDITIONING", {"tooltip": "One per image, or one for all."}),
            "name": ("STRING", {"default": "my_dataset", "tooltip": "File name prefix (subfolders allowed)."}),
        }}

    def save(self, latents, positive, name):
        samples = inputs.latent_samples(latents)
        captions = inputs.captions_for(positive, len(samples))
        tensors, metadata = pack(samples, captions)
        directory, stem = confined(dataset_dir(), inputs.one(name, "name"), "name")
        path = save_new(directory, stem, tensors, metadata)
        rel = path.relative_to(dataset_dir()).as_posix()
        return {"ui": {"text": [rel]}, "result": (rel,)}


class LoadTrainingDataset:
    DESCRIPTION = "Loads a training data set saved by Save Training Data Set: one LATENT and one CONDITIONING per image."
    CATEGORY = "LoRA Trainer"
    FUNCTION = "load"
    RETURN_TYPES = ("LATENT", "CONDITIONING")
    RETURN_NAMES = ("latents", "positive")
    OUTPUT_IS_LIST = (True, True)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dataset": (dataset_choices(), {"tooltip": "A file in output/training_datasets."})}}

    def load(self, dataset):
        import safetensors
        import safetensors.torch

        path = dataset_dir() / dataset
        if not path.resolve().is_relative_to(dataset_dir().resolve()) or not path.is_file():
            raise ValueError(f"dataset: '{dataset}' is not in {dataset_dir()}")
        try:
            tensors = safetensors.torch.load_file(str(path))
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"dataset: '{dataset}' is not a readable safetensors file ({e})") from None
        samples, captions = unpack(tensors, metadata, dataset)
        return ([{"samples": s.unsqueeze(0)} for s in samples], [[c] for c in captions])
