"""Hostile and careless inputs through the real server: a clear error that names the input, nothing half-written
visible (issue 10; more cases to come)."""
import os
import shutil
import time

import pytest

import harness
import workflows as wfs

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def combo(server, node: str, name: str) -> list[str]:
    info = server.object_info(node)[node]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}[name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_a_model_checkpoint_as_existing_lora_is_named_as_such(server):
    loras = server.base_dir / "models" / "loras"
    shutil.copy(server.base_dir / "models" / "diffusion_models" / "tiny_sd3.safetensors", loras / "full_model.safetensors")
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="hostile/full", steps=1,
                   existing_lora="full_model.safetensors", **FAST)
    with pytest.raises(harness.PromptError, match=r"existing_lora: 'full_model.safetensors' is not a LoRA file "
                                                   r"\(it holds full model weights"):
        server.run(wf)
    assert server.get("/system_stats")  # the server still answers


@pytest.mark.parametrize("field, node", [("prefix", "save"), ("filename_prefix", "graph")])
def test_an_absurdly_long_name_is_a_clear_error(server, field, node):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=1, loss_graph="graphs/long", **FAST)
    wf[node]["inputs"][field] = "a" * 300
    with pytest.raises(harness.PromptError, match=rf"{field}: 'a{{40}}\.\.\.' is 300 bytes long"):
        server.run(wf)
    assert not list((server.base_dir / "models" / "loras").glob(".tmp_*"))


def test_leftovers_of_a_killed_save_are_never_listed_and_are_cleaned_up(server):
    """A save killed half-way leaves a temporary file: never offered by any loader, removed by a later save."""
    loras = server.base_dir / "models" / "loras"
    (loras / "killed").mkdir(exist_ok=True)
    old_style = loras / "killed" / ".tmp_oldstyle.safetensors"  # what earlier versions left behind
    new_style = loras / "killed" / ".tmp_newstyle.partial"
    for leftover in (old_style, new_style):
        leftover.write_bytes(b"")
        hours_ago = time.time() - 2 * 3600
        os.utime(leftover, (hours_ago, hours_ago))
    for node, name in (("LoraTrainer_TrainLoRA", "existing_lora"), ("LoraLoaderModelOnly", "lora_name")):
        listed = combo(server, node, name)
        assert not any("newstyle" in f for f in listed), f"{node} lists a temporary file: {listed}"
    assert not any("oldstyle" in f for f in combo(server, "LoraTrainer_TrainLoRA", "existing_lora"))
    server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="killed/next", steps=1, **FAST))
    assert not old_style.exists() and not new_style.exists(), "stale temporary files are removed by the next save"
    assert [p.name for p in (loras / "killed").iterdir()] == ["next_1_steps_00001.safetensors"]


@pytest.mark.parametrize("family, message", [
    ("sd15", r"latents: image 0 has 4 channels \(shape \(4, 8, 8\)\); this SD3 model takes latents of its own VAE "
             r"\(16 channels"),
    ("wan", r"latents: item 0 has shape \(4, 16, 3, 8, 8\); this SD3 model takes 4-D images"),
])
def test_latents_that_do_not_fit_the_model_are_blamed_on_latents(server, family, message):
    """Checked against the model's latent format before any forward (they used to surface as a conditioning misfit
    or an IndexError from inside the model)."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data(family), save_prefix="hostile/latents", steps=1, **FAST)
    wf["sd3_captions"] = wfs.test_data("sd3")["data"]
    wf["train"]["inputs"]["positive"] = ["sd3_captions", 1]
    with pytest.raises(harness.PromptError, match=message):
        server.run(wf)
