"""Tiny ComfyUI models and their diffusers twins: the consumer side of the file-format tests (test-only; needs the
pinned diffusers + peft of tools/requirements-dev.txt and ComfyUI importable).

A twin is a small model ComfyUI detects as a real family (built by ComfyUI's own classes, as in family_models.py),
mapped onto the diffusers model class of that family by **diffusers' own single-file converter** — so the two share
every weight, and the same inputs give the same output (``outputs``). A LoRA file is then loaded into the twin by the
family's diffusers pipeline (``pipeline.load_lora_weights``), which is what a diffusers user does with our files.
"""
from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import family_models as fm
import tiny_models

Inputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Twin:
    name: str  # the test id; also the family_models family whose data (FamilyData) trains it
    family: fm.Family  # the tiny ComfyUI model: a layout diffusers' converter reads (it needs a middle block, ...)
    model_class: str  # the diffusers model class
    pipeline: str  # the diffusers pipeline whose load_lora_weights a user calls
    component: str  # the pipeline's attribute that holds the model: "unet" or "transformer"
    config: dict[str, Any]  # the diffusers model's config (the same layout as ``family``)
    converter: str  # diffusers.loaders.single_file_utils function: LDM/original checkpoint -> diffusers state dict
    inputs: Callable[[torch.Generator], Inputs]  # seeded inputs, in the ComfyUI forward's terms
    comfy_forward: Callable[[Any, Inputs], torch.Tensor]
    diffusers_forward: Callable[[Any, Inputs], torch.Tensor]  # the same output, in the same layout
    original_key: Callable[[str], str] = lambda key: key  # ComfyUI's weight name -> the original checkpoint's


# -- SD 1.5 and SDXL: ComfyUI's UNetModel vs UNet2DConditionModel -------------------------------------------------------
def _unet_inputs(context: int, adm: int = 0) -> Callable[[torch.Generator], Inputs]:
    def inputs(gen: torch.Generator) -> Inputs:
        out = {"x": torch.randn(1, 4, 8, 8, generator=gen), "t": torch.tensor([500.0]),
               "context": torch.randn(1, 4, context, generator=gen)}
        if adm:  # SDXL: the pooled caption and the size/crop numbers diffusers embeds into ComfyUI's ``y``
            out["text_embeds"] = torch.randn(1, 1280, generator=gen)
            out["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        return out
    return inputs


def _sdxl_y(model, inputs: Inputs) -> torch.Tensor:
    """ComfyUI's ``y`` for SDXL as diffusers builds it inside its UNet (so both see the same vector)."""
    times = model.add_time_proj(inputs["time_ids"].flatten()).reshape(1, -1)
    return torch.cat([inputs["text_embeds"], times], dim=-1)


def _unet_comfy(twin_model):
    def forward(model, inputs: Inputs) -> torch.Tensor:
        extra = {"y": _sdxl_y(twin_model, inputs)} if "time_ids" in inputs else {}
        return model(inputs["x"], inputs["t"], context=inputs["context"], **extra)
    return forward


def _unet_diffusers(model, inputs: Inputs) -> torch.Tensor:
    added = ({"added_cond_kwargs": {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}}
             if "time_ids" in inputs else {})
    return model(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], **added).sample


# -- SD3: MMDiT vs SD3Transformer2DModel; Flux: ComfyUI's Flux vs FluxTransformer2DModel --------------------------------
def _dit_inputs(channels: int, context: int, pooled: int, t: float, guidance: float | None = None):
    def inputs(gen: torch.Generator) -> Inputs:
        out = {"x": torch.randn(1, channels, 8, 8, generator=gen), "t": torch.tensor([t]),
               "context": torch.randn(1, 4, context, generator=gen), "y": torch.randn(1, pooled, generator=gen)}
        if guidance is not None:
            out["guidance"] = torch.tensor([guidance])
        return out
    return inputs


def _sd3_comfy(model, inputs: Inputs) -> torch.Tensor:
    return model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"])


