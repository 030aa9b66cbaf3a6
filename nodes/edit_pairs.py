"""Load Edit Pairs: a folder of (target image, reference images, edit instruction) as a data set for edit models (Flux
Kontext, Qwen-Image-Edit, Flux 2): each target's latent, and its caption's conditioning carrying its own references
as ``reference_latents``, the way ComfyUI's ReferenceLatent node adds them. The folder layouts are
training/edit_pairs.py's."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import comfy.utils
import node_helpers
import numpy as np
import torch
from PIL import Image, ImageOps

from ..training.edit_pairs import EditPair, EditPairsError, find_pairs
from .input_folders import folder_changes, folder_input, folder_path

# Qwen-Image-Edit's text encoder (Qwen2.5-VL) reads the references too, the way ComfyUI's text nodes for it show them
# at inference: TextEncodeQwenImageEdit one picture at about 1 megapixel in its tokenizer's own picture template;
# TextEncodeQwenImageEditPlus (Qwen-Image-Edit 2509 and later) every picture at about 384 x 384 pixels, each named in
# the prompt, in an edit template of its own.
OFF, QWEN_EDIT, QWEN_EDIT_PLUS = "off", "Qwen-Image-Edit", "Qwen-Image-Edit Plus"
PROMPT_MODES = (OFF, QWEN_EDIT, QWEN_EDIT_PLUS)
QWEN_EDIT_AREA = 1024 * 1024
QWEN_EDIT_PLUS_AREA = 384 * 384
QWEN_EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def read_image(path: Path, shown: str) -> torch.Tensor:
    """An image file as ComfyUI's IMAGE (1, H, W, 3), floats in [0, 1], turned upright by its EXIF orientation as
    ComfyUI's Load Image does."""
    try:
        image = node_helpers.pillow(Image.open, str(path))
        image = node_helpers.pillow(ImageOps.exif_transpose, image)
        if image.mode == "I":  # 16-bit greyscale
            image = image.point(lambda v: v * (1 / 255))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"folder: {shown} is not an image that can be read ({e})") from None
    return torch.from_numpy(pixels)[None]


def scaled_to_area(images: list[torch.Tensor], area: int) -> list[torch.Tensor]:
    """IMAGEs scaled (area filter, aspect kept) to about ``area`` pixels, as the text encoder is shown them."""
    out = []
    for image in images:
        height, width = image.shape[1:3]
        scale = math.sqrt(area / (width * height))
        scaled = comfy.utils.common_upscale(image.movedim(-1, 1), round(width * scale), round(height * scale),
                                            "area", "disabled")
        out.append(scaled.movedim(1, -1))
    return out


def takes_images(clip) -> bool:
    """Whether the CLIP's tokenizer takes pictures with the text (Qwen-Image's does)."""
    return "images" in inspect.signature(clip.tokenizer.tokenize_with_weights).parameters


def encode_caption(clip, caption: str, references: list[torch.Tensor], mode: str = OFF) -> list:
    """The caption's CONDITIONING; in a Qwen-Image-Edit ``mode`` the text encoder also sees the references."""
    if mode == QWEN_EDIT:
        tokens = clip.tokenize(caption, images=scaled_to_area(references, QWEN_EDIT_AREA))
    elif mode == QWEN_EDIT_PLUS:
        pictures = "".join(QWEN_PICTURE.format(i) for i in range(1, len(references) + 1))
        tokens = clip.tokenize(pictures + caption, images=scaled_to_area(references, QWEN_EDIT_PLUS_AREA),
                               llama_template=QWEN_EDIT_PLUS_TEMPLATE)
    else:
        tokens = clip.tokenize(caption)
    return clip.encode_from_tokens_scheduled(tokens)


def check_prompt_mode(mode: str, clip, pairs: list[EditPair]) -> None:
    if mode == OFF:
        return
    if not takes_images(clip):
        raise ValueError(f"references_in_prompt: this text encoder reads text only ({mode} is for Qwen-Image-Edit's "
                         f"Qwen2.5-VL); set it to '{OFF}' for Flux Kontext and Flux 2")
    several = next((p for p in pairs if len(p.references) > 1), None)
    if mode == QWEN_EDIT and several:
        raise ValueError(f"references_in_prompt: {several.target.name} has {len(several.references)} references; "
                         f"'{QWEN_EDIT}' shows the text encoder one picture, as ComfyUI's TextEncodeQwenImageEdit "
                         f"does: use '{QWEN_EDIT_PLUS}' (Qwen-Image-Edit 2509 and later) for several")


def encode_pair(pair: EditPair, root: Path, vae, clip, mode: str) -> tuple[dict, list]:
    """(the target's LATENT, the caption's CONDITIONING with the references' latents appended to
    ``reference_latents``)."""
    def image(path: Path) -> torch.Tensor:
        return read_image(path, path.relative_to(root).as_posix())

    references = [image(p) for p in pair.references]
    latent = {"samples": vae.encode(image(pair.target))}
    conditioning = encode_caption(clip, pair.caption, references, mode)
    reference_latents = [vae.encode(r) for r in references]
    return latent, node_helpers.conditioning_set_values(conditioning, {"reference_latents": reference_latents},
                                                        append=True)


class LoadEditPairs:
    DESCRIPTION = (
        "Loads an edit data set from a folder of ComfyUI's input folder: each target image with its reference "
        "image(s) beside it (name.png + name_ref.png, name_ref2.png, …) or in control folders (control/name.png, "
        "control2/name.png, …) and its edit instruction in name.txt. Outputs one latent per target and its "
        "instruction's conditioning carrying that target's own references (as ComfyUI's ReferenceLatent node adds "
        "them), for Train LoRA on Flux Kontext, Qwen-Image-Edit or Flux 2.")
    CATEGORY = "LoRA Trainer"
    FUNCTION = "load"
    RETURN_TYPES = ("LATENT", "CONDITIONING", "STRING")
    RETURN_NAMES = ("latents", "positive", "captions")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_TOOLTIPS = ("One latent per target image.",
                       "One conditioning per target: its instruction, with its references as reference_latents.",
                       "The instructions, for Save LoRA's captions input.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": folder_input(),
            "vae": ("VAE", {"tooltip": "Encodes the targets and the references (the edit model's VAE)."}),
            "clip": ("CLIP", {"tooltip": "Encodes the instructions (the edit model's text encoder)."}),
        }, "optional": {
            "references_in_prompt": (list(PROMPT_MODES), {"default": OFF, "tooltip": (
                "Qwen-Image-Edit: its text encoder (Qwen2.5-VL) also sees the references, as ComfyUI's text node for "
                "the model shows them at inference: 'Qwen-Image-Edit' as TextEncodeQwenImageEdit (one reference), "
                "'Qwen-Image-Edit Plus' as TextEncodeQwenImageEditPlus (2509 and later). 'off' for Flux Kontext "
                "and Flux 2, whose text encoders read text only.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, **_):
        return folder_changes(folder)

    def load(self, folder, vae, clip, references_in_prompt=OFF):
        root = folder_path(folder)
        try:
            pairs = find_pairs(root)
        except EditPairsError as e:
            raise ValueError(f"folder: {e}") from None
        check_prompt_mode(references_in_prompt, clip, pairs)
        progress = comfy.utils.ProgressBar(len(pairs))
        latents, conditionings = [], []
        for pair in pairs:
            latent, conditioning = encode_pair(pair, root, vae, clip, references_in_prompt)
            latents.append(latent)
            conditionings.append(conditioning)
            progress.update(1)
        return latents, conditionings, [pair.caption for pair in pairs]
