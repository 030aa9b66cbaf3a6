"""Writes lora/diffusers_layouts.json: for each diffusers model class a LoRA file may name (lora/consumers.py), the
module paths peft can adapt (Linear and Conv layers), block indices as ``#``. Read from diffusers itself: each class
is built on the meta device (no memory) at its default configuration and at the others listed here, so one list
covers every variant's modules. tests/test_consumers.py regenerates it and compares.

    .venv/bin/python tools/diffusers_layouts.py          # rewrite the file
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Configurations beyond each class's default that add modules: SDXL's added-conditioning embedding and linear
# projections; SD3.5's q/k norms and second attention; Flux dev's guidance embedding.
VARIANTS: dict[str, list[dict]] = {
    "UNet2DConditionModel": [{}, {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                                  "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
                                  "cross_attention_dim": 2048, "transformer_layers_per_block": (1, 2, 10, 10)}],
    "SD3Transformer2DModel": [{}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}],
    "FluxTransformer2DModel": [{}, {"guidance_embeds": True}],
}


def layouts() -> dict[str, list[str]]:
    import diffusers
    from torch import nn

    from lora import consumers
    out = {}
    for model_class in sorted({d.model_class for d in consumers.DIFFUSERS.values()}):
        found: set[str] = set()
        for overrides in VARIANTS[model_class]:
            with torch.device("meta"):
                model = getattr(diffusers, model_class)(**overrides)
            found |= {consumers.pattern(name) for name, module in model.named_modules()
                      if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
        out[model_class] = sorted(found)
    return out


def main() -> None:
    from lora.consumers import LAYOUTS_FILE as path
    path.write_text(json.dumps(layouts(), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
