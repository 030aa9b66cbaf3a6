"""Companion nodes: apply a LoRA, plot the loss; and confining a name prefix to a folder."""
from __future__ import annotations

import io
import os
from pathlib import Path


import folder_paths

from ..lora.adapter_set import LoraFileError
from ..lora.file_format import PATH_MAX_BYTES, SUFFIX_BYTES, check_name_parts
from .loss_chart import loss_map_chart
from . import comfy_bridge, lora_files, process_group


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


class ApplyLoRA:
    DESCRIPTION = ("Applies a LoRA to a MODEL at a strength, exactly as ComfyUI's LoRA loaders do: a connected "
                   "LORA_MODEL, or a file of the loras folder in any naming ComfyUI reads (ComfyUI, kohya, LyCORIS, "
                   "diffusers/PEFT, ai-toolkit). A LoRA ComfyUI would apply only in part is an error.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "strength": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }, "optional": {
            "lora": ("LORA_MODEL", {"tooltip": "From Train LoRA or ComfyUI's own nodes (or pick a file instead)."}),
            "lora_name": (lora_files.lora_choices(), {"default": lora_files.NONE,
                                                      "tooltip": "A LoRA file of the loras folder, in any naming "
                                                                 "ComfyUI reads; [None] when 'lora' is connected."}),
        }}

    def apply(self, model, strength, lora=None, lora_name=None):
        named = lora_name not in (None, "", lora_files.NONE)
        if lora is None and not named:
            raise ValueError("lora: connect a LORA_MODEL, or pick a file in lora_name")
        if lora is not None and named:
            raise ValueError(f"lora_name: '{lora_name}' and a connected lora are both given; use one of them")
        what = "lora_name" if named else "lora"
        if named:
            lora = lora_files.read_lora(lora_name, what)[0]
        if strength == 0:
            return (model,)
        try:
            return (comfy_bridge.with_lora(model, lora, strength),)
        except LoraFileError as e:
            raise ValueError(f"{what}: ComfyUI cannot apply all of it to this model: {e}") from None


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
        if not process_group.writes_files():
            return {"ui": {}}
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
