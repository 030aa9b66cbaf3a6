"""Where LoRA files live (ComfyUI's ``loras`` folders) and reading one safely (safetensors only, never pickle)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

import folder_paths

from ..lora.file_format import TEMP_PREFIX, stored_steps
from ..lora.key_formats import holds_adapters
from ..lora.finite import first_non_finite
from .safe_files import read_safetensors

log = logging.getLogger("lora_trainer")
NONE = "[None]"


def lora_choices() -> list[str]:
    # Temporary files of an interrupted save (older versions named them *.safetensors) are never offered.
    return [NONE] + [f for f in folder_paths.get_filename_list("loras")
                     if f.endswith(".safetensors") and not Path(f).name.startswith(TEMP_PREFIX)]


def main_lora_dir() -> Path:
    """The user's main ``loras`` folder: the one loaders list first."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def read_lora(name: str, what: str = "existing_lora") -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"{what}: '{name}' is not in the loras folder")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{what}: '{name}' is not a .safetensors file (other formats can run code when loaded)")
    tensors, metadata = read_safetensors(path, what, name)
    if tensors and not holds_adapters(tensors):
        raise ValueError(f"{what}: '{name}' is not a LoRA file (it holds full model weights, "
                         f"e.g. '{next(iter(tensors))}'); pick a LoRA, or [None] to start a new one")
    if where := first_non_finite(tensors):
        raise ValueError(f"{what}: '{name}' holds NaN or infinite values (in {where}): it cannot be continued; "
                         "pick another LoRA, or [None] to start a new one")
    return tensors, metadata, Path(path)


def previous_steps(name: str, metadata: dict[str, str]) -> int:
    steps = stored_steps(metadata)
    if steps is None:
        log.warning("existing_lora '%s' records no step count in its metadata; counting 0 previous steps", name)
        return 0
    return steps
