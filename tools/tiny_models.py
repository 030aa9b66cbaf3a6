"""Tiny but real ComfyUI diffusion models and training data, built from a seeded generator.

Nothing here is downloaded: every weight comes from ``torch.Generator().manual_seed(seed)``, so the files are
identical on every machine. Needs ComfyUI's ``comfy`` package importable (the caller puts ComfyUI on sys.path).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

SD3_LATENT_CHANNELS = 16
SD3_CONTEXT_DIM = 64
SD3_POOLED_DIM = 64
SD15_LATENT_CHANNELS = 4
SD15_CONTEXT_DIM = 64


def seeded_tensor(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Fan-in scaled normals for weights (2-D and up), small normals for 1-D tensors (biases, norms)."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return torch.randn(shape, generator=gen) * 0.02


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Fills every floating-point parameter and buffer with ``seeded_tensor`` values, in key order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.state_dict(keep_vars=True).items(), key=lambda kv: kv[0]):
            if p.is_floating_point():
                p.copy_(seeded_tensor(tuple(p.shape), gen).to(p.dtype))


def tiny_sd3_state_dict(seed: int = 0, depth: int = 2, context_dim: int = SD3_CONTEXT_DIM,
                        pooled_dim: int = SD3_POOLED_DIM) -> dict[str, torch.Tensor]:
    """A plain MMDiT state dict that ComfyUI's standard loader detects as SD3 (flow matching); detection reads the
    context and pooled widths from the weights, so they can match a real text encoder's output."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * depth  # MMDiT derives width and head count from depth
    model = MMDiT(
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        depth=depth,
        adm_in_channels=pooled_dim,
        context_embedder_config={
            "target": "torch.nn.Linear",
            "params": {"in_features": context_dim, "out_features": hidden},
        },
        pos_embed_max_size=32,
        num_patches=32 * 32,
        qkv_bias=True,
        operations=comfy.ops.disable_weight_init,
    )
    _randomise(model, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_tiny_sd3(path: Path, seed: int = 0, depth: int = 2) -> Path:
    return write_model(path, lambda s: tiny_sd3_state_dict(s, depth), seed)


WAN_LATENT_CHANNELS = 16
WAN_TEXT_DIM = 4096  # fixed by ComfyUI's Wan 2.1 detection


def tiny_wan_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-block Wan 2.1 text-to-video DiT (5-D latents, flow matching), detected by the standard loader."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", in_dim=WAN_LATENT_CHANNELS, dim=128, ffn_dim=256, text_dim=WAN_TEXT_DIM,
                     out_dim=WAN_LATENT_CHANNELS, num_heads=1, num_layers=1, operations=comfy.ops.disable_weight_init)
    _randomise(model, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_model(path: Path, state_dict_fn, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """Saves ``state_dict_fn(seed)`` at ``path`` once (e.g. where "Load Diffusion Model" finds it), with the file's
    safetensors ``metadata``. Atomic and safe when several processes (pytest-xdist workers) fill the same cache at
    once: each writes its own temporary file and the last rename wins with the same bytes."""
    import os

    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        safetensors.torch.save_file(state_dict_fn(seed), str(tmp), metadata=metadata)
        tmp.replace(path)
    return path


def tiny_sd15_unet_config() -> dict:
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "out_channels": SD15_LATENT_CHANNELS,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": SD15_LATENT_CHANNELS,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": SD15_CONTEXT_DIM,
        "num_heads": 4,
        "num_head_channels": -1,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def tiny_sd15_patcher(seed: int = 0, disable_dynamic: bool = False, dtype: torch.dtype = torch.float32):
    """An SD1.5-architecture UNet (conv + attention, ε-prediction) wrapped in a ComfyUI ModelPatcher."""
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(tiny_sd15_unet_config())
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    _randomise(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    patcher = comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    # Newer ComfyUI refuses to clone patchers that no loader made unless they say how to rebuild themselves.
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (tiny_sd15_patcher, (seed, False, dtype))
    return patcher


def smooth_latents(count: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Latents with spatial structure (sums of low-frequency waves), so a LoRA has something learnable."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(1, 1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, 1, width)
    out = torch.zeros(count, channels, height, width)
    for _ in range(3):
        fy = torch.randint(1, 4, (count, channels, 1, 1), generator=gen).float()
        fx = torch.randint(1, 4, (count, channels, 1, 1), generator=gen).float()
        phase = torch.rand(count, channels, 1, 1, generator=gen) * 2 * math.pi
        amp = torch.rand(count, channels, 1, 1, generator=gen)
        out += amp * torch.sin(2 * math.pi * (fy * ys + fx * xs) + phase)
    return out


def caption_embeddings(count: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, tokens, dim, generator=gen)
