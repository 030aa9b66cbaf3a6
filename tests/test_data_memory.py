"""Scaling with the data set (issue 14): the training call's memory does not grow with the number of items, loading a
data set file reads only its header, and a data set can be a folder of shards. The measurements run
tools/data_scale.py in a fresh process each (a tiny SD3 with a T5-wide text input, captions of 512 x 4096 fp32)."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib import import_module

import safetensors
import safetensors.torch
import torch

import harness
import workflows as wfs
import pytest

pytestmark = pytest.mark.slow("memory measurements in fresh processes of their own (~1 min); shard folders and mapped training stay in the fast tier")

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def data_scale(*args: str, cache=None) -> dict:
    command = [sys.executable, str(harness.REPO / "tools" / "data_scale.py"), *args]
    if cache is not None:
        command += ["--cache", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=harness.REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_training_call_takes_no_more_memory_for_400_items_than_for_20():
    # 64x64 latents (256 KB each) so that even one copy of the latents (100 MB at N = 400) shows; a copy of the
    # captions would be 3.2 GB.
    small, large = (data_scale("--n", str(n), "--steps", "2", "--latent-size", "64") for n in (20, 400))
    assert large["inputs_anon_mb"] - small["inputs_anon_mb"] > 3000, "the inputs themselves do grow with N"
    assert small["steps_seen"] == large["steps_seen"] == 2
    growth = large["extra_hwm_mb"] - small["extra_hwm_mb"]
    assert growth < 40, f"the training call took {growth:.0f} MB more at N = 400 than at N = 20 ({small}, {large})"
    assert large["extra_hwm_mb"] < 300, large


def test_loading_a_data_set_file_reads_only_its_header(tmp_path):
    loaded = data_scale("--n", "40", "--source", "file", "--load-only", cache=tmp_path)
    assert loaded["n"] == loaded["captions"] == 40
    assert loaded["file_mb"] > 300
    assert loaded["load_hwm_mb"] < 16, f"loading brought {loaded['load_hwm_mb']} MB of a {loaded['file_mb']} MB file"


def dataset_node():
    return import_module(f"{harness.load_pack().__name__}.nodes.dataset")


def saved(node, folder, name: str, samples: list, captions: list) -> str:
    """A data set file written by Save Training Data Set (in-process) into ``folder``."""
    node.dataset_dir = lambda: folder
    latents = [{"samples": torch.stack(samples)}]
    positive = [[[c[0], dict(c[1])] for c in captions]] if len({id(c) for c in captions}) > 1 else [[captions[0]]]
    return node.SaveTrainingDataset().save(latents, positive, [name])["result"][0]


def seeded(count: int, seed: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(16, 4, 4, generator=g) for _ in range(count)],
            [[torch.randn(1, 3, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]
             for _ in range(count)])


@pytest.mark.fast
def test_a_folder_of_shards_loads_every_file_in_name_order(tmp_path, monkeypatch):
    node = dataset_node()
    monkeypatch.setattr(node, "dataset_dir", lambda: tmp_path)
    first, second = seeded(3, 0), seeded(2, 1)
    names = [saved(node, tmp_path, "shards/part", *first), saved(node, tmp_path, "shards/part", *second)]
    assert names == ["shards/part_00001.safetensors", "shards/part_00002.safetensors"]
    assert node.dataset_choices() == ["shards/", *names]
    latents, positive = node.LoadTrainingDataset().load("shards/")
    want_samples, want_captions = first[0] + second[0], first[1] + second[1]
    assert len(latents) == len(positive) == 5
    for latent, cond, sample, caption in zip(latents, positive, want_samples, want_captions):
        assert torch.equal(latent["samples"][0], sample)
        assert torch.equal(cond[0][0], caption[0]) and torch.equal(cond[0][1]["pooled_output"], caption[1]["pooled_output"])


@pytest.mark.fast
def test_one_caption_for_every_image_is_stored_once_and_loads_shared(tmp_path, monkeypatch):
    node = dataset_node()
    monkeypatch.setattr(node, "dataset_dir", lambda: tmp_path)
    samples, captions = seeded(6, 2)
    name = saved(node, tmp_path, "one_caption", samples, [captions[0]] * 6)
    tensors, _ = import_module(f"{harness.load_pack().__name__}.training.mapped_safetensors").open_mapped(
        tmp_path / name)
    assert [k for k in tensors if k.endswith("cross_attn")] == ["cond.0.cross_attn"]
    latents, positive = node.LoadTrainingDataset().load(name)
    assert len(latents) == 6 and len({id(cond[0]) for cond in positive}) == 1


@pytest.mark.fast
def test_a_shard_folder_is_offered_and_trains(server):
    for seed in (0, 1):
        wf = {**wfs.test_data("sd3", count=2, seed=seed), "save": {"class_type": "LoraTrainer_SaveTrainingDataset",
                                                                     "inputs": {"latents": ["data", 0],
                                                                                "positive": ["data", 1],
                                                                                "name": "sharded_set/part"}}}
        server.run(wf)
    choices = server.object_info("LoraTrainer_LoadTrainingDataset")["LoraTrainer_LoadTrainingDataset"]["input"][
        "required"]["dataset"][0]
    assert "sharded_set/" in choices
    entry = server.run(wfs.train(wfs.sd3_model(), wfs.dataset_file("sharded_set/"), save_prefix="sharded/lora",
                                 steps=2, batch_size=4, **FAST))
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2
    lora = server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]
    with safetensors.safe_open(str(lora), framework="pt") as f:
        assert f.metadata()["ss_num_train_images"] == "4", "both shards' images were trained"


@pytest.mark.fast
def test_training_from_the_memory_mapped_file_gives_the_lora_of_the_data_itself(server):
    """Read through the map, given back after every read and read again next epoch: the same bits as in memory."""
    data = wfs.test_data("sd3", count=4, seed=5)
    saved_name = server.run({**data, "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "name": "mapped_vs_memory/set"}}})["outputs"]["save"]["text"][0]
    loras = []
    for source, prefix in ((data, "mapped_vs_memory/direct"), (wfs.dataset_file(saved_name), "mapped_vs_memory/file")):
        entry = server.run(wfs.train(wfs.sd3_model(), source, save_prefix=prefix, steps=6, batch_size=2, **FAST))
        loras.append(safetensors.torch.load_file(
            str(server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0])))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
