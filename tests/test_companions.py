"""Companion nodes through the real server, and type compatibility with ComfyUI's own training nodes both ways."""
import json

from safetensors import safe_open
from safetensors.torch import load_file

import workflows as wfs
import pytest

pytestmark = pytest.mark.fast

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def test_save_lora_writes_metadata_and_never_overwrites(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="meta/same", steps=2, seed=31, rank=4, **FAST)
    names = []
    for _ in range(3):  # the same save three times (cache cleared so it really runs): three files
        server.free()
        names.append(server.run(wf)["outputs"]["save"]["text"][0])
    assert len(set(names)) == 3 and all(n.startswith("meta/same_2_steps_") for n in names)
    path = server.base_dir / "models" / "loras" / names[0]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["lora_trainer.steps"] == "2" and meta["lora_trainer.rank"] == "4"
    assert meta["lora_trainer.alpha"] == "4.0" and meta["lora_trainer.algorithm"] == "LoRA"
    assert meta["lora_trainer.base_model"] == "SD3"
    settings = json.loads(meta["lora_trainer.training_settings"])
    assert settings["seed"] == 31 and settings["optimizer"] == "AdamW"
    assert meta["lora_trainer.date"].startswith("20")
    assert not list(path.parent.glob(".tmp_*"))


def test_save_prefix_cannot_leave_the_loras_folder(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="../../escape", steps=1, **FAST)
    try:
        server.run(wf)
    except Exception as e:
        assert "prefix: '../../escape' must be a relative name" in str(e)
    else:
        raise AssertionError("a prefix with '..' was accepted")


def test_loss_graph_with_a_single_value(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=None, loss_graph="graphs/one", steps=1, **FAST)
    image = server.run(wf)["outputs"]["graph"]["images"][0]
    assert (server.base_dir / "output" / image["subfolder"] / image["filename"]).stat().st_size > 1000


def test_dataset_round_trip_trains(server):
    save = {**wfs.test_data("sd3", count=3), "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "name": "sets/three"}}}
    name = server.run(save)["outputs"]["save"]["text"][0]
    stored = load_file(str(server.base_dir / "output" / "training_datasets" / name))
    assert set(stored) >= {"latent.0", "latent.2", "cond.1.cross_attn", "cond.2.pooled_output"}
    entry = server.run(wfs.train(wfs.sd3_model(), wfs.dataset_file(name), steps=2, **FAST))
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2


def builtin(server, class_type: str, inputs: dict) -> dict:
    """A node of ComfyUI's own with the given inputs, plus the defaults of any required widget this ComfyUI version
    has that the given inputs lack (e.g. LoraModelLoader's `bypass` in newer versions)."""
    spec = server.object_info(class_type)[class_type]["input"]["required"]
    for name, (kind, *rest) in spec.items():
        if name not in inputs and rest and "default" in rest[0]:
            inputs[name] = rest[0]["default"]
        elif name not in inputs and isinstance(kind, list) and kind:
            inputs[name] = kind[0]
    return {"class_type": class_type, "inputs": inputs}


def test_comfyui_builtin_nodes_accept_ours_and_ours_accept_theirs(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=None, steps=2, **FAST)
    wf["their_save"] = builtin(server, "SaveLoRA", {"lora": ["train", 1], "prefix": "loras/ours_by_them",
                                                    "steps": ["train", 3]})
    wf["their_apply"] = builtin(server, "LoraModelLoader", {"model": ["model", 0], "lora": ["train", 1],
                                                            "strength_model": 1.0})
    wf["their_graph"] = builtin(server, "LossGraphNode", {"loss": ["train", 2], "filename_prefix": "theirs"})
    wf["cmp"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["train", 0], "model_b": ["their_apply", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": 7}}
    entry = server.run(wf)
    assert entry["outputs"]["cmp"]["rel_diff"][0] < 1e-6
    assert list((server.base_dir / "output" / "loras").glob("ours_by_them*.safetensors"))

    # Their training node (fed a list of single latents: it crashes on one batch) into our companions. Its outputs
    # moved between ComfyUI versions (0.33 dropped the MODEL output), so they are found by type.
    outputs = server.object_info("TrainLoraNode")["TrainLoraNode"]["output"]
    lora_out, loss_out, steps_out = (outputs.index(t) for t in ("LORA_MODEL", "LOSS_MAP", "INT"))
    theirs = {**wfs.sd3_model(), **wfs.test_data("sd3", count=2),
              "split": {"class_type": "LoraTrainerTest_LatentList", "inputs": {"latents": ["data", 0],
                                                                               "second_half_scale": 1}},
              "train": builtin(server, "TrainLoraNode", {
                  "model": ["model", 0], "latents": ["split", 0], "positive": ["data", 1], "batch_size": 1,
                  "grad_accumulation_steps": 1, "steps": 1, "learning_rate": 0.0005, "rank": 4, "optimizer": "AdamW",
                  "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32",
                  "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]"}),
              "save": {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
                  "lora": ["train", lora_out], "prefix": "theirs/x", "steps": ["train", steps_out]}},
              "apply": {"class_type": "LoraTrainer_ApplyLoRA", "inputs": {
                  "model": ["model", 0], "lora": ["train", lora_out], "strength": 0.5}},
              "graph": {"class_type": "LoraTrainer_LossGraph", "inputs": {
                  "loss": ["train", loss_out], "filename_prefix": "graphs/theirs"}},
              "cmp": {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
                  "model_a": ["model", 0], "model_b": ["apply", 0], "latents": ["data", 0], "positive": ["data", 1],
                  "nonce": 8}}}
    entry = server.run(theirs)
    assert entry["outputs"]["save"]["text"][0].startswith("theirs/x_1_steps_")
    assert entry["outputs"]["graph"]["images"]
