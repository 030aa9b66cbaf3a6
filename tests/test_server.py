"""The harness itself: the server is real, workflows run, validation errors come back."""
import pytest
from safetensors.torch import load_file

import harness

pytestmark = pytest.mark.fast


def test_core_workflow_writes_a_file(server):
    wf = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/harness"}},
    }
    entry = server.run(wf, timeout=60)
    files = sorted((server.base_dir / "output" / "latents").glob("harness_*.latent"))
    assert files, entry
    assert load_file(str(files[-1]))["latent_tensor"].shape == (1, 4, 8, 8)


def test_invalid_workflow_gets_comfyui_validation_error(server):
    wf = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 0}},
          "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(harness.PromptError) as err:
        server.queue(wf)
    node_errors = err.value.payload["node_errors"]
    assert node_errors["1"]["errors"][0]["type"] == "value_smaller_than_min"


def test_pack_nodes_are_registered(server):
    info = server.object_info()
    for node_id in ("LoraTrainer_TrainLoRA", "LoraTrainer_SaveLoRA", "LoraTrainer_ApplyLoRA",
                    "LoraTrainer_LossGraph", "LoraTrainer_SaveTrainingDataset", "LoraTrainer_LoadTrainingDataset",
                    "LoraTrainerTest_TinySD15Model"):
        assert node_id in info, node_id
