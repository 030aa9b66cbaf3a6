"""Training a model that ComfyUI's memory manager loads only partially (its low-VRAM path), on the CPU.

On a GPU, ComfyUI loads as many layers as fit and leaves the others on the offload device, casting their weights
(and applying their LoRA patches) on every forward. A CPU has no VRAM limit, so here the memory manager's last step
is forced: the training clone is loaded with a weight budget of a third of the model, exactly as ComfyUI's
``load_models_gpu`` does when the device is short of memory. Training must run and give the same losses as with the
model fully loaded (the same weights, only fetched differently). In-process, with ComfyUI as a library."""
from __future__ import annotations

import logging

import pytest
import torch

import harness

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    harness.put_comfyui_on_path()
    harness.load_pack()
    import comfy.model_management
    import comfy.sd
    import tiny_models

    path = tiny_models.write_tiny_sd3(tmp_path_factory.mktemp("partial") / "tiny_sd3.safetensors")
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path))
    return comfy, model


def partial_loader(budget_fraction: float, loaded: list):
    """ComfyUI's own final loading step (LoadedModel.model_load) with a weight budget, as in its low-VRAM branch."""
    import comfy.model_management as mm

    def load_models_gpu(models, *args, **kwargs):
        for patcher in models:
            entry = mm.LoadedModel(patcher)
            entry.model_load(lowvram_model_memory=int(patcher.model_size() * budget_fraction))
            mm.current_loaded_models.insert(0, entry)
            loaded.append(patcher)

    return load_models_gpu


def train(model, upstream_lora: dict | None = None) -> list[float]:
    from lora_trainer.nodes.train_lora import TrainLoRA
    import comfy.sd
    import tiny_models

    if upstream_lora is not None:
        model, _ = comfy.sd.load_lora_for_models(model, None, upstream_lora, 1.0, 0)
    latents = tiny_models.smooth_latents(2, tiny_models.SD3_LATENT_CHANNELS, 8, 8, seed=1)
    emb = tiny_models.caption_embeddings(2, 4, tiny_models.SD3_CONTEXT_DIM, seed=2)
    positive = [[emb[i : i + 1], {"pooled_output": emb[i].mean(0, keepdim=True)}] for i in range(2)]
    settings = {"batch_size": 1, "grad_accumulation_steps": 1, "steps": 3, "learning_rate": 0.001, "rank": 4,
                "optimizer": "AdamW", "loss_function": "MSE", "seed": 3, "training_dtype": "fp32",
                "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True,
                "existing_lora": "[None]"}
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = TrainLoRA().train([model], [{"samples": latents}], [positive], **{k: [v] for k, v in settings.items()})
    return out["result"][2]["loss"]


def upstream(model) -> dict:
    """A random LoRA on every attention projection: applied per forward by partially loaded layers."""
    from lora_trainer.nodes import comfy_bridge

    g = torch.Generator().manual_seed(5)
    lora = {}
    for prefix, key in comfy_bridge.key_map(model).items():
        if prefix.startswith("diffusion_model.") and key.endswith("attn.qkv.weight"):
            out_f, in_f = model.model.state_dict()[key].shape
            lora[f"{prefix}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.1
            lora[f"{prefix}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.1
    assert lora
    return lora


@pytest.mark.parametrize("with_upstream_lora", [False, True])
def test_partially_loaded_model_trains_like_a_fully_loaded_one(comfy, monkeypatch, caplog, with_upstream_lora):
    comfy_pkg, model = comfy
    lora = upstream(model) if with_upstream_lora else None
    full = train(model, lora)
    loaded: list = []
    monkeypatch.setattr(comfy_pkg.model_management, "load_models_gpu", partial_loader(1 / 3, loaded))
    with caplog.at_level(logging.INFO):
        part = train(model, lora)
    assert loaded, "the training clone went through the forced partial load"
    assert "loaded partially" in caplog.text, "ComfyUI left some layers offloaded (its low-VRAM path)"
    assert all(torch.isfinite(torch.tensor(part)))
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full), rtol=1e-4, atol=1e-5)
