"""One small model per family ComfyUI's "Load Diffusion Model" (UNETLoader) detects, with matching training data.

Each family names the few state-dict keys ComfyUI's ``comfy/model_detection.py`` reads, at a width; ComfyUI itself
then builds the model that detection implies (weights on the ``meta`` device: nothing is allocated), and that model's
state dict is the file. So the file is whatever the running ComfyUI version builds and loads back, and ``build``
checks that the full state dict is detected the same way again. The smallest candidate width the running version
accepts is used (0.33 reads Flux's head count from the width, 0.3.75 fixes it at 24 x 128); families whose width
detection fixes use depth 1. Weights come from a seeded ``torch.Generator`` (``tiny_models.seeded_tensor``), so files
are identical on every machine, stored in bf16 (detection reads shapes only; ComfyUI picks its own compute dtype).
Building needs ComfyUI's ``comfy`` package importable; the data builders (latents, conditioning) need torch only.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import tiny_models

Shapes = dict[str, tuple[int, ...]]
TOKENS = 4  # caption length: a short caption keeps text-side compute negligible


@dataclass(frozen=True)
class Family:
    name: str  # the test id
    detected_as: str  # the class in comfy.supported_models that detection must pick
    probe: Callable[[int], Shapes]  # width -> the keys detection reads (ComfyUI's builder adds the rest)
    widths: tuple[int, ...]  # candidate widths, smallest first
    latent: tuple[int, ...]  # one latent: (C, H, W), (C, T, H, W) or, 1-D, (C, N)
    context: int  # caption embedding width (cross_attn)
    pooled: int | None = None  # pooled_output width; None where the family has none
    extras: dict[str, Any] = field(default_factory=dict)  # other conditioning keys; callables get the generator
    tokens: int = TOKENS  # caption length (a few families fix it)
    attention_mask: bool = False  # an integer attention_mask over the caption tokens
    concat: int = 0  # channels of a start-image latent (+ mask), as image-to-video conditioning nodes add
    # The transformer settings detection reads from the file's "config" metadata (as real LTX-2 files carry them):
    # they size what detection fixes otherwise (LTX-2's 3840-wide caption connectors, its 2048-wide audio stream).
    config: dict[str, Any] = field(default_factory=dict)
    audio: tuple[int, ...] | None = None  # one audio latent (C, T, F) of an audio+video family (its second stream)
    # the file's safetensors metadata: detection reads a variant its keys do not tell apart from a "config" entry
    metadata: dict[str, str] = field(default_factory=dict)
    # weights the file holds beside the diffusion model's, which ComfyUI's loader reads from the same file (Stable
    # Audio's seconds embedders); they load into the model's own modules, not the diffusion model
    outside: Shapes = field(default_factory=dict)


# -- probes: the keys each branch of comfy/model_detection.py reads ----------------------------------------------
def _count(prefix: str, count: int = 1) -> Shapes:
    """Keys that make detection's ``count_blocks`` see ``count`` blocks (the builder replaces them with real ones)."""
    return {f"{prefix}{i}.x": (1,) for i in range(count)}


def _unet(**config: Any) -> Callable[[int], Shapes]:
    """UNet families: ComfyUI's own UNetModel at a layout (detection derives everything from its keys). One level,
    one res block, no middle block and no output transformers unless the family's detection asks for more: detection
    matches on width, context, adm and input transformer depths only."""
    def probe(width: int) -> Shapes:
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        base = {"image_size": 32, "in_channels": 4, "out_channels": 4, "use_spatial_transformer": True,
                "legacy": False, "model_channels": width, "num_res_blocks": [1], "channel_mult": [1],
                "transformer_depth": [1], "transformer_depth_middle": -2}
        base.update(config)
        base.setdefault("transformer_depth_output", [0] * (sum(base["num_res_blocks"]) + len(base["channel_mult"])))
        with torch.device("meta"):
            model = UNetModel(**base, operations=comfy.ops.disable_weight_init)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return probe


SDXL_UNET = {"context_dim": 2048, "use_linear_in_transformer": True, "num_head_channels": 64, "adm_in_channels": 2816,
             "num_classes": "sequential", "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1]}
SD2_UNET = {"context_dim": 1024, "use_linear_in_transformer": True, "num_head_channels": 64}


def _mmdit(*extra: str) -> Callable[[int], Shapes]:
    """SD3 / SD3.5: MMDiT derives depth (and heads) from the width, 64 per block."""
    def probe(width: int) -> Shapes:
        return {"x_embedder.proj.weight": (width, 16, 2, 2), "joint_blocks.0.context_block.attn.qkv.weight": (1,),
                "y_embedder.mlp.0.weight": (width, 64), "context_embedder.weight": (width, 64),
                "pos_embed": (1, 16 * 16, width), "final_layer.linear.weight": (64, width), **{k: (1,) for k in extra}}
    return probe


def _flux(*, channels: int = 16, guidance: bool = True, pooled: bool = True, marker: str = "", context: int = 64,
          pooled_width: int = 64) -> Callable[[int], Shapes]:
    """Flux-style double/single-stream DiTs, depth 1 + 1 (``marker`` adds the key of a variant: Chroma, Flux 2).
    ``context`` and ``pooled_width``: the text encoder's output widths the model takes (3584 for LongCat-Image)."""
    patch = 1 if marker.startswith("double_stream") else 2
    def probe(width: int) -> Shapes:
        shapes = {"img_in.weight": (width, channels * patch * patch), "txt_in.weight": (width, context),
                  "double_blocks.0.img_attn.norm.key_norm.scale": (1,), **_count("single_blocks.")}
        if pooled:
            shapes["vector_in.in_layer.weight"] = (width, pooled_width)
        if guidance:
            shapes["guidance_in.in_layer.weight"] = (width, 256)
        if marker:
            shapes[marker] = (1,)
        return shapes
    return probe


def _hunyuan_video(channels: int = 16, out: int = 16, patch: tuple[int, ...] = (1, 2, 2), vector: bool = True,
                   **extra: tuple[int, ...]) -> Callable[[int], Shapes]:
    """HunyuanVideo and its relatives: heads = width / 128; a 2-D patch makes an image model (HunyuanImage 2.1)."""
    def probe(width: int) -> Shapes:
        shapes = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (1,),
                  "img_in.proj.weight": (width, channels, *patch), "final_layer.linear.weight": (out * math.prod(patch), width),
                  "txt_in.input_embedder.weight": (width, 64), "guidance_in.in_layer.weight": (width, 256),
                  **_count("double_blocks."), **_count("single_blocks."), **extra}
        if vector:
            shapes["vector_in.in_layer.weight"] = (width, 768)
        return shapes
    return probe


