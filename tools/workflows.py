"""API-format workflow builders shared by the demo, the tests and the benchmarks."""
from __future__ import annotations

from typing import Any

TRAIN = "LoraTrainer_TrainLoRA"

# The node's documented defaults, fp32 so CPU runs are fast and exact.
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 1, "grad_accumulation_steps": 1, "steps": 16, "learning_rate": 0.0005, "rank": 8,
    "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16",
    "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]",
}


def sd3_model(unet_name: str = "tiny_sd3.safetensors") -> dict:
    return {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}}}


def sd15_model(seed: int = 0, dtype: str = "fp32") -> dict:
    return {"model": {"class_type": "LoraTrainerTest_TinySD15Model", "inputs": {"seed": seed, "dtype": dtype}}}


def test_data(family: str = "sd3", count: int = 4, size: int = 8, seed: int = 0, captions: str = "one per image",
              corrupt: str = "no") -> dict:
    return {"data": {"class_type": "LoraTrainerTest_TinyTrainingData", "inputs": {
        "family": family, "count": count, "height": size, "width": size, "seed": seed, "captions": captions,
        "corrupt": corrupt}}}


def dataset_file(name: str) -> dict:
    return {"data": {"class_type": "LoraTrainer_LoadTrainingDataset", "inputs": {"dataset": name}}}


def train(model: dict, data: dict, *, save_prefix: str | None = "trained/test", loss_graph: str | None = None,
          latents_from: list | None = None, **settings: Any) -> dict:
    """model + data + Train LoRA (+ Save LoRA, + Loss Graph). ``latents_from`` overrides the latents link."""
    wf = {**model, **data}
    wf["train"] = {"class_type": TRAIN, "inputs": {
        "model": ["model", 0], "latents": latents_from or ["data", 0], "positive": ["data", 1],
        **TRAIN_DEFAULTS, **settings}}
    if save_prefix is not None:
        wf["save"] = {"class_type": "LoraTrainer_SaveLoRA",
                      "inputs": {"lora": ["train", 1], "prefix": save_prefix, "steps": ["train", 3]}}
    if loss_graph is not None:
        wf["graph"] = {"class_type": "LoraTrainer_LossGraph",
                       "inputs": {"loss": ["train", 2], "filename_prefix": loss_graph}}
    return wf


def demo(dataset: str = "demo.safetensors", steps: int = 40) -> dict:
    """The demo: the tiny SD3 model and the demo data set, trained, saved, plotted."""
    return train(sd3_model(), dataset_file(dataset), save_prefix="demo/demo_lora", loss_graph="demo/loss_graph",
                 steps=steps, batch_size=2, learning_rate=0.001, training_dtype="fp32", lora_dtype="fp32",
                 gradient_checkpointing=False)


def real_world() -> dict:
    """Checkpoint loader → load image → VAE encode → CLIP text encode → train → save LoRA → loss graph."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["ckpt", 2]}},
        "caption": {"class_type": "CLIPTextEncode", "inputs": {
            "text": "photo of sks dog sitting on grass", "clip": ["ckpt", 1]}},
        "train": {"class_type": TRAIN, "inputs": {
            "model": ["ckpt", 0], "latents": ["encode", 0], "positive": ["caption", 0],
            **TRAIN_DEFAULTS, "steps": 500, "learning_rate": 0.0001, "rank": 16}},
        "save": {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
            "lora": ["train", 1], "prefix": "trained/my_lora", "steps": ["train", 3]}},
        "graph": {"class_type": "LoraTrainer_LossGraph", "inputs": {"loss": ["train", 2], "filename_prefix": "loss_graph"}},
    }


TEMPLATES = {"lora_trainer_demo_tiny_model": demo, "lora_trainer_real_world": real_world}
