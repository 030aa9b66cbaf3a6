"""Who reads a LoRA file of each format, per model family, and under which names.

A file in kohya's or diffusers' naming is for another tool. ComfyUI's key maps accept many alias names for one layer,
so "ComfyUI loads it" says nothing about whether that tool does: here each family names the tool that reads each
format and the one name per layer that tool uses.

- **kohya**: the names kohya's own trainer for the family writes, ``lora_unet_<module path with _>``. sd-scripts
  builds SD 1.x/2.x on diffusers' UNet (so the path is diffusers'), SDXL, SD3, Flux, Chroma and Lumina 2 on the
  original layouts, which ComfyUI's models keep; musubi-tuner (HunyuanVideo, Wan, Qwen-Image) too.
- **diffusers**: the module names of the family's diffusers model class (``diffusers_layouts.json``, generated from
  diffusers itself by ``tools/diffusers_layouts.py``; a test regenerates it). Listed are the families whose diffusers
  files a test loads with diffusers' own loader on a twin of the trained model (``tests/test_consumers.py``).

Families are ComfyUI's model classes (``comfy.supported_models``), by exact class name: a subclass (a new variant)
gets no format until a test proves a tool reads it. Pure data and checks; no ComfyUI imports.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .adapter_set import LoraFileError


@dataclass(frozen=True)
class Kohya:
    trainer: str  # the kohya trainer that writes (and reads) these names
    diffusers_paths: bool = False  # SD 1.x/2.x: sd-scripts names layers by diffusers' UNet paths


@dataclass(frozen=True)
class Diffusers:
    model_class: str  # the diffusers model class whose module names the file uses
    pipeline: str  # the pipeline whose load_lora_weights reads it (what the consumer test calls)


SD_SCRIPTS, MUSUBI = "kohya-ss/sd-scripts", "kohya-ss/musubi-tuner"
UNET = Diffusers("UNet2DConditionModel", "StableDiffusionPipeline")

KOHYA: dict[str, Kohya] = {
    "SD15": Kohya(SD_SCRIPTS, diffusers_paths=True), "SD20": Kohya(SD_SCRIPTS, diffusers_paths=True),
    "SDXL": Kohya(SD_SCRIPTS), "SD3": Kohya(SD_SCRIPTS), "Flux": Kohya(SD_SCRIPTS), "FluxSchnell": Kohya(SD_SCRIPTS),
    "Chroma": Kohya(SD_SCRIPTS), "Lumina2": Kohya(SD_SCRIPTS),
    "HunyuanVideo": Kohya(MUSUBI), "WAN21_T2V": Kohya(MUSUBI), "WAN21_I2V": Kohya(MUSUBI),
    "WAN22_T2V": Kohya(MUSUBI), "QwenImage": Kohya(MUSUBI),
}
DIFFUSERS: dict[str, Diffusers] = {
    "SD15": UNET, "SD20": UNET, "SDXL": Diffusers("UNet2DConditionModel", "StableDiffusionXLPipeline"),
    "SD3": Diffusers("SD3Transformer2DModel", "StableDiffusion3Pipeline"),
    "Flux": Diffusers("FluxTransformer2DModel", "FluxPipeline"),
    "FluxSchnell": Diffusers("FluxTransformer2DModel", "FluxPipeline"),
}
LAYOUTS_FILE = Path(__file__).with_name("diffusers_layouts.json")
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def formats_for(family: str) -> list[str]:
    """The formats a LoRA of ``family`` can be saved in: ComfyUI's always, kohya and diffusers where a tool reads them."""
    return ["comfyui"] + [fmt for fmt, table in (("kohya", KOHYA), ("diffusers", DIFFUSERS)) if family in table]


def require_format(family: str, fmt: str) -> None:
    """A clear error when no tool reads ``fmt`` files of ``family``."""
    if fmt != "comfyui" and fmt not in formats_for(family):
        raise LoraFileError(f"no tool reads {fmt} LoRA files of {family + ' models' if family else 'this model'} "
                            f"(none this pack knows and tests); this family saves as: "
                            f"{', '.join(formats_for(family))}")


def pattern(module_path: str) -> str:
    """A module path with its block indices as ``#`` (``transformer_blocks.3.attn.to_q`` ->
    ``transformer_blocks.#.attn.to_q``): the layouts hold these, so one list covers every depth."""
    return _INDEX.sub("#", module_path)


@lru_cache(maxsize=None)
def diffusers_layout(model_class: str) -> frozenset[str]:
    layouts = json.loads(LAYOUTS_FILE.read_text())
    if model_class not in layouts:
        raise LoraFileError(f"no module layout of diffusers' {model_class} (regenerate {LAYOUTS_FILE.name})")
    return frozenset(layouts[model_class])


def diffusers_module(name: str) -> str:
    """The diffusers module a diffusers-format name adapts: without its ``unet.``/``transformer.`` prefix, and with
    the attention-processor spelling diffusers' UNet files use (``attn1.processor.to_q``, ``.processor.to_out``) as
    the module it stands for (``attn1.to_q``, ``to_out.0``)."""
    module = name.split(".", 1)[1] if name.startswith(("unet.", "transformer.")) else name
    if ".processor.to_out" in module and not module.endswith(".0"):
        module = module + ".0"
    return module.replace(".processor.to_", ".to_")


def is_diffusers_name(family: str, name: str) -> bool:
    """Whether ``name`` (a diffusers-format module name) is a module of the family's diffusers model."""
    return family in DIFFUSERS and pattern(diffusers_module(name)) in diffusers_layout(DIFFUSERS[family].model_class)


def kohya_name(family: str, layer: str, diffusers_path: str | None) -> str | None:
    """The name kohya's trainer for ``family`` gives a layer (``layer``: ComfyUI's path inside the diffusion model;
    ``diffusers_path``: the layer's diffusers UNet path where ComfyUI knows it), or None where it has none."""
    rule = KOHYA.get(family)
    if rule is None:
        return None
    path = diffusers_path if rule.diffusers_paths else layer
    return None if path is None else "lora_unet_" + path.replace(".", "_")


def not_canonical(family: str, fmt: str, names: Iterable[str], expected: Iterable[str] = ()) -> list[str]:
    """The names of a file about to be written that are not the consumer's own: for diffusers, names that are no
    module of the family's diffusers model; for kohya, names other than ``expected`` (kohya's, from ``kohya_name``)."""
    if fmt == "diffusers":
        return sorted(n for n in names if not is_diffusers_name(family, n))
    if fmt == "kohya":
        return sorted(set(names) - set(expected))
    return []
