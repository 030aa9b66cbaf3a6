"""The published configurations of the large families, in one table, for the fake-tensor benchmark (issue 23).

Each entry names the state-dict keys and shapes ComfyUI's ``comfy/model_detection.py`` reads to size the model
(widths from the published weights, block counts as ``blocks``), so ComfyUI itself builds the real architecture:
the parameter count it gives is checked against the published size (``parameters_b``). The data are the benchmark's
settings: 1024 x 1024 images, 480 x 832 video of 33 frames, each family's own caption (text encoder width and a
typical token count).
"""
from __future__ import annotations

from fake_step import Case
import family_models

IMAGE = 1024  # pixels a side
VIDEO = (33, 480, 832)  # frames, height, width


def image_latent(channels: int, down: int = 8, frames: bool = False) -> tuple[int, ...]:
    side = IMAGE // down
    return (channels, 1, side, side) if frames else (channels, side, side)


def video_latent(channels: int, down: int = 8, time_down: int = 4) -> tuple[int, ...]:
    frames, height, width = VIDEO
    return (channels, (frames - 1) // time_down + 1, height // down, width // down)


def _flux(width: int, context: int, *, channels: int = 16, patch: int = 2, pooled: int | None = 768,
          guidance: bool = True, marker: str = "") -> dict[str, tuple[int, ...]]:
    shapes = {"img_in.weight": (width, channels * patch * patch), "txt_in.weight": (width, context),
              "double_blocks.0.img_attn.norm.key_norm.scale": (128,)}
    if pooled:
        shapes["vector_in.in_layer.weight"] = (width, pooled)
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (width, 256)
    if marker:
        shapes[marker] = (1,)
    return shapes


def _mmdit(width: int, pos: int, extra: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    return {"x_embedder.proj.weight": (width, 16, 2, 2), "joint_blocks.0.context_block.attn.qkv.weight": (1,),
            "y_embedder.mlp.0.weight": (width, 2048), "context_embedder.weight": (width, 4096),
            "pos_embed": (1, pos * pos, width), "final_layer.linear.weight": (64, width), **{k: (1,) for k in extra}}


def _wan(width: int, ffn: int, channels: int = 16) -> dict[str, tuple[int, ...]]:
    return {"head.modulation": (1, 2, width), "head.head.weight": (channels * 4, width),
            "blocks.0.ffn.0.weight": (ffn, width), "patch_embedding.weight": (width, channels, 1, 2, 2)}


SDXL_UNET = dict(family_models.SDXL_UNET, channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
FLUX_TEXT = dict(tokens=512, context=4096, pooled=768)  # T5-XXL 512 tokens, CLIP-L pooled
SD3_TEXT = dict(tokens=77 + 256, context=4096, pooled=2048)  # CLIP-L/G (padded to 4096) + T5-XXL 256
WAN_TEXT = dict(tokens=512, context=4096)  # umT5-XXL

CASES: tuple[Case, ...] = (
    Case("flux_dev", "Flux", lambda: _flux(3072, 4096), image_latent(16), **FLUX_TEXT, extras={"guidance": 3.5},
         blocks={"double_blocks.": 19, "single_blocks.": 38}, parameters_b=11.9),
    Case("flux_schnell", "FluxSchnell", lambda: _flux(3072, 4096, guidance=False), image_latent(16), **FLUX_TEXT,
         blocks={"double_blocks.": 19, "single_blocks.": 38}, parameters_b=11.9),
    Case("sdxl", "SDXL", lambda: family_models._unet(**SDXL_UNET)(320), image_latent(4), tokens=77, context=2048,
         pooled=1280, parameters_b=2.57),
    Case("sd35_large", "SD3", lambda: _mmdit(2432, 192, ("joint_blocks.0.context_block.attn.ln_q.weight",)),
         image_latent(16), **SD3_TEXT, parameters_b=8.06),
    Case("qwen_image", "QwenImage", lambda: {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64)},
         image_latent(16, frames=True), tokens=256, context=3584, blocks={"transformer_blocks.": 60},
         parameters_b=20.4),
    Case("wan21_14b", "WAN21_T2V", lambda: _wan(5120, 13824), video_latent(16), **WAN_TEXT, blocks={"blocks.": 40},
         parameters_b=14.3),
    Case("wan21_1_3b", "WAN21_T2V", lambda: _wan(1536, 8960), video_latent(16), **WAN_TEXT, blocks={"blocks.": 30},
         parameters_b=1.4),
    Case("wan22_ti2v_5b", "WAN22_T2V", lambda: _wan(3072, 14336, channels=48), video_latent(48, down=16),
         **WAN_TEXT, blocks={"blocks.": 30}, parameters_b=5.0),
    Case("chroma", "Chroma", lambda: _flux(3072, 4096, pooled=None, guidance=False,
                                           marker="distilled_guidance_layer.norms.0.scale"),
         image_latent(16), tokens=512, context=4096, extras={"guidance": 0.0},
         blocks={"double_blocks.": 19, "single_blocks.": 38}, parameters_b=8.9),
    Case("flux2_dev", "Flux2", lambda: _flux(6144, 15360, channels=128, patch=1, pooled=None, guidance=True,
                                             marker="double_stream_modulation_img.lin.weight"),
         image_latent(128, down=16), tokens=512, context=15360, extras={"guidance": 4.0},
         blocks={"double_blocks.": 8, "single_blocks.": 48}, parameters_b=32.0),
    Case("hunyuan_video", "HunyuanVideo",
         lambda: {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (1,), "img_in.proj.weight": (3072, 16, 1, 2, 2),
                  "final_layer.linear.weight": (64, 3072), "txt_in.input_embedder.weight": (3072, 4096),
                  "guidance_in.in_layer.weight": (3072, 256), "vector_in.in_layer.weight": (3072, 768)},
         video_latent(16), tokens=256, context=4096, pooled=768, extras={"guidance": 6.0},
         blocks={"double_blocks.": 20, "single_blocks.": 40}, parameters_b=12.8),
    Case("hidream_i1", "HiDream", lambda: {"caption_projection.0.linear.weight": (1,)}, image_latent(16), tokens=128,
         context=4096, parameters_b=17.1),
    Case("lumina2", "Lumina2", lambda: {"cap_embedder.1.weight": (2304, 2304),
                                        "noise_refiner.0.attention.k_norm.weight": (1,)},
         image_latent(16), tokens=256, context=2304, blocks={"layers.": 26}, parameters_b=2.6),
    Case("z_image", "ZImage", lambda: {"cap_embedder.1.weight": (3840, 2560),
                                       "noise_refiner.0.attention.k_norm.weight": (1,),
                                       "cap_pad_token": (1, 3840), "x_pad_token": (1, 3840)},
         image_latent(16), tokens=256, context=2560, blocks={"layers.": 30}, parameters_b=6.2),
)
BY_NAME = {c.name: c for c in CASES}