def _sd3_diffusers(model, inputs: Inputs) -> torch.Tensor:
    return model(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
                 timestep=inputs["t"]).sample


def _packed(x: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patches as tokens (B, H/2 * W/2, C*4), as diffusers' Flux pipeline packs latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _flux_original(key: str) -> str:
    """Newer ComfyUI renames Flux's q/k norms' ``scale`` to ``weight`` when it loads a file; checkpoints (and
    diffusers' converter) have ``scale``."""
    return key[: -len(".weight")] + ".scale" if key.endswith("_norm.weight") else key


def _flux_comfy(model, inputs: Inputs) -> torch.Tensor:
    out = model(inputs["x"], inputs["t"], context=inputs["context"], y=inputs["y"], guidance=inputs["guidance"])
    return _packed(out)


def _flux_diffusers(model, inputs: Inputs) -> torch.Tensor:
    _, _, h, w = inputs["x"].shape
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    text_ids = torch.zeros(inputs["context"].shape[1], 3)
    return model(hidden_states=_packed(inputs["x"]), encoder_hidden_states=inputs["context"],
                 pooled_projections=inputs["y"], timestep=inputs["t"], img_ids=image_ids, txt_ids=text_ids,
                 guidance=inputs["guidance"]).sample


# -- the twins -----------------------------------------------------------------------------------------------------------
SD15_CONFIG = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "down_block_types": ("CrossAttnDownBlock2D",),
               "up_block_types": ("CrossAttnUpBlock2D",), "block_out_channels": (320,), "layers_per_block": 1,
               "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32}
SD2_CONFIG = {**SD15_CONFIG, "cross_attention_dim": 1024, "attention_head_dim": (5,), "use_linear_projection": True}
SDXL_CONFIG = {"sample_size": 8, "in_channels": 4, "out_channels": 4,
               "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               "block_out_channels": (320, 320, 320), "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10),
               "attention_head_dim": (5, 5, 5), "cross_attention_dim": 2048, "use_linear_projection": True,
               "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
               "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32}
SD3_CONFIG = {"sample_size": 8, "patch_size": 2, "in_channels": 16, "num_layers": 1, "attention_head_dim": 64,
              "num_attention_heads": 1, "joint_attention_dim": 64, "caption_projection_dim": 64,
              "pooled_projection_dim": 64, "out_channels": 16, "pos_embed_max_size": 16}
FLUX_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
               "num_attention_heads": 24, "joint_attention_dim": 64, "pooled_projection_dim": 64,
               "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}

TWINS: tuple[Twin, ...] = (
    Twin("sd15", fm.Family("sd15_twin", "SD15", fm._unet(context_dim=768, num_heads=8, transformer_depth_middle=1,
                                                         transformer_depth_output=[1, 1]), (320,), (4, 8, 8), 768),
         "UNet2DConditionModel", "StableDiffusionPipeline", "unet", SD15_CONFIG, "convert_ldm_unet_checkpoint",
         _unet_inputs(768), None, _unet_diffusers),
    Twin("sd2", fm.Family("sd2_twin", "SD20", fm._unet(**fm.SD2_UNET, transformer_depth_middle=1,
                                                       transformer_depth_output=[1, 1]), (320,), (4, 8, 8), 1024),
         "UNet2DConditionModel", "StableDiffusionPipeline", "unet", SD2_CONFIG, "convert_ldm_unet_checkpoint",
         _unet_inputs(1024), None, _unet_diffusers),
    Twin("sdxl", fm.Family("sdxl_twin", "SDXL", fm._unet(**fm.SDXL_UNET, transformer_depth=[0, 0, 2, 2, 10, 10],
                                                         transformer_depth_middle=10,
                                                         transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
                           (320,), (4, 8, 8), 2048, pooled=1280),
         "UNet2DConditionModel", "StableDiffusionXLPipeline", "unet", SDXL_CONFIG, "convert_ldm_unet_checkpoint",
         _unet_inputs(2048, adm=2816), None, _unet_diffusers),
    Twin("sd3", fm.BY_NAME["sd3"], "SD3Transformer2DModel", "StableDiffusion3Pipeline", "transformer", SD3_CONFIG,
         "convert_sd3_transformer_checkpoint_to_diffusers", _dit_inputs(16, 64, 64, 500.0), _sd3_comfy, _sd3_diffusers),
    # diffusers' Flux converter fixes the width at 3072 (Flux.1's), so the twin is Flux.1's width at depth 1 + 1
    Twin("flux_dev", fm.Family("flux_twin", "Flux", fm._flux(), (3072,), (16, 8, 8), 64, pooled=64,
                               extras={"guidance": 3.5}),
         "FluxTransformer2DModel", "FluxPipeline", "transformer", FLUX_CONFIG,
         "convert_flux_transformer_checkpoint_to_diffusers", _dit_inputs(16, 64, 64, 0.5, 3.5), _flux_comfy,
         _flux_diffusers, _flux_original),
)
BY_NAME = {t.name: t for t in TWINS}


# -- building both sides ---------------------------------------------------------------------------------------------------
def comfy_state_dict(twin: Twin, seed: int = 0) -> dict[str, torch.Tensor]:
    """The twin's ComfyUI weights (fp32, seeded; the file ``write`` stores holds the same values in bf16)."""
    built = fm.build(twin.family)
    gen = torch.Generator().manual_seed(seed)
    return {k: tiny_models.seeded_tensor(built.shapes[k], gen).to(torch.bfloat16).float() for k in sorted(built.shapes)}


def write(twin: Twin, directory: Path, seed: int = 0) -> Path:
    """The twin's model file for ComfyUI's UNETLoader (cached by layout, as family_models.write)."""
    return fm.write(twin.family, fm.build(twin.family), directory, seed)


def comfy_model(path: Path):
    """The file as ComfyUI loads it (its own detection and classes), in fp32: the diffusion model module."""
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(path)),
                                                       model_options={"dtype": torch.float32})
    return patcher