def _wan(in_dim: int = 16, out_dim: int = 16, **extra: tuple[int, ...]) -> Callable[[int], Shapes]:
    """Wan: heads = width / 128; the feed-forward width is free (kept at 32)."""
    def probe(width: int) -> Shapes:
        return {"head.modulation": (1, 2, width), "head.head.weight": (out_dim * 4, width),
                "blocks.0.ffn.0.weight": (32, width), "patch_embedding.weight": (width, in_dim, 1, 2, 2), **extra}
    return probe


def _lumina(*extra: str) -> Callable[[int], Shapes]:
    """Lumina 2 / Z-Image (0.33 also wants a refiner key to tell them from other ``cap_embedder`` models)."""
    return lambda width: {"cap_embedder.1.weight": (width, 64), "noise_refiner.0.attention.k_norm.weight": (1,),
                          **_count("layers."), **{k: (1, width) for k in extra}}


COSMOS1 = "blocks.block0.blocks.0.block.attn.to_q.0.weight"  # Cosmos 1.0: 36 blocks at any width but 4096 (28)
COSMOS2 = "blocks.0.mlp.layer1.weight"  # Cosmos Predict 2: 10 blocks at any width but 2048 / 5120


def _cosmos(marker: str, channels: int = 16, *extra: str) -> Callable[[int], Shapes]:
    """Cosmos: the patch embedder takes the latent channels plus a padding-mask channel, 2x2 patches."""
    return lambda width: {marker: (width, width), "x_embedder.proj.1.weight": (width, (channels + 1) * 4),
                          **{k: (1,) for k in extra}}


# Anima: a Cosmos Predict 2 DiT plus an LLM adapter (fixed: 6 layers at 1024, a 32128-token embedding) that maps
# Qwen3 caption states and T5 token ids to the DiT's 1024-wide context.
ANIMA_ADAPTER = "llm_adapter.blocks.0.cross_attn.q_proj.weight"
ANIMA_TEXT: dict[str, Any] = {"extras": {
    "t5xxl_ids": lambda gen: torch.randint(0, 32128, (TOKENS,), generator=gen),
    "t5xxl_weights": lambda gen: torch.ones(TOKENS)}}


def _joyimage(width: int) -> Shapes:
    """JoyImage: heads of 128 (its rope splits 16 + 56 + 56), a 3-D patch embedder, Flux-like double blocks."""
    return {"double_blocks.0.attn.img_attn_qkv.weight": (1,), "double_blocks.0.attn.img_attn_q_norm.weight": (128,),
            "condition_embedder.time_embedder.linear_1.weight": (1,), "img_in.weight": (width, 16, 1, 2, 2)}


def _ace_step15(width: int) -> Shapes:
    """ACE-Step 1.5: heads of 128 with 8 key/value heads fixed, so 8 query heads (1024) at any width. The condition
    encoder's width must be its audio tokenizer's fixed FSQ width (2048); the lyric (8 layers), timbre (4),
    tokenizer (2) and detokenizer (2) stacks are fixed too. Only the diffusion decoder takes ``width``."""
    encoder = 2048
    return {"encoder.lyric_encoder.layers.0.input_layernorm.weight": (encoder,),
            "encoder.lyric_encoder.layers.0.self_attn.q_proj.weight": (1024, encoder),
            "encoder.lyric_encoder.layers.0.mlp.gate_proj.weight": (32, encoder),
            "decoder.layers.0.self_attn_norm.weight": (width,), "decoder.layers.0.mlp.gate_proj.weight": (2 * width, width),
            "decoder.layers.0.self_attn.q_proj.weight": (1024, width)}


