"""Save Training Data Set streams to disk (issue 25): memory flat in the set's size, shards that load as the same data
set, and a save killed mid-way that leaves nothing a loader offers. Memory and kill checks run
tools/dataset_save_scale.py in a process of their own (16 x 32 x 32 latents, distinct 256 x 4096 fp16 captions)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import harness
import workflows as wfs

pytestmark = pytest.mark.fast

TOOL = harness.REPO / "tools" / "dataset_save_scale.py"
FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
ITEM_MB = (16 * 32 * 32 * 4 + 256 * 4096 * 2) / 2**20


def save_scale(n: int, folder: Path) -> dict:
    done = subprocess.run([sys.executable, str(TOOL), "--n", str(n), "--dir", str(folder)], capture_output=True,
                          text=True, timeout=600, cwd=harness.REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow("writes and reads 230 MB in two processes of their own (~30 s)")
def test_the_saves_extra_memory_does_not_grow_with_the_set(tmp_path):
    small, large = save_scale(10, tmp_path / "small"), save_scale(100, tmp_path / "large")
    assert large["file_mb"] > 9 * small["file_mb"] and large["loaded"] == 100
    # one item is ~2 MB; the save may hold ~1.5 of them, plus the interpreter's own noise
    assert large["save_anon_mb"] < 1.5 * ITEM_MB + 16, large
    assert large["save_anon_mb"] < small["save_anon_mb"] + 8, (small, large)
    assert large["load_anon_mb"] < 16, large


def visible(folder: Path) -> list[str]:
    """What Load Training Data Set would offer in ``folder`` (the pack's own listing)."""
    pack = harness.load_pack()
    return sys.modules[f"{pack.__name__}.nodes.safe_files"].listed(folder)


@pytest.mark.parametrize("shards", [False, True], ids=["one file", "shards"])
def test_a_save_killed_mid_way_leaves_nothing_a_loader_offers(tmp_path, shards):
    folder = tmp_path / "sets"
    command = [sys.executable, str(TOOL), "--n", "400", "--dir", str(folder), "--keep"]
    if shards:
        command += ["--shard-gb", "0.1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=harness.REPO)
    try:
        deadline = time.monotonic() + 300
        # the save is under way once its temporary file holds more than a header (polled: no event to wait on)
        while not any(p.is_file() and p.stat().st_size > 50 * 2**20 for p in folder.rglob(".tmp_*")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(folder.rglob(".tmp_*")), "killed before the save began"
    assert visible(folder) == []


def test_a_set_saved_in_shards_trains_the_lora_of_the_set_in_one_file(server):
    data = wfs.test_data("sd3", count=5, seed=7)
    names = []
    for prefix, shard_gb in (("sharded_save/whole", 2.0), ("sharded_save/split", 1e-6)):
        out = server.run({**data, "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
            "latents": ["data", 0], "positive": ["data", 1], "name": prefix, "shard_size_gb": shard_gb}}})
        names.append(out["outputs"]["save"]["text"][0])
    whole, split = names
    assert whole == "sharded_save/whole_00001.safetensors" and split == "sharded_save/split_00001/"
    parts = sorted(p.name for p in (server.base_dir / "output" / "training_datasets" / split).iterdir())
    assert parts == [f"part_{i:05}.safetensors" for i in range(1, 6)], "one item per shard at this size"
    choices = server.object_info("LoraTrainer_LoadTrainingDataset")["LoraTrainer_LoadTrainingDataset"]["input"][
        "required"]["dataset"][0]
    assert split in choices
    loras = []
    for name in names:
        entry = server.run(wfs.train(wfs.sd3_model(), wfs.dataset_file(name), save_prefix="sharded_save/lora",
                                     steps=3, batch_size=2, **FAST))
        loras.append(safetensors.torch.load_file(
            str(server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0])))
    assert loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
