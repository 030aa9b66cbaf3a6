"""Companion nodes: save a LoRA, apply a LoRA, plot the loss."""
from __future__ import annotations

import datetime
import io
import os
from pathlib import Path

import torch

import folder_paths

from ..lora.file_format import META, PATH_MAX_BYTES, SUFFIX_BYTES, build_metadata, check_name_parts, save_new
from .loss_chart import loss_map_chart
from . import comfy_bridge, lora_files


def confined(base: Path, prefix: str, what: str) -> tuple[Path, str]:
    """Splits a ``sub/folder/name`` prefix into a directory inside ``base`` and a file stem; refuses escapes."""
    prefix = (prefix or "").strip().replace("\\", "/")
    parts = [p for p in prefix.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or os.path.isabs(prefix):
        raise ValueError(f"{what}: '{prefix}' must be a relative name inside {base} (no '..')")
    check_name_parts(parts, what)
    directory = base.joinpath(*parts[:-1]).resolve()
    if not directory.is_relative_to(base.resolve()):
        raise ValueError(f"{what}: '{prefix}' leaves {base}")
    size = len(str(directory / parts[-1]).encode()) + SUFFIX_BYTES
    if size > PATH_MAX_BYTES:
        raise ValueError(f"{what}: '{prefix[:40]}...' makes a path of {size} bytes in all; at most {PATH_MAX_BYTES} "
                         "are possible: use fewer or shorter folder names")
    return directory, parts[-1]


class SaveLoRA:
    DESCRIPTION = ("Saves a LORA_MODEL as .safetensors into the loras folder (where LoRA loaders find it), with "
                   "metadata (steps, rank, alpha, algorithm, base model, training settings, date). Never overwrites: "
                   "each save gets the next free number.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "save"
    OUTPUT_NODE = True
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
        }}

    def save(self, lora, prefix, steps=None):
        if not isinstance(lora, dict) or not lora or not all(torch.is_tensor(v) for v in lora.values()):
            raise ValueError("lora: expected a LORA_MODEL (a non-empty dict of tensors)")
        metadata = dict(getattr(lora, "metadata", {}) or {})
        if not metadata:
            metadata = build_metadata(steps=steps or 0, algorithm=_algorithm_of(lora), rank=_rank_of(lora),
                                      alpha=_alpha_of(lora), base_model="unknown", settings={},
                                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if steps is not None:
            metadata[f"{META}steps"] = metadata["ss_steps"] = str(steps)
        total = metadata.get(f"{META}steps", "0")
        directory, stem = confined(lora_files.main_lora_dir(), prefix, "prefix")
        path = save_new(directory, f"{stem}_{total}_steps", dict(lora), metadata)
        name = path.relative_to(lora_files.main_lora_dir()).as_posix()
        return {"ui": {"text": [name]}, "result": (name,)}


def _first_with(lora: dict, suffix: str):
    return next((v for k, v in lora.items() if k.endswith(suffix)), None)


def _algorithm_of(lora: dict) -> str:
    from ..lora.adapter_set import split_keys
    from ..lora.algorithms import detect

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


class ApplyLoRA:
    DESCRIPTION = "Applies a LORA_MODEL to a MODEL at a strength, exactly as ComfyUI's LoRA loaders do."
    CATEGORY = "LoRA Trainer"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "lora": ("LORA_MODEL", {"tooltip": "From Train LoRA or ComfyUI's own nodes."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    def apply(self, model, lora, strength):
        if strength == 0:
            return (model,)
        return (comfy_bridge.with_lora(model, lora, strength),)


class LossGraph:
    DESCRIPTION = ("Plots a LOSS_MAP (loss per step with a smoothed curve, validation loss, learning rate, skipped steps "
                   "and intermediate saves, where the map has them): a preview on the node and a saved PNG.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "plot"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss": ("LOSS_MAP", {"tooltip": "From Train LoRA or ComfyUI's own training node."}),
            "filename_prefix": ("STRING", {"default": "loss_graph"}),
        }}

    def plot(self, loss, filename_prefix):
        image = loss_map_chart(loss)
        from PIL import Image

        out_dir, stem = confined(Path(folder_paths.get_output_directory()), filename_prefix, "filename_prefix")
        out_dir.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        path = save_png_new(out_dir, stem, buf.getvalue())
        rel = path.relative_to(Path(folder_paths.get_output_directory()).resolve())
        return {"ui": {"images": [{"filename": rel.name, "subfolder": rel.parent.as_posix().strip("."),
                                   "type": "output"}]}}


def save_png_new(directory: Path, stem: str, data: bytes) -> Path:
    counter = 1
    while True:
        path = directory / f"{stem}_{counter:05}.png"
        try:
            with open(path, "xb") as f:
                f.write(data)
            return path.resolve()
        except FileExistsError:
            counter += 1
