"""Writing a LoRA file in a chosen naming (ComfyUI's, kohya's, diffusers'), checked by ComfyUI's own loader before it
is written: Save LoRA and Convert LoRA both write through here."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..lora.adapter_set import LoraFileError
from ..lora.file_format import save_new
from ..lora.hub_metadata import sshs_hashes
from ..lora.key_formats import FORMATS, ModelNaming
from . import comfy_bridge

log = logging.getLogger("lora_trainer")
FORMAT_TOOLTIP = ("Key naming of the file. comfyui: ComfyUI's own (diffusion_model.<layer>), for every model. kohya: "
                  "the lora_unet_… names (with alpha) of the family's kohya trainer (sd-scripts: SD 1.5/2.x, SDXL, "
                  "SD3, Flux, Chroma, Lumina 2; musubi-tuner: HunyuanVideo, Wan, Qwen-Image), which A1111/Forge read "
                  "too. diffusers: the module names of the family's diffusers model, plain LoRA only (SD 1.x/2.x, "
                  "SDXL, SD3, Flux). Another choice is refused, naming the formats the family has. Every file is reloaded "
                  "through ComfyUI's loader before it is kept.")


def naming_for(lora: dict[str, torch.Tensor], model, what: str = "model") -> ModelNaming | None:
    """The naming knowledge for ``lora``: from ``model`` when one is connected (it must fit), else what Train LoRA
    attached to its LoRA, else None (a LoRA from elsewhere without a model)."""
    if model is not None:
        try:
            return comfy_bridge.model_naming(model, lora)
        except LoraFileError as e:
            raise ValueError(f"{what}: the LoRA does not fit this {comfy_bridge.base_model_name(model)} model: {e}") from None
    return getattr(lora, "naming", None)


def in_format(lora: dict[str, torch.Tensor], naming: ModelNaming | None, fmt: str) -> dict[str, torch.Tensor]:
    """The LoRA's tensors under ``fmt``'s names, after ComfyUI's loader has read every key of them and patches
    exactly the layers the LoRA adapts (the self-check: a failure is an error, nothing is written)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if naming is None:
        if fmt != "comfyui":
            raise ValueError(f"format: saving as {fmt} needs the model the LoRA belongs to: connect it to 'model'")
        log.warning("Save LoRA: a LoRA from another node, without 'model' connected: saved as it is, unchecked")
        return dict(lora)
    try:
        reference = naming.canonical(lora)
        tensors = naming.convert(lora, fmt)
        aliases = naming.not_canonical(tensors, fmt)
        if aliases:
            raise LoraFileError(f"{len(aliases)} names are not the ones {fmt}'s consumer reads for "
                                f"{naming.family or 'this model'}, e.g. '{aliases[0]}'")
        comfy_bridge.check_loads_as(naming, tensors, reference)
    except LoraFileError as e:
        raise ValueError(f"format: this LoRA cannot be saved as {fmt}: {e}") from None
    return tensors


def write(tensors: dict[str, torch.Tensor], directory: Path, stem: str, metadata: dict[str, str],
          what: str = "lora") -> Path:
    """A new file (never replacing one), written atomically, with kohya's sshs hashes of exactly these tensors;
    ``save_new`` refuses NaN/inf naming ``what``."""
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    return save_new(directory, stem, tensors, {**metadata, "sshs_model_hash": model_hash,
                                               "sshs_legacy_hash": legacy_hash}, what)
