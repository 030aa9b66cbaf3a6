"""Test-only node: the seeded LATENT and CONDITIONING of one model family (see tools/family_models.py)."""
from __future__ import annotations

import family_models


class FamilyData:
    """``count`` latents of the family's shape (4-D or 5-D) and one caption per latent, with what that family's text
    encoding carries (pooled output or None, guidance, attention mask)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ([f.name for f in family_models.FAMILIES],),
                             "count": ("INT", {"default": 2, "min": 1, "max": 16}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("LATENT", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, count, seed):
        spec = family_models.BY_NAME[family]
        return ({"samples": family_models.latents(spec, count, seed)},
                family_models.conditioning(spec, count, seed + 1))


class FamilyAudio:
    """``count`` seeded audio latents of an audio+video family (its second stream), as an audio LATENT: ComfyUI's
    own LTXVConcatAVLatent joins them with the video latents into the family's audio+video LATENT."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ([f.name for f in family_models.FAMILIES if f.audio is not None],),
                             "count": ("INT", {"default": 2, "min": 1, "max": 16}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, count, seed):
        return ({"samples": family_models.audio_latents(family_models.BY_NAME[family], count, seed), "type": "audio"},)


class VideoClips:
    """One seeded clip per frame count in ``frames`` (e.g. "2,3"), each its own LATENT with its own caption: a
    list of 5-D latents of mixed lengths, as a folder of clips gives."""

    @classmethod
    def INPUT_TYPES(cls):
        video = [f.name for f in family_models.FAMILIES if len(f.latent) == 4]
        return {"required": {"family": (video,), "frames": ("STRING", {"default": "2,3"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("LATENT", "CONDITIONING")
    OUTPUT_IS_LIST = (True, True)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, frames, seed):
        import dataclasses

        spec = family_models.BY_NAME[family]
        channels, _, height, width = spec.latent
        latents, captions = [], []
        for i, t in enumerate(int(f) for f in frames.split(",")):
            clip = dataclasses.replace(spec, latent=(channels, t, height, width))
            latents.append({"samples": family_models.latents(clip, 1, seed + i)})
            captions.append(family_models.conditioning(spec, 1, seed + 100 + i))
        return (latents, captions)