def diffusers_model(twin: Twin, state: dict[str, torch.Tensor]):
    """The diffusers twin: diffusers' own converter applied to the ComfyUI weights, loaded strictly (every weight
    of the diffusers model comes from the ComfyUI model and none is left over)."""
    import diffusers
    from diffusers.loaders import single_file_utils

    converter = getattr(single_file_utils, twin.converter)
    checkpoint = {"model.diffusion_model." + twin.original_key(k): v.clone() for k, v in state.items()}
    kwargs = {"config": dict(twin.config)} if "config" in inspect.signature(converter).parameters else {}
    converted = converter(checkpoint, **kwargs)
    model = getattr(diffusers, twin.model_class)(**twin.config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def pipeline(twin: Twin, model):
    """The family's diffusers pipeline holding only the model (its other components None): what a user's
    ``pipe.load_lora_weights(file)`` runs, on our twin."""
    import diffusers

    cls = getattr(diffusers, twin.pipeline)
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return cls(**{name: (model if name == twin.component else None) for name in names})


def comfy_output(twin: Twin, patcher, inputs: Inputs, diffusers_twin=None) -> torch.Tensor:
    forward = twin.comfy_forward or _unet_comfy(diffusers_twin)
    with torch.no_grad():
        return forward(patcher.model.diffusion_model, inputs)


def diffusers_output(twin: Twin, model, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return twin.diffusers_forward(model, inputs)


class Complaints(logging.Handler):
    """Warnings diffusers, peft and transformers log or warn while loading a LoRA: dropped, unexpected or
    unmatched keys are reported this way, never raised."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self._loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
        self._caught = None

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "Complaints":
        for log in self._loggers:
            log.addHandler(self)
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self._caught.__exit__(*exc)
        self.messages += [str(w.message) for w in self._records]
        for log in self._loggers:
            log.removeHandler(self)


def lora_layers(model) -> list[str]:
    """The modules of ``model`` that peft gave a LoRA (after load_lora_weights)."""
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A))
