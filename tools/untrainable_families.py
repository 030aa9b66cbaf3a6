"""The model classes of ComfyUI (``comfy.supported_models.models``) that the family matrix does not train, each with
the reason: the one table of them. Every other class of the running ComfyUI is the ``detected_as`` of a family in
``family_models.FAMILIES`` (tests/test_family_coverage.py checks both ways, so a class a newer ComfyUI adds fails that
test until it is a family or an entry here).

Three kinds of reason:

- BIG: the smallest model ComfyUI's detection accepts is over the matrix's 1 B parameters (its layout, or most of it,
  is fixed). The entry keeps the probe, the keys detection reads for that model (``family_models.detect`` builds it on
  the meta device), so the test checks the stated size on the running ComfyUI and a later real-size check can build
  it.
- NOT_DIFFUSION: not a diffusion model (segmentation, detection, depth): nothing for a LoRA trainer of diffusion models.
- NEEDS: a diffusion model whose training needs something the trainer does not do yet; the reason says what, and the
  error the trainer gives.

"""
from __future__ import annotations

from dataclasses import dataclass

from family_models import Family

# The matrix trains models up to this size (tests/test_family_matrix.py, MAX_PARAMETERS): "tiny" ends here.
TINY_LIMIT = 1_000_000_000
BIG, NOT_DIFFUSION, NEEDS = "over 1 B parameters", "not a diffusion model", "needs what the trainer lacks"
KINDS = (BIG, NOT_DIFFUSION, NEEDS)


@dataclass(frozen=True)
class Untrainable:
    kind: str  # one of KINDS
    reason: str
    billions: float = 0.0  # BIG: the smallest model's parameters (ComfyUI 0.33), as the reason states them
    probe: Family | None = None  # BIG: the keys of that model's file that detection reads

    def describe(self) -> str:
        if self.kind == BIG:
            return f"smallest loadable model has {self.billions:.2f} B parameters: {self.reason}"
        return f"{self.kind}: {self.reason}"


def _big(billions: float, reason: str, probe: Family) -> Untrainable:
    return Untrainable(BIG, reason, billions, probe)


def _probe(name: str, detected_as: str, keys: dict[str, tuple[int, ...]], width: int = 0) -> Family:
    """The keys detection reads at the smallest layout it accepts (the latent and caption are not used: never trained)."""
    return Family(name, detected_as, lambda w: keys, (width,), (16, 8, 8), 64)


# The trainer's answer to a LATENT whose samples are a comfy.nested_tensor.NestedTensor (several streams in one latent)

UNTRAINABLE: dict[str, Untrainable] = {
    # -- not diffusion models -------------------------------------------------------------------------------------
    "SAM3": Untrainable(NOT_DIFFUSION, "SAM 3, promptable image and video segmentation (a detector and a tracker)"),
    "SAM31": Untrainable(NOT_DIFFUSION, "SAM 3.1, promptable image and video segmentation (SAM 3 with a multiplexed "
                                        "tracker)"),
    "RT_DETR_v4": Untrainable(NOT_DIFFUSION, "RT-DETR v4, a real-time object detector"),
    "DepthAnything3": Untrainable(NOT_DIFFUSION, "Depth Anything 3, a depth and camera-pose estimator (a DINOv2 "
                                                 "backbone with a DPT head)"),
    # -- over 1 B parameters at the smallest layout detection accepts ---------------------------------------------
    "HiDreamO1": _big(8.06, "detection returns a fixed configuration (a pixel-space transformer on a Qwen3-VL 8B "
                            "language model); no size is read from the weights",
                      _probe("hidream_o1", "HiDreamO1", {"t_embedder1.mlp.0.weight": (1,),
                                                         "x_embedder.proj1.weight": (1,)})),
    "ErnieImage": _big(8.03, "detection returns a fixed configuration (no size read from the weights)",
                       _probe("ernie_image", "ErnieImage", {"layers.0.mlp.linear_fc2.weight": (1,)})),
    "SeedVR2": _big(3.39, "detection knows only the released layouts, the smallest the 3 B one (32 blocks, 2560 "
                          "wide), told apart by their last block's keys",
                    _probe("seedvr2", "SeedVR2", {"blocks.31.mlp.all.proj_in_gate.weight": (1,),
                                                  "positive_conditioning": (1,), "negative_conditioning": (1,)})),
    "MiniMaxMusic3": _big(2.46, "its DiT is hard-coded (2048 wide, with a 4096-channel condition projector); "
                                "detection reads no size",
                          _probe("minimax_music3", "MiniMaxMusic3", {
                              "cond_layer_logits": (8,), "latent_conditioners.0.weight": (1,),
                              "diffusion_transformer.transformer.layers.0.self_attn.to_qkv.weight": (1,)})),
    "PiD": _big(1.34, "the PixelDiT backbone is fixed; detection reads only the width of the projector of the "
                      "low-quality latent (16 here, the smallest)",
                _probe("pid", "PiD", {"lq_proj.latent_proj.0.weight": (16, 16)}, width=16)),
    "PixelDiTT2I": _big(1.30, "detection returns a fixed configuration (no size read from the weights)",
                        _probe("pixeldit", "PixelDiTT2I", {"core.pixel_embedder.proj.weight": (1,)})),
    "Trellis2": _big(1.29, "a 3-D generator whose sub-models detection fixes; the smallest file, the texture model "
                           "alone, is 1.29 B (the shape model 3.88 B)",
                     _probe("trellis2_texture", "Trellis2", {"shape2txt.t_embedder.mlp.0.weight": (1,)})),
    # -- diffusion models whose training needs what the trainer does not do yet -----------------------------------
    "WAN21_FlowRVS": Untrainable(NEEDS, "FlowRVS (referring video segmentation) is an image-to-image flow: its input "
                                        "is the video's latent, not noise, which it moves to a mask latent (ComfyUI's "
                                        "IMG_TO_IMG_FLOW sampling). Training it needs (source, target) latent pairs; "
                                        "the trainer refuses it: 'model: this WAN21_FlowRVS model maps a source "
                                        "latent to a target (ComfyUI's IMG_TO_IMG_FLOW sampling: its input is the "
                                        "source, not noise); training it needs (source, target) latent pairs, which "
                                        "this trainer does not take'"),
    "LotusD": Untrainable(NEEDS, "Lotus (depth and normal estimation) is an image-to-image model: its input is the "
                                 "image's latent at one fixed timestep, not noise, and its output the depth or normal "
                                 "latent (ComfyUI's IMG_TO_IMG sampling). Training it needs (image, depth) latent "
                                 "pairs; the trainer refuses it: 'model: this LotusD model maps a source latent to a "
                                 "target (ComfyUI's IMG_TO_IMG sampling: its input is the source, not noise); "
                                 "training it needs (source, target) latent pairs, which this trainer does not "
                                 "take'"),
    "MiniMaxH3": Untrainable(NEEDS, "MiniMax H3 denoises video and audio together: its LATENT is a NestedTensor of a "
                                    "video [B, 24, T, H/16, W/16] and an audio [B, 32, 2, T'] latent. The trainer "
                                    "takes such latents since LTX-2 (packed as ComfyUI's samplers pack them), but no "
                                    "tiny MiniMax H3 with its conditioning is built here yet"),
    "TripoSplat": Untrainable(NEEDS, "a 3-D generator (image to Gaussian splats): its LATENT is a NestedTensor of "
                                     "8192 shape tokens and a camera token. The trainer takes such latents since "
                                     "LTX-2, but no tiny TripoSplat with its image conditioning is built here yet"),
}

# Families other branches are adding now (issue 22): listed so the test passes meanwhile, as a warning.
