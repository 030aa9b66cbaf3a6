"""The smallest encoders ComfyUI's own loaders accept, for workflows that start from image and caption files.

``VAELoader`` and ``CLIPLoader`` pick an architecture from the keys of a state dict (``comfy.sd.VAE`` and
``comfy.sd.detect_te_model``); these functions write state dicts they detect, seeded so every machine gets the same
files, into ``.cache/dataset_models/`` (git-ignored) once:

- ``taesd16``: the TAESD layout (``taesd_decoder.*``, about 2.4 M parameters, fixed width 64) with 16 latent
  channels, the SD3/Flux latent layout. The KL autoencoder of SD/SDXL fixes its width at 128 (≈ 84 M parameters).
  Random weights map different images to nearly the same latent; its ``vae_scale`` spreads latents ten times wider,
  so that a latent noised with unit noise still shows which image it came from (tests identify images by that).
- ``wan_vae``: the Wan 2.1 video VAE, whose width ComfyUI reads from ``decoder.head.0.gamma``: 5-D latents with
  16 channels, 8× spatial and 4× temporal compression. Its latent projection is scaled up tenfold, as above.
- ``flux_for_clip_l``: a Flux (the class Flux Kontext loads as; it takes reference latents) whose text inputs take
  CLIP-L's output as type ``sd3`` gives it (``family_models.FLUX_FOR_CLIP_L``). ComfyUI 0.3.75 fixes Flux's width at
  3072: one double and one single block, about 0.5 B parameters (a 1 GB file), cached under a name that carries its
  layout, since the width the running ComfyUI accepts decides it.
- ``ace15_vae`` / ``stable_audio_vae``: the Oobleck audio VAE of ACE-Step 1.5 (48 kHz, 1920 samples per latent
  frame; ComfyUI 0.33 tells it from Stable Audio's by its upsampling kernels) and of Stable Audio (44.1 kHz, 2048).
  ComfyUI builds it at a fixed width (169 M parameters, stored bf16: 338 MB) with stereo input and 64 latent
  channels. Random weights give latents of a scale of about a hundred and a wide sampling noise: the encoder's last
  layer is scaled so the latent mean has a scale of about one and the sampling noise is ~1e-4 (nearly deterministic).
- ``clip_l``: CLIP-L. Text encoders load into a fixed configuration (missing weights stay uninitialised), so this is
  full size (123 M parameters, stored fp16, 246 MB): the smallest text encoder of the image families (SD1.5, SDXL,
  SD3 and Flux all use it). ``CLIPLoader`` type ``sd3`` turns it into SD3's conditioning: context (1, 77·k, 4096)
  and a pooled output of 2048.

Needs ComfyUI's ``comfy`` package importable (``harness.put_comfyui_on_path()``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

import family_models
import tiny_models
from tiny_models import _randomise as randomise

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "dataset_models"

CLIP_L_SD3_CONTEXT = 4096  # SD3's text encoder pads CLIP-L's 768 to the T5 width
CLIP_L_SD3_POOLED = 768 + 1280  # CLIP-L's pooled output next to CLIP-G's (zeros when absent)
LATENT_SPREAD = 10.0  # latents this much wider than the random weights give (see above)
WAN_VAE_DIM = 1  # the smallest width the Wan VAE builds at


def taesd16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    model = TAESD(latent_channels=tiny_models.SD3_LATENT_CHANNELS)
    randomise(model, seed)
    with torch.no_grad():  # encode divides by the scale
        model.vae_scale.fill_(1 / LATENT_SPREAD)
        model.vae_shift.fill_(0.0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def wan_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from comfy.ldm.wan.vae import WanVAE

    # The configuration ComfyUI builds for a Wan 2.1 VAE, at the width it reads from the weights.
    model = WanVAE(dim=WAN_VAE_DIM, z_dim=tiny_models.WAN_LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                   attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    randomise(model, seed)
    with torch.no_grad():  # conv1 projects the encoder's features to the latent mean (and log-variance)
        model.conv1.weight.mul_(LATENT_SPREAD)
        model.conv1.bias.mul_(LATENT_SPREAD)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


ACE15_VAE_STRIDES = [2, 4, 4, 6, 10]  # 48 kHz / 1920 = 25 latent frames a second
OOBLECK_MEAN_SCALE = 0.01  # random weights give latent means of a scale of ~100 (see above)


def oobleck_vae_state_dict(seed: int = 0, strides: list[int] | None = None) -> dict[str, torch.Tensor]:
    from comfy.ldm.audio.autoencoder import AudioOobleckVAE

    model = AudioOobleckVAE(**({"strides": strides} if strides else {}))
    randomise(model, seed)
    last = model.encoder.layers[-1]  # the weight-normed conv to (mean, scale) x 64 channels
    with torch.no_grad():
        magnitude = last.parametrizations.weight.original0
        half = magnitude.shape[0] // 2
        magnitude[:half].mul_(OOBLECK_MEAN_SCALE)
        magnitude[half:].zero_()
        last.bias[half:].fill_(-10.0)  # softplus(-10): a sampling std of ~1e-4
    return {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def ace15_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return oobleck_vae_state_dict(seed, ACE15_VAE_STRIDES)


def clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    config = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text())
    model = comfy.clip_model.CLIPTextModel(config, torch.float16, "cpu", comfy.ops.disable_weight_init)
    randomise(model, seed)
    with torch.no_grad():  # identity layer norms: random ones would shrink the text features towards zero
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def sd3_for_clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny SD3 MMDiT that takes what CLIP-L gives through ``CLIPLoader`` type ``sd3``."""
    return tiny_models.tiny_sd3_state_dict(seed, context_dim=CLIP_L_SD3_CONTEXT, pooled_dim=CLIP_L_SD3_POOLED)


BUILDERS = {  # file name: (ComfyUI model folder, state dict)
    "taesd16.safetensors": ("vae", taesd16_state_dict),
    "wan_vae.safetensors": ("vae", wan_vae_state_dict),
    "clip_l.safetensors": ("text_encoders", clip_l_state_dict),
    "ace15_vae.safetensors": ("vae", ace15_vae_state_dict),
    "stable_audio_vae.safetensors": ("vae", oobleck_vae_state_dict),
    "sd3_clip_l.safetensors": ("diffusion_models", sd3_for_clip_l_state_dict),
}


def cached(name: str) -> Path:
    """The generated file ``name`` (one of BUILDERS), written on first use."""
    return tiny_models.write_model(CACHE / name, BUILDERS[name][1])


def install(base_dir: Path, *names: str) -> None:
    """Links cached files into their folders of a ComfyUI base directory (``models/vae/…``; links, as the text
    encoder alone is 246 MB)."""
    for name in names:
        link = Path(base_dir) / "models" / BUILDERS[name][0] / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(cached(name))


def install_flux_for_clip_l(base_dir: Path) -> str:
    """The Flux of ``family_models.FLUX_FOR_CLIP_L`` (written once into the cache) linked into a ComfyUI base
    directory's ``models/diffusion_models``; its name there."""
    family = family_models.FLUX_FOR_CLIP_L
    path = family_models.write(family, family_models.build(family), CACHE)
    link = Path(base_dir) / "models" / "diffusion_models" / path.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(path)
    return path.name
