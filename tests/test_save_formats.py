"""Save LoRA's formats on the tiny models, through the real server: every algorithm saved in ComfyUI's and kohya's
naming (LyCORIS names for LoHa/LoKr/OFT) reloads through ComfyUI's own loader as the training node's model_with_lora;
diffusers refuses what it cannot hold; a LoRA from ComfyUI's own training node needs its model for other namings; the
self-check refuses files ComfyUI would not fully load."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import harness
import workflows as wfs

pytestmark = pytest.mark.fast

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False, "learning_rate": 0.01}


def reloaded(tag: str, fmt: str, prefix: str, lora_from: list, model_a: list) -> dict:
    return {
        f"save_{tag}": {"class_type": "LoraTrainer_SaveLoRA", "inputs": {"lora": lora_from, "prefix": prefix,
                                                                         "format": fmt}},
        f"reload_{tag}": {"class_type": "LoraTrainerTest_LoadLoraByName", "inputs": {
            "model": ["model", 0], "lora_name": [f"save_{tag}", 0], "strength": 1.0}},
        f"cmp_{tag}": {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": model_a, "model_b": [f"reload_{tag}", 0], "latents": ["data", 0], "positive": ["data", 1],
            "nonce": 0, "points": 2}},
    }


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_every_algorithm_reloads_from_comfyui_and_kohya_names_as_trained(server, algorithm):
    # alpha 4 at rank 8: a file that lost its alpha would load at twice the strength
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=2), save_prefix=None, steps=2, algorithm=algorithm,
                   alpha=4.0, **FAST)
    for fmt in ("comfyui", "kohya"):
        wf.update(reloaded(fmt, fmt, f"formats/{algorithm}_{fmt}", ["train", 1], ["train", 0]))
    wf["cmp_base"] = {**wf["cmp_kohya"], "inputs": {**wf["cmp_kohya"]["inputs"], "model_a": ["model", 0]}}
    log_start = len(server.log_text())
    entry = server.run(wf)
    assert "lora key not loaded" not in server.log_text()[log_start:]
    moved = max(entry["outputs"]["cmp_base"]["rel_diff"])
    assert moved > 1e-4, f"{algorithm}: the LoRA must change the output ({moved})"
    for fmt in ("comfyui", "kohya"):
        assert max(entry["outputs"][f"cmp_{fmt}"]["rel_diff"]) < 1e-5, (algorithm, fmt)
    name = entry["outputs"]["save_kohya"]["text"][0]
    with safe_open(str(server.base_dir / "models" / "loras" / name), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:3]
    marker = {"LoRA": ".lora_down.weight", "LoHa": ".hada_w1_a", "LoKr": ".lokr_w1", "OFT": ".oft_blocks"}[algorithm]
    assert any(k.endswith(marker) for k in keys) and any(k.endswith(".alpha") for k in keys)


def test_diffusers_names_for_a_lora_and_a_clear_refusal_for_loha(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=2), save_prefix=None, steps=2, **FAST)
    wf.update(reloaded("diffusers", "diffusers", "formats/lora_diffusers", ["train", 1], ["train", 0]))
    entry = server.run(wf)
    assert max(entry["outputs"]["cmp_diffusers"]["rel_diff"]) < 1e-5
    name = entry["outputs"]["save_diffusers"]["text"][0]
    with safe_open(str(server.base_dir / "models" / "loras" / name), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".to_q.lora_A" in k for k in keys)  # SD3's fused qkv split into diffusers' to_q/to_k/to_v
    wf["train"]["inputs"]["algorithm"] = "LoHa"
    with pytest.raises(harness.PromptError, match="cannot be saved as diffusers: the diffusers format holds plain "
                                                  "LoRA factors only"):
        server.run(wf)


def test_a_lora_from_another_node_needs_its_model_for_other_namings(server):
    """A LORA_MODEL without our layer names (as ComfyUI's own training node gives): kohya needs `model`; with it the
    file is saved and checked; with the wrong model, the error says the LoRA does not fit."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=2), save_prefix=None, steps=2, **FAST)
    wf["plain"] = {"class_type": "LoraTrainerTest_PlainDict", "inputs": {"lora": ["train", 1]}}
    wf.update(reloaded("kohya", "kohya", "formats/foreign_kohya", ["plain", 0], ["train", 0]))
    with pytest.raises(harness.PromptError, match="format: saving as kohya needs the model the LoRA belongs to"):
        server.run(wf)
    wf["save_kohya"]["inputs"]["model"] = ["model", 0]
    entry = server.run(wf)
    assert max(entry["outputs"]["cmp_kohya"]["rel_diff"]) < 1e-5
    wf["wan"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}}
    wf["save_kohya"]["inputs"]["model"] = ["wan", 0]
    with pytest.raises(harness.PromptError, match="model: the LoRA does not fit this WAN21"):
        server.run(wf)


def test_the_self_check_refuses_a_file_comfyui_would_not_fully_load():
    """check_loads_as (ComfyUI's own loader, in this process): a key it does not read, or a layer left out or only
    partly covered, is an error."""
    pack = harness.load_pack()
    from importlib import import_module

    bridge = import_module(f"{pack.__name__}.nodes.comfy_bridge")
    key_formats = import_module(f"{pack.__name__}.lora.key_formats")
    errors = import_module(f"{pack.__name__}.lora.adapter_set")
    p = "diffusion_model."
    naming = key_formats.ModelNaming(
        {f"{p}a": f"{p}a.weight", f"{p}b": f"{p}b.weight", "lora_unet_a": f"{p}a.weight", "lora_unet_b": f"{p}b.weight",
         "transformer.q": (f"{p}a.weight", (0, 0, 2)), "transformer.k": (f"{p}a.weight", (0, 2, 2))},
        {f"{p}a.weight": (4, 3), f"{p}b.weight": (2, 3)}, "Flux")  # a family with kohya names: its layers' own
    gen = torch.Generator().manual_seed(0)
    ours = {f"{p}{m}.{s}": torch.randn(shape, generator=gen) for m, rows in (("a", 4), ("b", 2))
            for s, shape in (("lora_down.weight", (2, 3)), ("lora_up.weight", (rows, 2)))}
    bridge.check_loads_as(naming, naming.convert(ours, "kohya"), ours)  # a good file passes
    bridge.check_loads_as(naming, ours, ours)
    kohya = naming.convert(ours, "kohya")
    for broken, why in (({**kohya, "lora_unet_c.lora_up.weight": torch.zeros(2, 2)}, "leaves 1 keys"),
                        ({k: v for k, v in kohya.items() if not k.startswith("lora_unet_b")}, "does not patch all"),
                        ({k: v for k, v in {**kohya, "transformer.q.lora_A.weight": ours[f"{p}a.lora_down.weight"],
                                             "transformer.q.lora_B.weight": torch.zeros(2, 2)}.items()
                          if not k.startswith("lora_unet_a")}, "does not patch all")):
        with pytest.raises(errors.LoraFileError, match=why):
            bridge.check_loads_as(naming, broken, ours)
