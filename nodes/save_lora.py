"""The Save LoRA node: a LORA_MODEL into the loras folder, in ComfyUI's, kohya's or diffusers' naming, with the metadata
hubs and UIs read."""
from __future__ import annotations

import datetime

import torch

from ..lora.adapter_set import split_keys
from ..lora.algorithms import detect
from ..lora.file_format import META, build_metadata
from ..lora.key_formats import FORMATS
from . import inputs, lora_files, lora_writer, process_group, save_metadata
from .companions import confined


class SaveLoRA:
    DESCRIPTION = ("Saves a LORA_MODEL as .safetensors into the loras folder (where LoRA loaders find it), in ComfyUI's, "
                   "kohya's or diffusers' key naming, with metadata (kohya ss_* keys, modelspec, hashes, training "
                   "settings). Every file is reloaded through ComfyUI's LoRA loader before it is kept. Never "
                   "overwrites: each save gets the next free number.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "save"
    OUTPUT_NODE = True
    INPUT_IS_LIST = True  # captions: the whole list of a data set's texts, in one call
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA_MODEL", {"tooltip": "The LoRA to save (from Train LoRA, or ComfyUI's own training node)."}),
            "prefix": ("STRING", {"default": "trained/my_lora",
                                  "tooltip": "File name prefix; may contain subfolders inside the loras folder."}),
        }, "optional": {
            "steps": ("INT", {"forceInput": True, "tooltip": "Total steps, added to the name and the metadata."}),
            "format": (list(FORMATS), {"default": "comfyui", "tooltip": lora_writer.FORMAT_TOOLTIP}),
            "model": ("MODEL", {"tooltip": "The model the LoRA belongs to: needed for kohya/diffusers names of a LoRA "
                                           "that did not come from Train LoRA."}),
            "title": ("STRING", {"default": "", "tooltip": "Title shown by hubs and UIs (modelspec.title); empty = "
                                                           "the file name."}),
            "trigger_words": ("STRING", {"default": "", "tooltip": "Words that trigger the LoRA in a prompt "
                                                                   "(modelspec.trigger_phrase), comma-separated."}),
            "thumbnail": ("IMAGE", {"tooltip": "Preview image stored in the file (modelspec.thumbnail); without it, "
                                               "the loss graph when 'loss' is connected."}),
            "loss": ("LOSS_MAP", {"tooltip": "Train LoRA's loss: drawn as the thumbnail when no image is given."}),
            "captions": ("STRING", {"forceInput": True, "tooltip": "The data set's captions (e.g. the texts of "
                                                                   "ComfyUI's Load Image and Text data-set node): "
                                                                   "their tag counts go into ss_tag_frequency."}),
        }}

    def save(self, lora, prefix, steps=None, format=None, model=None, title=None, trigger_words=None, thumbnail=None,
             loss=None, captions=None):
        if not process_group.writes_files():
            return process_group.skipped("the LoRA")
        if isinstance(lora, list) and len(lora) > 1:
            raise ValueError(f"lora: got a list of {len(lora)} LoRAs; Save LoRA saves one")
        lora, prefix = inputs.one(lora, "lora"), inputs.one(prefix, "prefix")
        fmt = inputs.one(format, "format") if format else "comfyui"
        steps = inputs.one(steps, "steps") if steps else None
        model = inputs.one(model, "model") if model else None
        if not isinstance(lora, dict) or not lora or not all(torch.is_tensor(v) for v in lora.values()):
            raise ValueError("lora: expected a LORA_MODEL (a non-empty dict of tensors)")
        metadata = dict(getattr(lora, "metadata", {}) or {}) or _metadata_of_foreign(lora, steps)
        if steps is not None:
            metadata[f"{META}steps"] = metadata["ss_steps"] = str(steps)
        total = metadata.get(f"{META}steps", "0")
        directory, stem = confined(lora_files.main_lora_dir(), prefix, "prefix")
        tensors = lora_writer.in_format(lora, lora_writer.naming_for(lora, model), fmt)
        metadata.update(save_metadata.for_file(
            lora, fmt=fmt, output_name=stem, title=inputs.one(title, "title") if title else "",
            trigger_words=inputs.one(trigger_words, "trigger_words") if trigger_words else "",
            thumbnail=inputs.one(thumbnail, "thumbnail") if thumbnail else None,
            loss=inputs.one(loss, "loss") if loss else None, captions=list(captions or []), steps=steps))
        path = lora_writer.write(tensors, directory, f"{stem}_{total}_steps", metadata)
        name = path.relative_to(lora_files.main_lora_dir()).as_posix()
        return {"ui": {"text": [name]}, "result": (name,)}


def _metadata_of_foreign(lora: dict, steps: int | None) -> dict[str, str]:
    """What a LoRA from another node (no metadata of ours) records: its algorithm, rank and alpha from its tensors."""
    return build_metadata(steps=steps or 0, algorithm=_algorithm_of(lora), rank=_rank_of(lora), alpha=_alpha_of(lora),
                          base_model="unknown", settings={},
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _first_with(lora: dict, suffix: str):
    return next((v for k, v in lora.items() if k.endswith(suffix)), None)


def _algorithm_of(lora: dict) -> str:
    try:
        algo = {detect(set(t)) for t in split_keys(dict(lora), "").values()} - {None}
    except ValueError:
        return "unknown"
    return algo.pop().name if len(algo) == 1 else "unknown"


def _rank_of(lora: dict) -> int:
    down = _first_with(lora, "lora_down.weight")
    return int(down.shape[0]) if down is not None else 0


def _alpha_of(lora: dict) -> float:
    alpha = _first_with(lora, ".alpha")
    return float(alpha.float().item()) if alpha is not None else 0.0
