"""The Convert LoRA node: a LoRA file of the loras folder, in any naming ComfyUI reads, written again in another naming
(ComfyUI's, kohya's, diffusers'), optionally with a strength baked in."""
from __future__ import annotations

from ..lora.adapter_set import LoraFileError
from ..lora.file_format import META
from ..lora.key_formats import FORMATS, with_strength
from . import lora_files, lora_writer, process_group, save_metadata
from .companions import confined


class ConvertLoRA:
    DESCRIPTION = ("Writes a LoRA file of the loras folder (ComfyUI, kohya, LyCORIS, diffusers/PEFT or ai-toolkit "
                   "naming) again in another naming, for the model it belongs to, optionally with a strength baked "
                   "into its weights. The new file is checked by ComfyUI's own loader before it is kept; the original "
                   "is never changed.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "convert"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the LoRA belongs to (its layers decide the names)."}),
            "lora_name": (lora_files.lora_choices()[1:], {"tooltip": "The LoRA file to convert."}),
            "format": (list(FORMATS), {"default": "kohya", "tooltip": lora_writer.FORMAT_TOOLTIP}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Baked into the weights: loading the new file at 1 acts like loading "
                                              "the original at this strength. OFT and DoRA take 1 only."}),
            "prefix": ("STRING", {"default": "converted/my_lora",
                                  "tooltip": "File name prefix inside the loras folder (may contain subfolders)."}),
        }}

    def convert(self, model, lora_name, format, strength, prefix):
        if not process_group.writes_files():
            return process_group.skipped("the converted LoRA")
        tensors, metadata, _ = lora_files.read_lora(lora_name, "lora_name")
        naming = lora_writer.naming_for(tensors, model, "lora_name")
        try:
            canonical = with_strength(naming.canonical(tensors), strength)
        except LoraFileError as e:
            raise ValueError(f"strength: {e}") from None
        directory, stem = confined(lora_files.main_lora_dir(), prefix, "prefix")
        converted = lora_writer.in_format(canonical, naming, format)
        metadata = {**metadata, f"{META}converted_from": lora_name, f"{META}baked_strength": repr(float(strength))}
        metadata.update(save_metadata.for_file(canonical, fmt=format, output_name=stem, metadata=metadata))
        path = lora_writer.write(converted, directory, stem, metadata)
        name = path.relative_to(lora_files.main_lora_dir()).as_posix()
        return {"ui": {"text": [name]}, "result": (name,)}
