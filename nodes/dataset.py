"""Save / load an encoded training data set (latents + captions) as safetensors files with a JSON manifest: one file,
or a folder of them (shards, e.g. one per encoding run).

Only tensors and JSON go in: loading never unpickles anything, and reads nothing but the files' headers (the tensors
are memory-mapped, read when training draws them).
"""
from __future__ import annotations

from pathlib import Path

import comfy.utils
import folder_paths

from ..lora.file_format import claim_new, claim_new_folder, non_finite_message
from ..lora.finite import first_non_finite
from ..training import streamed_safetensors
from ..training.dataset_file import plan, shards, unpack
from ..training.mapped_safetensors import MappedFileError, open_mapped
from ..training.streams import Streams
from . import inputs, process_group
from .companions import confined
from .safe_files import inside, listed


DEFAULT_SHARD_GB = 2.0


def dataset_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "training_datasets"


def dataset_choices() -> list[str]:
    """Every data set file, and every folder holding some ("name/": all of its files, a data set in shards)."""
    files = listed(dataset_dir())
    folders = {"/".join(parts[:n]) + "/" for parts in (f.split("/") for f in files) for n in range(1, len(parts))}
    return sorted(folders | set(files))  # a folder just before its files


def dataset_files(name: str) -> list[Path]:
    """The files a choice stands for: one file, or a folder's files in name order."""
    path = inside(dataset_dir(), name, "dataset", folders=True)
    if path.is_file():
        return [path]
    files = [path / f for f in listed(path)]
    if not files:
        raise ValueError(f"dataset: the folder '{name}' holds no data set file")
    return files


def read_dataset(name: str) -> tuple[list, list]:
    """(latents, caption entries) of a data set file or folder of shards, memory-mapped: nothing but the headers is
    read here, so a data set larger than RAM loads at once; training reads each micro-batch when it is drawn."""
    samples, captions = [], []
    for path in dataset_files(name):
        shown = path.relative_to(dataset_dir()).as_posix()
        try:
            tensors, metadata = open_mapped(path)
        except (OSError, MappedFileError) as e:
            raise ValueError(f"dataset: '{shown}' is not a readable safetensors file ({e})") from None
        more_samples, more_captions = unpack(tensors, metadata, shown)
        samples += more_samples
        captions += more_captions
    return samples, captions


class SaveTrainingDataset:
    DESCRIPTION = ("Saves encoded training data (latents and their captions' conditioning) in output/training_datasets, "
                   "so encoding is done once: one safetensors file, or a folder of shards when the set is larger than "
                   "a shard. Written to disk tensor by tensor: saving takes no more memory than one item.")
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
        }, "optional": {
            "shard_size_gb": ("FLOAT", {"default": DEFAULT_SHARD_GB, "min": 1e-6, "max": 1024.0, "step": 0.1,
                                        "round": 1e-6, "tooltip": (
                "A set larger than this is saved as a folder of files of at most this size (name_NNNNN/), which "
                "Load Training Data Set reads as one set.")}),
        }}

    def save(self, latents, positive, name, shard_size_gb=None):
        if not process_group.writes_files():
            return process_group.skipped("the data set")
        samples = inputs.latent_samples(latents)
        if any(isinstance(sample, Streams) for sample in samples):
            raise ValueError("latents: a latent of several streams (e.g. LTX-2's audio+video) cannot be saved as a "
                             "data set yet; connect it to Train LoRA directly")
        captions = inputs.captions_for(positive, len(samples))
        directory, stem = confined(dataset_dir(), inputs.one(name, "name"), "name")
        shard_gb = DEFAULT_SHARD_GB if shard_size_gb is None else inputs.one(shard_size_gb, "shard_size_gb")
        ranges = shards(samples, captions, max(1, int(shard_gb * 2**30)))
        progress = comfy.utils.ProgressBar(len(samples))
        if len(ranges) == 1:
            path = _save_shard(directory, stem, samples, captions, progress)
        else:
            def fill(folder: Path) -> None:
                for start, stop in ranges:
                    _save_shard(folder, "part", samples[start:stop], captions[start:stop], progress)

            path = claim_new_folder(directory, stem, fill)
        rel = path.relative_to(dataset_dir()).as_posix() + ("/" if path.is_dir() else "")
        return {"ui": {"text": [rel]}, "result": (rel,)}


def _save_shard(directory: Path, stem: str, samples: list, captions: list, progress) -> Path:
    """One data set file, streamed to disk (training/streamed_safetensors.py); NaN or inf in any tensor stops the
    save before the file appears, naming the input it came from."""
    entries, metadata = plan(samples, captions)

    def check(entry_name: str, tensor) -> None:
        if first_non_finite(tensor):
            what = "latents" if entry_name.startswith("latent.") else "positive"
            raise ValueError(non_finite_message(what, entry_name))

    def done(entry) -> None:
        if entry.name.startswith("latent."):
            progress.update(1)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out:
            streamed_safetensors.write(out, entries, metadata, check=check, done=done)

    return claim_new(directory, stem, write)


class LoadTrainingDataset:
    DESCRIPTION = ("Loads a training data set saved by Save Training Data Set (a file, or a folder of them as one data "
                   "set): one LATENT and one CONDITIONING per image. The files are memory-mapped: training reads each "
                   "micro-batch when it draws it.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "load"
    RETURN_TYPES = ("LATENT", "CONDITIONING")
    RETURN_NAMES = ("latents", "positive")
    OUTPUT_IS_LIST = (True, True)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"dataset": (dataset_choices(), {
            "tooltip": "A file in output/training_datasets, or a folder of them (name/): a data set in shards."})}}

    def load(self, dataset):
        # NaN and infinity are found by what uses the data (Train LoRA checks every input before its first step):
        # checking here would read the whole data set.
        samples, captions = read_dataset(dataset)
        return ([{"samples": s.unsqueeze(0)} for s in samples], [[c] for c in captions])
