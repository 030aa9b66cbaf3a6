"""Save / load an encoded training data set (latents + captions) as one safetensors file with a JSON manifest.

Only tensors and JSON go in: loading never unpickles anything.
"""
from __future__ import annotations

from pathlib import Path


import folder_paths

from ..lora.file_format import TEMP_PREFIX, save_new
from ..lora.finite import first_non_finite
from ..training.dataset_file import pack, unpack
from . import inputs
from .companions import confined



def dataset_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "training_datasets"


def dataset_choices() -> list[str]:
    root = dataset_dir()
    if not root.is_dir():
        return []
    # Temporary files of an interrupted save (older versions named them *.safetensors) are never offered.
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")
                  if p.is_file() and not p.name.startswith(TEMP_PREFIX))


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
        if where := first_non_finite(tensors):
            raise ValueError(f"dataset: '{dataset}' holds NaN or infinite values (in {where}); encode the data set "
                             "again")
        samples, captions = unpack(tensors, metadata, dataset)
        return ([{"samples": s.unsqueeze(0)} for s in samples], [[c] for c in captions])
