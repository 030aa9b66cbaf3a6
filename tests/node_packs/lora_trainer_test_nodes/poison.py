"""A LORA_MODEL with one non-finite value: what a diverged run of another trainer (e.g. the built-in node) hands on."""
import torch


class PoisonLora:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": ("LORA_MODEL",), "value": (["nan", "inf", "-inf"],)}}

    RETURN_TYPES = ("LORA_MODEL",)
    FUNCTION = "poison"
    CATEGORY = "testing"

    def poison(self, lora, value):
        out = {k: v.clone() for k, v in lora.items()}  # a plain dict, as ComfyUI's own training node returns
        key = sorted(k for k in out if k.endswith("lora_up.weight"))[0]
        out[key].view(-1)[0] = float(value)
        return (out,)
