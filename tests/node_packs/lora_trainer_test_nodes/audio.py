"""Test-only nodes for audio data sets: what a list of AUDIOs (and LATENTs) holds, and a stand-in for a family's
text encoder where the real one (ACE-Step 1.5's Qwen3 language models) is too large to run in a test."""
from __future__ import annotations

import hashlib

import family_models


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


class DescribeAudio:
    """Per AUDIO of a list: its waveform's shape, sample rate and digest, and its samples rounded to 16-bit PCM (the
    first ``samples`` of each channel); per LATENT of a list its shape and digest."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("INT", {"default": 8, "min": 0, "max": 1 << 20})},
                "optional": {"audio": ("AUDIO",), "latents": ("LATENT",),
                             "captions": ("STRING", {"forceInput": True}), "lyrics": ("STRING", {"forceInput": True})}}

    INPUT_IS_LIST = True
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"
    CATEGORY = "testing"

    def report(self, samples, audio=(), latents=(), captions=(), lyrics=()):
        count = samples[0]
        return {"ui": {
            "audio": [{"shape": list(a["waveform"].shape), "sample_rate": a["sample_rate"],
                       "digest": _digest(a["waveform"]),
                       "pcm": (a["waveform"][0, :, :count] * 32768).round().int().tolist()} for a in audio],
            "latents": [{"shape": list(x["samples"].shape), "digest": _digest(x["samples"])} for x in latents],
            "captions": list(captions), "lyrics": list(lyrics)}}


class FamilyCaption:
    """A stand-in for the family's text encode node: a CONDITIONING of the family's shape (tools/family_models.py),
    seeded by the caption and lyrics, so each clip's own text gives its own conditioning and equal texts equal ones."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ([f.name for f in family_models.FAMILIES],),
                             "tags": ("STRING", {"forceInput": True}), "lyrics": ("STRING", {"forceInput": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, family, tags, lyrics):
        seed = int.from_bytes(hashlib.sha256(f"{tags}\0{lyrics}".encode()).digest()[:4], "little")
        return (family_models.conditioning(family_models.BY_NAME[family], 1, seed),)
