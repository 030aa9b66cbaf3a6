"""Save / load an encoded training data set (latents + captions) as one safetensors file with a JSON manifest.

Only tensors and JSON go in: loading never unpickles anything.
"""
from __future__ import annotations

from pathlib import Path

import folder_paths

from ..lora.file_format import save_new
from ..lora.finite import first_non_finite
from ..training.dataset_file import pack, unpack
from . import inputs, process_group
from .companions import confined
from .safe_files import inside, listed, read_safetensors


def dataset_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "training_datasets"


def dataset_choices() -> list[str]:
    return listed(dataset_dir())


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
        if not process_group.writes_files():
            return process_group.skipped("the data set")
        samples = inputs.latent_samples(latents)
        captions = inputs.captions_for(positive, len(samples))
        tensors, metadata = pack(samples, captions)
        directory, stem = confined(dataset_dir(), inputs.one(name, "name"), "name")
        path = save_new(directory, stem, tensors, metadata, "latents")
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
        tensors, metadata = read_safetensors(inside(dataset_dir(), dataset, "dataset"), "dataset", dataset)
        if where := first_non_finite(tensors):
            raise ValueError(f"dataset: '{dataset}' holds NaN or infinite values (in {where}); encode the data set "
                             "again")
        samples, captions = unpack(tensors, metadata, dataset)
        return ([{"samples": s.unsqueeze(0)} for s in samples], [[c] for c in captions])
