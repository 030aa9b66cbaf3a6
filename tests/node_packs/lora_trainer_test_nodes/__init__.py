"""Test-only ComfyUI nodes: data sources the core nodes lack (a tiny SD1.5 UNet, seeded latents and captions).

Loaded into the test server next to the pack; never shipped (`.comfyignore` keeps tests/ out of archives).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
import eval_loss  # noqa: E402
import tiny_models  # noqa: E402


class TinySD15Model:
    """An SD1.5-architecture UNet at toy size (conv + attention, ε-prediction), seeded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "dtype": (["fp32", "fp16", "bf16"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed, dtype="fp32"):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        return (tiny_models.tiny_sd15_patcher(seed, dtype=dtype),)


class TinyTrainingData:
    """Seeded latents with spatial structure plus one caption embedding per image (or one shared)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (["sd3", "sd15", "wan"],),
            "count": ("INT", {"default": 4, "min": 1, "max": 64}),
            "height": ("INT", {"default": 8, "min": 2, "max": 128}),
            "width": ("INT", {"default": 8, "min": 2, "max": 128}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "captions": (["one per image", "one shared", "none"],),
            "corrupt": (["no", "nan", "inf", "empty", "no pooled output", "nan caption", "inf pooled output"],),
        }}

    RETURN_TYPES = ("LATENT", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, family, count, height, width, seed, captions, corrupt):
        channels, dim = {"sd3": (tiny_models.SD3_LATENT_CHANNELS, tiny_models.SD3_CONTEXT_DIM),
                         "sd15": (tiny_models.SD15_LATENT_CHANNELS, tiny_models.SD15_CONTEXT_DIM),
                         "wan": (tiny_models.WAN_LATENT_CHANNELS, tiny_models.WAN_TEXT_DIM)}[family]
        latents = tiny_models.smooth_latents(count, channels, height, width, seed)
        if family == "wan":  # video: 3 latent frames drifting over time
            latents = torch.stack([latents.roll(t, dims=-1) for t in range(3)], dim=2)
        if corrupt in ("nan", "inf"):
            latents[0, 0, 0, 0] = float(corrupt)
        n_caps = {"one per image": count, "one shared": 1, "none": 0}[captions]
        embeds = tiny_models.caption_embeddings(n_caps, 6, dim, seed + 1)
        conditioning = []
        for i in range(n_caps):
            extra = {}
            if family == "sd3" and corrupt != "no pooled output":
                extra["pooled_output"] = embeds[i].mean(0, keepdim=True)
            conditioning.append([embeds[i : i + 1].clone(), extra])
        if corrupt == "empty":
            latents = latents[:0]
        if corrupt == "nan caption":
            conditioning[-1][0][0, 1, 2] = float("nan")
        if corrupt == "inf pooled output":
            conditioning[-1][1]["pooled_output"][0, 3] = float("inf")
        return ({"samples": latents}, conditioning)


class LatentList:
    """Splits a LATENT batch into a list of single-image LATENTs (ComfyUI's list mode), optionally resized."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latents": ("LATENT",), "second_half_scale": ("INT", {"default": 1, "min": 1, "max": 4})}}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "split"
    CATEGORY = "testing"

    def split(self, latents, second_half_scale):
        samples = latents["samples"]
        out = []
        for i in range(samples.shape[0]):
            s = samples[i : i + 1]
            if i >= samples.shape[0] // 2 and second_half_scale > 1:
                s = torch.nn.functional.interpolate(s, scale_factor=second_half_scale, mode="nearest")
            out.append({"samples": s})
        return (out,)


class EvalLoss:
    """Native-objective MSE of a model on the training latents at fixed sigmas and noise."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "latents": ("LATENT",), "positive": ("CONDITIONING",),
                             "seed": ("INT", {"default": 123, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, latents, positive, seed):
        return {"ui": {"eval_loss": [eval_loss.eval_loss(model, latents["samples"], positive, seed)]}}


class CompareModels:
    """Relative difference and digests of two models' outputs on the same fixed inputs."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_a": ("MODEL",), "model_b": ("MODEL",), "latents": ("LATENT",),
                             "positive": ("CONDITIONING",), "nonce": ("INT", {"default": 0, "min": 0})},
                "optional": {"points": ("INT", {"default": 3, "min": 1, "max": 16,
                                                "tooltip": "noise levels per latent (each is one forward per model)"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model_a, model_b, latents, positive, nonce, points=3):
        import hashlib
        import math

        samples = latents["samples"]
        a, _ = eval_loss.denoised_and_errors(model_a, samples, positive, 5, points=points)
        b, _ = eval_loss.denoised_and_errors(model_b, samples, positive, 5, points=points)
        rel = lambda x, y: float((x - y).norm() / x.norm().clamp_min(1e-12))
        digest = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()
        ui = {"rel_diff": [rel(a, b)], "digest_a": [digest(a)], "digest_b": [digest(b)]}
        if getattr(samples, "is_nested", False):  # packed rows of streams: the difference on each stream as well
            sizes = [math.prod(t.shape[1:]) for t in samples.unbind()]
            ui["rel_diff_streams"] = [rel(x, y) for x, y in zip(a.flatten(1).split(sizes, 1),
                                                                b.flatten(1).split(sizes, 1))]
        return {"ui": ui}


NODE_CLASS_MAPPINGS = {
    "LoraTrainerTest_EvalLoss": EvalLoss,
    "LoraTrainerTest_CompareModels": CompareModels,
    "LoraTrainerTest_TinySD15Model": TinySD15Model,
    "LoraTrainerTest_TinyTrainingData": TinyTrainingData,
    "LoraTrainerTest_LatentList": LatentList,
}

from .training_probe import RecordTrainingCalls, TrainingPairs  # noqa: E402

NODE_CLASS_MAPPINGS.update({
    "LoraTrainerTest_RecordTrainingCalls": RecordTrainingCalls,
    "LoraTrainerTest_TrainingPairs": TrainingPairs,
})

from .family_data import FamilyAudio, FamilyData, VideoClips  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_FamilyData"] = FamilyData
NODE_CLASS_MAPPINGS["LoraTrainerTest_VideoClips"] = VideoClips
NODE_CLASS_MAPPINGS["LoraTrainerTest_FamilyAudio"] = FamilyAudio

from .poison import PoisonLora  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_PoisonLora"] = PoisonLora

from . import held_save  # noqa: E402

held_save.install()  # a no-op unless the server's environment asks to hold saves (tests/test_process_faults.py)

from .load_by_name import LoadLoraByName, PlainDict  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_LoadLoraByName"] = LoadLoraByName
NODE_CLASS_MAPPINGS["LoraTrainerTest_PlainDict"] = PlainDict

from .fail_on_rank import FailOnRank  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_FailOnRank"] = FailOnRank

from .dataset_report import DescribeDataset  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_DescribeDataset"] = DescribeDataset

from .conditioning_list import ConditioningList  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_ConditioningList"] = ConditioningList

from .audio import DescribeAudio, FamilyCaption  # noqa: E402

NODE_CLASS_MAPPINGS["LoraTrainerTest_DescribeAudio"] = DescribeAudio
NODE_CLASS_MAPPINGS["LoraTrainerTest_FamilyCaption"] = FamilyCaption