SVD_UNET = {**SD2_UNET, "in_channels": 8, "num_classes": "sequential", "num_res_blocks": [2] * 4, "channel_mult": [1] * 4,
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "use_temporal_resblock": True, "use_temporal_attention": True,
            "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
            "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "disable_temporal_crossattention": False}
HYDIT_TEXT: dict[str, Any] = {"tokens": 77, "attention_mask": True, "extras": {
    "conditioning_mt5xl": lambda gen: torch.randn(1, 256, 2048, generator=gen),
    "attention_mask_mt5xl": lambda gen: torch.ones(1, 256, dtype=torch.int64)}}


def _hunyuan_dit(extra_embedder_in: int) -> Callable[[int], Shapes]:
    """HunyuanDiT (16 heads, any width): 3968 extra-embedder inputs make it v1.0/1.1 (size and style conditions),
    any other number v1.2."""
    return lambda width: {"mlp_t5.0.weight": (1,), **_count("blocks."), "x_embedder.proj.weight": (width, 4, 2, 2),
                          "extra_embedder.0.weight": (1, extra_embedder_in)}


def _hunyuan3d(depth: int = 1) -> Callable[[int], Shapes]:
    return lambda width: {"latent_in.weight": (width, 64), "cond_in.weight": (width, 64),
                          **_count("double_blocks.", depth), **_count("single_blocks.")}


def _pixart(max_caption: int, *extra: str) -> Callable[[int], Shapes]:
    return lambda width: {"t_block.1.weight": (width * 6, width), **_count("blocks."),
                          "y_embedder.y_embedding": (max_caption, 4096), **{k: (1,) for k in extra}}


def _kandinsky5(visual_inputs: int) -> Callable[[int], Shapes]:
    """Kandinsky 5: one text and one visual block; ``visual_inputs`` = latent (+ concat) channels x 2 x 2."""
    return lambda width: {"visual_transformer_blocks.0.cross_attention.key_norm.weight": (1,),
                          "visual_embeddings.in_layer.bias": (width,), "visual_embeddings.in_layer.weight":
                          (width, visual_inputs), "time_embeddings.in_layer.bias": (64,),
                          "visual_transformer_blocks.0.feed_forward.in_layer.weight": (64, width),
                          **_count("text_transformer_blocks.")}


def _cogvideox(channels: int) -> Callable[[int], Shapes]:
    """CogVideoX 1.0: heads of 64 (width / 64), one block, 2-D patches, rotary positions."""
    return lambda width: {"blocks.0.norm1.linear.weight": (6 * width, 64), "patch_embed.proj.weight":
                          (width, channels, 2, 2), "patch_embed.text_proj.weight": (width, 4096)}


def _stable_audio(io: int, global_cond: int, heads: int | None, local_add: int = 0,
                  shared: bool = False) -> Callable[[int], Shapes]:
    """Stable Audio's 1-D DiT (one layer) over ``io``-channel latents, 768-wide captions projected to the width.
    ``heads``: rms-normed heads of this size (Stable Audio 3), else 24 layer-normed heads with learned timestep
    features (Stable Audio Open); ``local_add``: channels of a local additive condition; ``shared``: one adaLN
    embedder for all layers."""
    def probe(width: int) -> Shapes:
        shapes = {"transformer.rotary_pos_emb.inv_freq": (1,), "to_global_embed.0.weight": (width, global_cond),
                  "to_cond_embed.0.weight": (width, 768), "to_timestep_embed.0.weight": (width, 256),
                  "transformer.layers.0.self_attn.to_qkv.weight": (3 * width, width),
                  "postprocess_conv.weight": (io, io, 1), "transformer.project_in.weight": (width, io)}
        if heads:
            shapes["transformer.layers.0.self_attn.q_norm.gamma"] = (heads,)
        else:
            shapes["timestep_features.weight"] = (128, 1)
        if local_add:
            shapes["transformer.layers.0.to_local_embed.0.weight"] = (width, local_add)
        if shared:
            shapes["transformer.global_cond_embedder.0.weight"] = (width, width)
        return shapes
    return probe


def _seconds_embedder(name: str, learned: bool) -> Shapes:
    """A Stable Audio seconds embedder's weights (768 wide; learned or fixed Fourier features), in the checkpoint's
    ``conditioner`` section, which ComfyUI's Stable Audio builders read from the diffusion model's file."""
    prefix = f"conditioner.conditioners.{name}.embedder.embedding."
    features = {f"{prefix}0.weights": (128,)} if learned else {}
    return {**features, f"{prefix}1.weight": (768, 256 + learned), f"{prefix}1.bias": (768,)}


def _randn(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    """A conditioning extra: a seeded tensor of this shape (e.g. a latent a conditioning node encodes)."""
    return lambda gen: torch.randn(*shape, generator=gen)


def _mask(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    """A conditioning extra: a seeded binary mask of this shape."""
    return lambda gen: (torch.rand(*shape, generator=gen) > 0.5).float()


def _wan_config(**transformer: Any) -> dict[str, str]:
    """File metadata that makes ComfyUI's Wan detection pick a variant (its ``config`` entry's ``transformer``)."""
    return {"config": json.dumps({"transformer": transformer})}


# WanSCAILToVideo's conditioning for a 2-frame 8 x 8 latent: one reference latent, a half-size pose video latent.
SCAIL: dict[str, Any] = {"reference_latents": lambda gen: [torch.randn(1, 16, 1, 8, 8, generator=gen)],
                         "pose_video_latent": _randn(1, 16, 2, 4, 4), "ref_mask_flag": True}


# PixArt sizes its position embedding by round(mean latent side / 64): latents up to 32 wide divide by zero.
PIXART_LATENT = (4, 40, 40)
HUNYUAN15 = {"vision_in.proj.0.weight": (1152,), "cond_type_embedding.weight": (1,)}  # HunyuanVideo 1.5 markers
WAN_CLIP = {"img_emb.proj.0.bias": (1280,)}  # Wan's CLIP-vision image embedder (image-to-video variants)

FAMILIES: tuple[Family, ...] = (
    # -- UNets: detection matches width 320 (384, 256), context and adm widths and input transformer depths --------
    Family("sd15", "SD15", _unet(context_dim=768, num_heads=8), (320,), (4, 8, 8), 768),
    Family("sd15_ip2p", "SD15_instructpix2pix", _unet(context_dim=768, num_heads=8, in_channels=8), (320,), (4, 8, 8),
           768),
    Family("sd2", "SD20", _unet(**SD2_UNET), (320,), (4, 8, 8), 1024),
    Family("sd21_unclip_l", "SD21UnclipL", _unet(**SD2_UNET, adm_in_channels=1536, num_classes="sequential"), (320,),
           (4, 8, 8), 1024),
    Family("sd21_unclip_h", "SD21UnclipH", _unet(**SD2_UNET, adm_in_channels=2048, num_classes="sequential"), (320,),
           (4, 8, 8), 1024),
    Family("sd_x4_upscaler", "SD_X4Upscaler",
           _unet(context_dim=1024, use_linear_in_transformer=True, num_heads=8, in_channels=7, num_classes=1000,
                 num_res_blocks=[1] * 4, channel_mult=[1] * 4, transformer_depth=[1] * 4,
                 disable_self_attentions=[True, True, True, False]),
           (256,), (4, 8, 8), 1024),
    # SDXL proper is detected by its input transformer depths [0,0,2,2,10,10]; at channel multiplier 1 that is small.
    Family("sdxl", "SDXL", _unet(**SDXL_UNET, transformer_depth=[0, 0, 2, 2, 10, 10]), (320,), (4, 8, 8), 2048,
           pooled=1280),
    Family("sdxl_ip2p", "SDXL_instructpix2pix", _unet(**SDXL_UNET, in_channels=8, transformer_depth=[0, 0, 2, 2, 10, 10]),
           (320,), (4, 8, 8), 2048, pooled=1280),
    Family("sdxl_refiner", "SDXLRefiner", _unet(**{**SDXL_UNET, "context_dim": 1280, "adm_in_channels": 2560,
                                                   "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 1, 1],
                                                   "transformer_depth": [0, 0, 4, 4, 4, 4, 0, 0]}),
           (384,), (4, 8, 8), 1280, pooled=1280),
    Family("ssd1b", "SSD1B", _unet(**SDXL_UNET, transformer_depth=[0, 0, 2, 2, 4, 4]), (320,), (4, 8, 8), 2048,
           pooled=1280),
    Family("segmind_vega", "Segmind_Vega", _unet(**SDXL_UNET, transformer_depth=[0, 0, 1, 1, 2, 2]), (320,), (4, 8, 8),
           2048, pooled=1280),
    Family("koala_700m", "KOALA_700M", _unet(**{**SDXL_UNET, "num_res_blocks": [1, 1, 1]}, transformer_depth=[0, 2, 5]),
           (320,), (4, 8, 8), 2048, pooled=1280),
    Family("koala_1b", "KOALA_1B", _unet(**{**SDXL_UNET, "num_res_blocks": [1, 1, 1]}, transformer_depth=[0, 2, 6]),
           (320,), (4, 8, 8), 2048, pooled=1280),
    Family("svd", "SVD_img2vid", _unet(**SVD_UNET, adm_in_channels=768), (320,), (4, 8, 8), 1024),
    Family("sv3d_u", "SV3D_u", _unet(**SVD_UNET, adm_in_channels=256), (320,), (4, 8, 8), 1024),
    Family("sv3d_p", "SV3D_p", _unet(**SVD_UNET, adm_in_channels=1280), (320,), (4, 8, 8), 1024),
    # Zero123: an SD 1.5 UNet on the noise and the input view's latent (4 + 4 channels); its image-and-camera
    # conditioning (CLIP vision 768 + 4 camera values) goes through cc_projection, stored beside the UNet in the file
    # (ComfyUI's loader reads it into the model, not the diffusion model).
    Family("zero123", "Stable_Zero123", _unet(context_dim=768, num_heads=8, in_channels=8), (320,), (4, 8, 8),
           768 + 4, tokens=1, concat=4, outside={"cc_projection.weight": (768, 768 + 4), "cc_projection.bias": (768,)}),
    # -- transformers whose width detection reads from the weights: the smallest width, depth 1 --------------------
    Family("sd3", "SD3", _mmdit(), (64,), (16, 8, 8), 64, pooled=64),
    Family("sd35", "SD3", _mmdit("joint_blocks.0.context_block.attn.ln_q.weight",
                                 "joint_blocks.0.x_block.attn2.qkv.weight"), (64,), (16, 8, 8), 64, pooled=64),
    # Flux on 0.3.75 fixes 24 heads of 128 (width 3072): depth 1 + 1 there; 0.33 takes heads from the width.
    Family("flux_dev", "Flux", _flux(), (128, 3072), (16, 8, 8), 64, pooled=64, extras={"guidance": 3.5}),
    Family("flux_schnell", "FluxSchnell", _flux(guidance=False), (128, 3072), (16, 8, 8), 64, pooled=64),
    Family("flux_fill", "FluxInpaint", _flux(channels=96), (128, 3072), (16, 8, 8), 64, pooled=64,
           extras={"guidance": 30.0}),
    Family("flux2", "Flux2", _flux(channels=128, guidance=False, pooled=False,
                                   marker="double_stream_modulation_img.lin.weight"), (128, 6144), (128, 4, 4), 64),
    Family("hunyuan_video", "HunyuanVideo", _hunyuan_video(), (128,), (16, 2, 8, 8), 64, pooled=768,
           extras={"guidance": 6.0}),
    Family("hunyuan_video_i2v", "HunyuanVideoI2V", _hunyuan_video(channels=33), (128,), (16, 2, 8, 8), 64, pooled=768,
           extras={"guidance": 6.0}, concat=16),
    Family("hunyuan_video_skyreels_i2v", "HunyuanVideoSkyreelsI2V", _hunyuan_video(channels=32), (128,),
           (16, 2, 8, 8), 64, pooled=768, extras={"guidance": 6.0}, concat=16),
    Family("hunyuan_video15", "HunyuanVideo15", _hunyuan_video(channels=65, out=32, vector=False, **HUNYUAN15),
           (128,), (32, 2, 8, 8), 64),
    Family("hunyuan_video15_sr", "HunyuanVideo15_SR_Distilled",
           _hunyuan_video(channels=98, out=32, vector=False, **HUNYUAN15), (128,), (32, 2, 8, 8), 64),
    Family("hunyuan_image21", "HunyuanImage21", _hunyuan_video(channels=64, out=64, patch=(1, 1), vector=False),
           (128,), (64, 8, 8), 64),
    # The refiner's latent format folds pairs of frames (first one repeated) into 64 channels: 32 channels, odd frames.
    Family("hunyuan_image21_refiner", "HunyuanImage21Refiner",
           _hunyuan_video(channels=128, out=64, patch=(1, 1, 1), vector=False), (128,), (32, 1, 8, 8), 64),
    Family("ltxv", "LTXV", lambda w: {"adaln_single.emb.timestep_embedder.linear_1.bias": (1,),
                                      "transformer_blocks.0.attn2.to_k.weight": (w, w)},
           (192, 384, 768, 1536), (128, 2, 4, 4), 4096, attention_mask=True),
    # LTX-2 (audio+video): detection fixes 3840-wide caption connectors and a 2048-wide audio stream (0.87 B) unless
    # the file's config metadata sizes them, as real LTX-2 files do: 2 heads everywhere, one block, one connector layer.
    # Captions are raw text-encoder features (the model's connectors process them); audio latents are 8 x T x 16.
    Family("ltxav", "LTXAV", lambda w: {"adaln_single.emb.timestep_embedder.linear_1.bias": (1,),
                                        "audio_adaln_single.linear.weight": (1,),
                                        "transformer_blocks.0.attn2.to_k.weight": (w, w)},
           (64,), (128, 2, 4, 4), 64, extras={"unprocessed_ltxav_embeds": True}, audio=(8, 5, 16),
           config={"num_attention_heads": 2, "attention_head_dim": 32, "audio_num_attention_heads": 2,
                   "audio_attention_head_dim": 16, "audio_cross_attention_dim": 32, "caption_channels": 64,
                   "connector_num_attention_heads": 2, "connector_attention_head_dim": 32, "connector_num_layers": 1}),
    Family("wan21_t2v", "WAN21_T2V", _wan(), (128,), (16, 2, 8, 8), 4096),
    Family("wan21_i2v", "WAN21_I2V", _wan(in_dim=36, **WAN_CLIP), (128,), (16, 2, 8, 8), 4096, concat=16),
    Family("wan22_ti2v", "WAN22_T2V", _wan(in_dim=48, out_dim=48), (128,), (48, 2, 8, 8), 4096),
    Family("wan21_fun_control", "WAN21_FunControl2V", _wan(in_dim=48, **WAN_CLIP), (128,), (16, 2, 8, 8), 4096),
    Family("wan21_camera", "WAN21_Camera", _wan(in_dim=32, **WAN_CLIP, **{"control_adapter.conv.weight": (1,)}),
           (128,), (16, 2, 8, 8), 4096),
    Family("wan22_camera", "WAN22_Camera", _wan(in_dim=36, **{"control_adapter.conv.weight": (1,)}), (128,),
           (16, 2, 8, 8), 4096),
    Family("wan21_vace", "WAN21_Vace", _wan(**{"vace_patch_embedding.weight": (128, 96, 1, 2, 2), **_count("vace_blocks.")}),
           (128,), (16, 2, 8, 8), 4096),
    Family("wan22_s2v", "WAN22_S2V", _wan(**{"casual_audio_encoder.encoder.final_linear.weight": (1,)}), (128,),
           (16, 2, 8, 8), 4096),
    Family("wan21_humo", "WAN21_HuMo", _wan(**{"audio_proj.audio_proj_glob_1.layer.bias": (1,)}), (128,),
           (16, 2, 8, 8), 4096),
    # Wan-Animate fuses face features every 5th block: 5 blocks.
    Family("wan22_animate", "WAN22_Animate",
           _wan(**{"face_adapter.fuser_blocks.0.k_norm.weight": (1,), **_count("blocks.", 5)}), (128,),
           (16, 2, 8, 8), 4096),
    Family("cosmos_t2v", "CosmosT2V", _cosmos(COSMOS1), (160, 320, 640, 1280), (16, 2, 8, 8), 1024),
    Family("cosmos_i2v", "CosmosI2V", _cosmos(COSMOS1, 17), (160, 320, 640, 1280), (16, 2, 8, 8), 1024),
    Family("cosmos_predict2", "CosmosT2IPredict2", _cosmos(COSMOS2), (96, 192, 384, 768), (16, 1, 8, 8), 1024),
    Family("cosmos_predict2_i2v", "CosmosI2VPredict2", _cosmos(COSMOS2, 17), (96, 192, 384, 768), (16, 1, 8, 8), 1024),
    Family("anima", "Anima", _cosmos(COSMOS2, 16, ANIMA_ADAPTER), (96, 192, 384, 768), (16, 1, 8, 8), 1024,
           **ANIMA_TEXT),
    Family("joyimage", "JoyImage", _joyimage, (128,), (16, 1, 8, 8), 4096),
    # HunyuanDiT fixes its caption lengths: 77 CLIP tokens (width 1024) and 256 mT5 tokens (width 2048), with masks.
    Family("hunyuan_dit", "HunyuanDiT", _hunyuan_dit(1), (64, 128, 256, 512, 1024), (4, 8, 8), 1024, **HYDIT_TEXT),
    # v1.0/1.1: 3968 = pooled 1024 + size 1536 + style embedding at the width, which fixes the width at 1408.
    Family("hunyuan_dit1", "HunyuanDiT1", _hunyuan_dit(3968), (1408,), (4, 8, 8), 1024, **HYDIT_TEXT),
    # PixArt fixes width 1152: one block.
    Family("pixart_alpha", "PixArtAlpha", _pixart(120, "ar_embedder.mlp.0.weight"), (1152,), PIXART_LATENT, 4096),
    Family("pixart_sigma", "PixArtSigma", _pixart(300), (1152,), PIXART_LATENT, 4096),
    # Hunyuan 3D: 1-D shape latents (64 channels x tokens), image-feature conditioning.
    Family("hunyuan3d_v2", "Hunyuan3Dv2", _hunyuan3d(), (64, 128, 256), (64, 16), 64, extras={"guidance": 5.0}),
    Family("hunyuan3d_v2_mini", "Hunyuan3Dv2mini", _hunyuan3d(depth=8), (64, 128, 256), (64, 16), 64,
           extras={"guidance": 5.0}),
    Family("hunyuan3d_v2_1", "Hunyuan3Dv2_1", lambda w: {"t_embedder.mlp.2.weight": (1,), "x_embedder.weight": (w, 64),
                                                         "blocks.0.attn1.k_norm.weight": (1,)},
           (64, 128, 256), (64, 16), 1024, extras={"guidance": 5.0}),
    # -- big: detection fixes the width (depth 1, or the fixed layout); each loads once for both trainings ---------
    # AuraFlow fixes width 3072 and caption width 2048: one double layer and one single layer.
    Family("auraflow", "AuraFlow", lambda w: {"double_layers.0.attn.w1q.weight": (w, w),
                                              "positional_encoding": (1, 256, w), "cond_seq_linear.weight": (w, 2048),
                                              **_count("single_layers.")},
           (3072,), (4, 8, 8), 2048),
    # Chroma: Flux blocks plus a 5-layer, 5120-wide modulation approximator whose 3072 outputs fix the width (0.33
    # detects width 128 too, but its approximator output then does not fit the blocks): depth 1 + 1.
    Family("chroma", "Chroma", _flux(guidance=False, pooled=False, marker="distilled_guidance_layer.norms.0.scale"),
           (3072,), (16, 8, 8), 64, pooled=None, extras={"guidance": 0.0}),
    Family("chroma_radiance", "ChromaRadiance",
           lambda w: {"txt_in.weight": (w, 64), "double_blocks.0.img_attn.norm.key_norm.scale": (1,),
                      **_count("single_blocks."), "distilled_guidance_layer.norms.0.scale": (1,),
                      "nerf_blocks.0.norm.scale": (1,), "img_in_patch.weight": (w, 3, 16, 16)},
           (3072,), (3, 32, 32), 64, extras={"guidance": 0.0}),
    # Qwen-Image fixes 24 heads of 128 (3072) and a 3584-wide caption: one block. Its latents are 5-D with T = 1.
    Family("qwen_image", "QwenImage", lambda w: {"txt_norm.weight": (3584,), "img_in.weight": (w, 64),
                                                 **_count("transformer_blocks.")},
           (3072,), (16, 1, 8, 8), 3584),
    # Lumina 2 fixes width 2304 (Z-Image 3840) and always has 2 + 2 refiner layers: one main layer.
    Family("lumina2", "Lumina2", _lumina(), (2304,), (16, 8, 8), 64),
    Family("z_image", "ZImage", _lumina("cap_pad_token", "x_pad_token"), (3840,), (16, 8, 8), 64),
    # Fixed layouts: the builder reports their size, and the test skips those over its limit.
    Family("stable_cascade_c", "Stable_Cascade_C", lambda w: {"clf.1.weight": (1,), "clip_txt_mapper.weight": (w, 1)},
           (1536,), (16, 8, 8), 1280, pooled=1280),
    Family("stable_cascade_b", "Stable_Cascade_B", lambda w: {"clf.1.weight": (1,), "clip_mapper.weight": (1,),
                                                              "down_blocks.1.0.channelwise.0.weight": (1, w)},
           (576,), (4, 16, 16), 1280, pooled=1280),  # its zero prior is (side * 4) // 42 wide: sides >= 11
    Family("ace_step", "ACEStep", lambda w: {"genre_embedder.weight": (1,)}, (2560,), (8, 16, 16), 768),
    # ACE-Step 1.5: 1-D audio latents (64 channels x frames); lyrics are a second caption of the same width. Its
    # rotary cos/sin tables are buffers made at load time (inference tensors) that the forward multiplies with.
    Family("ace_step15", "ACEStep15", _ace_step15, (64, 128), (64, 20), 1024,
           extras={"conditioning_lyrics": lambda gen: torch.randn(1, 2 * TOKENS, 1024, generator=gen)}),
    Family("omnigen2", "Omnigen2", lambda w: {"time_caption_embed.timestep_embedder.linear_1.bias": (1,)}, (2520,),
           (16, 8, 8), 2048),
    Family("mochi", "GenmoMochi", lambda w: {"t5_yproj.weight": (1,)}, (3072,), (12, 2, 8, 8), 4096,
           attention_mask=True),
    Family("hidream", "HiDream", lambda w: {"caption_projection.0.linear.weight": (1,)}, (2560,), (16, 8, 8), 4096),
    # Stable Audio Open: a 1-D DiT over 64-channel latents, 768-wide T5 captions, 24 heads whose rotary embedding
    # needs 64 channels each (width 1536): one layer (0.3.75's detection fixes all 24, 1.06 B). Its seconds
    # embedders (start, total: 768 each, learned Fourier features) sit beside the diffusion model in the file (see
    # Stable Audio 3).
    Family("stable_audio", "StableAudio", _stable_audio(io=64, global_cond=1536, heads=None), (1536,), (64, 16), 768,
           outside={**_seconds_embedder("seconds_start", learned=True),
                    **_seconds_embedder("seconds_total", learned=True)}),
    # -- ComfyUI 0.33's families (skipped, with the reason, where the running ComfyUI lacks the class) ---------------
    # LongCat-Image: Flux blocks, a Qwen2.5-VL 7B caption (3584 wide), no pooled output and no guidance input.
    Family("longcat_image", "LongCatImage", _flux(guidance=False, pooled=False, context=3584), (128,), (16, 8, 8),
           3584),
    # Kandinsky 5: heads of 64 at any width (the 1792/2560/4096 releases pick their own rope axes). The video model
    # takes the latent plus a zero start image and a mask (33 x 2 x 2 patch inputs), the image one 2560 wide only.
    Family("kandinsky5", "Kandinsky5", _kandinsky5(132), (128,), (16, 2, 8, 8), 3584, pooled=768),
    Family("kandinsky5_image", "Kandinsky5Image", _kandinsky5(64), (2560,), (16, 8, 8), 3584, pooled=768),
    # CogVideoX 1.0 (heads of 64; 2-D patches); T5 captions padded to 226 tokens. Image-to-video adds a start-image
    # latent (16 channels), the Fun inpainting model a start image and a mask video latent (32).
    Family("cogvideox_t2v", "CogVideoX_T2V", _cogvideox(16), (64,), (16, 2, 8, 8), 4096, tokens=226),
    Family("cogvideox_i2v", "CogVideoX_I2V", _cogvideox(32), (64,), (16, 2, 8, 8), 4096, tokens=226, concat=16),
    Family("cogvideox_inpaint", "CogVideoX_Inpaint", _cogvideox(48), (64,), (16, 2, 8, 8), 4096, tokens=226,
           concat=32),
    # Wan variants ComfyUI 0.33 added (Wan 2.1 blocks, heads of 128, as above), with what their conditioning nodes add.
    # SCAIL: reference latents ahead of the video, a half-size pose video latent (its own patch embedder) and a
    # 4-channel mask concat; SCAIL-2 adds 28-channel identity masks over the references and the pose video.
    Family("wan21_scail", "WAN21_SCAIL", _wan(in_dim=20, **{"patch_embedding_pose.weight": (1,)}), (128,),
           (16, 2, 8, 8), 4096, extras=SCAIL),
    Family("wan21_scail2", "WAN21_SCAIL2", _wan(in_dim=20, **{"patch_embedding_mask.weight": (1,)}), (128,),
           (16, 2, 8, 8), 4096, extras={**SCAIL, "driving_mask_28ch": _mask(1, 2, 28, 4, 4),
                                        "ref_mask_28ch": _mask(1, 3, 28, 8, 8)}),
    # WanDancer: image-to-video (start image + mask concat) with music features (35 per frame) at 30 fps.
    Family("wan22_wandancer", "WAN22_WanDancer", _wan(in_dim=36, **{"patch_embedding_global.weight": (1,)}), (128,),
           (16, 2, 8, 8), 4096, concat=16, extras={"audio_embed": _randn(1, 8, 35), "fps": 30.0}),
    # Told apart from plain Wan only by the file's config metadata, as ComfyUI's own files carry it. Wan-Animate 2:
    # frame 0 is the reference image slot; the pose video latent covers the other frames.
    Family("wan_animate2", "WAN_Animate2", _wan(in_dim=36, **WAN_CLIP), (128,), (16, 2, 8, 8), 4096, concat=16,
           extras={"pose_video_latent": _randn(1, 16, 1, 8, 8)}, metadata=_wan_config(model_type="animate2")),
    Family("wan21_causal_ar", "WAN21_CausalAR_T2V", _wan(), (128,), (16, 2, 8, 8), 4096,
           metadata=_wan_config(causal_ar=True)),
    # Z-Image in pixel space: the 3840-wide Z-Image backbone (one main layer) with a pixel decoder in place of its
    # final layer, on 16 x 16 RGB patches; the decoder (its width, depth) is read from the weights: 64 wide, one block.
    Family("z_image_pixel", "ZImagePixelSpace",
           lambda w: {**_lumina("cap_pad_token", "x_pad_token")(w), "x_embedder.weight": (w, 16 * 16 * 3),
                      "dec_net.cond_embed.weight": (64, w), "dec_net.final_layer.linear.weight": (16 * 16 * 3, 64),
                      "dec_net.input_embedder.embedder.0.weight": (64, 16 * 16 * 3 + 8 * 8),
                      **_count("dec_net.res_blocks.")},
           (3840,), (3, 32, 32), 64),
    # Boogu: OmniGen2 blocks at 28 heads of 120 (3360; its rope fixes the head size) plus dual-stream layers: one
    # dual-stream and one single-stream layer, no refiners; a Qwen3-VL 8B caption (4096) with its attention mask (the
    # model reads the caption length from it).
    Family("boogu", "Boogu", lambda w: {"double_stream_layers.0.img_instruct_attn.processor.img_to_q.weight": (1,),
                                        "x_embedder.weight": (w, 64), **_count("single_stream_layers."),
                                        "time_caption_embed.caption_embedder.0.weight": (4096,)},
           (3360,), (16, 8, 8), 4096, attention_mask=True),
    # Ideogram 4: 18 heads of 256 (4608) on 2 x 2 patches of Flux 2 latents, its caption 13 Qwen3-VL layers of 4096
    # side by side (53248): one layer.
    Family("ideogram4", "Ideogram4", lambda w: {"embed_image_indicator.weight": (1,), "input_proj.weight": (w, 128),
                                                **_count("layers.")},
           (4608,), (128, 4, 4), 53248),
    # Stable Audio 3: a 1-D DiT over 256-channel audio latents (rms-normed heads of 64; its 768-wide seconds embedding
    # feeds one shared adaLN embedder; mask + masked latent as a local additive condition), a 768-wide T5Gemma
    # caption. Its seconds embedder sits beside the diffusion model in the file: ComfyUI's loader reads it from there
    # when the diffusion model's keys carry no prefix (a checkpoint's "model.model." prefix makes UNETLoader drop it).
    Family("stable_audio3", "StableAudio3",
           _stable_audio(io=256, global_cond=768, heads=64, local_add=257, shared=True), (128,), (256, 16), 768,
           outside=_seconds_embedder("seconds_total", learned=False)),
    # Lens: heads of 64; its caption is 4 GPT-OSS layers of 2880 side by side, with an attention mask.
    Family("lens", "Lens", lambda w: {"transformer_blocks.0.attn.norm_added_q.weight": (1,),
                                      "transformer_blocks.0.img_mlp.w1.weight": (1,), "img_in.weight": (w, 128),
                                      "proj_out.weight": (128, w),
                                      **{f"txt_norm.{i}.weight": (2880,) for i in range(4)}},
           (128,), (128, 4, 4), 4 * 2880, attention_mask=True),
    # Krea 2: heads of 128; its caption is 12 Qwen3-VL 4B layers of 2560 (fused by 2560-wide text blocks). Wan 2.1
    # latents, 5-D with T = 1 (as Qwen-Image's).
    Family("krea2", "Krea2", lambda w: {"txtfusion.projector.weight": (1, 12), "first.weight": (w, 64),
                                        "blocks.0.attn.wq.weight": (w, w), "blocks.0.attn.wk.weight": (w, w),
                                        "txtfusion.layerwise_blocks.0.prenorm.scale": (2560,)},
           (128,), (16, 1, 8, 8), 12 * 2560),
    # Mage-Flow: Qwen-Image blocks at a fixed 24 x 128 (3072), Flux 2 latents, a 2560-wide caption: one block.
    Family("mage_flow", "MageFlow", lambda w: {"txt_norm.weight": (2560,), "proj_out.weight": (128, w),
                                               "img_in.weight": (w, 128), **_count("transformer_blocks.")},
           (3072,), (128, 4, 4), 2560),
)
BY_NAME = {f.name: f for f in FAMILIES}

# Not in the matrix: a Flux that takes CLIP-L's output as ``CLIPLoader`` type sd3 gives it (context 4096 wide, pooled
# 2048: tools/dataset_models.py), for workflows that start from image files. Flux Kontext is this class (it takes
# reference latents), so edit data sets train on it.
FLUX_FOR_CLIP_L = Family("flux_clip_l", "Flux", _flux(context=4096, pooled_width=768 + 1280), (128, 3072), (16, 8, 8),
                         4096, pooled=768 + 1280, extras={"guidance": 3.5})


# -- building the model ComfyUI detects, and its file ----------------------------------------------------------------
@dataclass(frozen=True)
class Built:
    width: int
    shapes: Shapes  # the full state dict ComfyUI builds for the probe
    parameters: int


def metadata(family: Family) -> dict[str, str] | None:
    """The safetensors metadata of the family's file: its own ``metadata`` and its transformer ``config``, if any."""
    meta = dict(family.metadata)
    if family.config:
        meta["config"] = json.dumps({"transformer": family.config}, sort_keys=True)
    return meta or None


def detect(shapes: Shapes, metadata: dict[str, str] | None = None, real_memory: bool = True,
           outside: Shapes | None = None) -> tuple[str, Shapes]:
    """(detected class name, the state-dict shapes of the diffusion model ComfyUI builds) for a state dict of these
    shapes (plus the ``outside`` weights) in a file with this safetensors ``metadata``. The model is built on the meta
    device; builders that need real memory get it unless ``real_memory`` is False (for models of billions of
    parameters), which raises instead."""
    import comfy.model_detection

    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    sd.update({k: torch.zeros(s) for k, s in (outside or {}).items()})  # small; loaded as they are, not on meta
    config = comfy.model_detection.model_config_from_unet(sd, "", metadata=metadata or None)
    if config is None:
        return "", {}
    # Without autograd, as ComfyUI's loaders run inside a node (Zero123's builder copies its cc_projection in place).
    with torch.no_grad():
        try:  # weights on the meta device; the model's sampling schedule stays real (Cascade's is slow on meta)
            model = config.get_model(sd, "", device=torch.device("meta"))
        except Exception:  # builders that compute values (PixArt's .item(), the x4 upscaler's numpy) need real memory
            if not real_memory:
                raise
            model = config.get_model(sd, "")
    return type(config).__name__, {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}


def build(family: Family) -> Built:
    """The smallest width at which this ComfyUI detects ``family`` and loads back exactly what it builds.

    Raises LookupError (with each width's reason) when no candidate width works on this version."""
    reasons = []
    for width in family.widths:
        try:
            name, shapes = detect(family.probe(width), metadata(family), outside=family.outside)
            again = detect(shapes, metadata(family), outside=family.outside) if name == family.detected_as else ("", {})
        except Exception as e:  # ComfyUI's builder rejects this width (e.g. width not a multiple of its fixed heads)
            reasons.append(f"width {width}: {type(e).__name__}: {e}")
            continue
        if name != family.detected_as:
            reasons.append(f"width {width}: detected as {name or 'nothing'}")
        elif again != (name, shapes):
            reasons.append(f"width {width}: the built model is detected differently")
        else:
            return Built(width, shapes, sum(math.prod(s) for s in shapes.values()))
    raise LookupError(f"{family.name}: no width detected as {family.detected_as}: " + "; ".join(reasons))


def write(family: Family, built: Built, directory: Path, seed: int = 0) -> Path:
    """The family's model file in ``directory`` (written once, atomically; bf16): the diffusion model and the family's
    ``outside`` weights, with its metadata. The name carries a digest of all three, so a ComfyUI or probe change that
    alters the file never reuses a stale cached one."""
    shapes = {**built.shapes, **family.outside}
    meta = metadata(family)
    described = repr(sorted(shapes.items())) + (repr(meta) if meta else "")  # files without metadata: as before
    layout = hashlib.sha256(described.encode()).hexdigest()[:10]

    def tensors(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {k: tiny_models.seeded_tensor(shapes[k], gen).to(torch.bfloat16) for k in sorted(shapes)}

    return tiny_models.write_model(directory / f"{family.name}_w{built.width}_{layout}_s{seed}.safetensors", tensors,
                                   seed, meta)


# -- training data ----------------------------------------------------------------------------------------------------
def latents(family: Family, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded latents with spatial structure; video latents drift by one pixel per frame."""
    if len(family.latent) == 2:  # 1-D latents (3-D shapes, audio): one row of an image
        return tiny_models.smooth_latents(count, family.latent[0], 1, family.latent[1], seed)[:, :, 0]
    channels, *frames, height, width = family.latent
    images = tiny_models.smooth_latents(count, channels, height, width, seed)
    if not frames:
        return images
    return torch.stack([images.roll(t, dims=-1) for t in range(frames[0])], dim=2)


def audio_latents(family: Family, count: int, seed: int) -> torch.Tensor:
    """``count`` seeded audio latents (C, T, F) of an audio+video family, with structure over time and frequency."""
    if family.audio is None:
        raise ValueError(f"{family.name} has no audio stream")
    return tiny_models.smooth_latents(count, *family.audio, seed)


def conditioning(family: Family, count: int, seed: int) -> list:
    """One seeded caption per image, with what the family's text encoder would add (pooled output, guidance, mask)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        extras: dict[str, Any] = {"pooled_output": None}
        extras.update({k: v(gen) if callable(v) else v for k, v in family.extras.items()})
        if family.pooled is not None:
            extras["pooled_output"] = torch.randn(1, family.pooled, generator=gen)
        if family.attention_mask:
            extras["attention_mask"] = torch.ones(1, family.tokens, dtype=torch.int64)
        if family.concat:
            _, *frames_and_size = family.latent
            extras["concat_latent_image"] = torch.randn(1, family.concat, *frames_and_size, generator=gen)
            extras["concat_mask"] = torch.ones(1, 1, *frames_and_size)
        out.append([torch.randn(1, family.tokens, family.context, generator=gen), extras])
    return out
