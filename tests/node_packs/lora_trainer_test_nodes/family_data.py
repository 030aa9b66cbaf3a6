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
