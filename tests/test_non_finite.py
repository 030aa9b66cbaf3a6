"""Non-finite values through the real server (issue 10): NaN/inf in any input is an error naming that input and the
item; a step whose loss or gradients turn non-finite is skipped and reported; several in a row stop the run keeping
the last finite LoRA; no file the pack writes ever holds NaN or inf."""
import re

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import harness
import workflows as wfs
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("breadth of NaN/inf cases; the fast tier keeps one input error, one refused save and a diverging run")

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def lora_files(server, folder: str) -> list:
    root = server.base_dir / "models" / "loras" / folder
    return sorted(root.rglob("*")) if root.exists() else []


def assert_finite_file(path) -> dict[str, str]:
    """The file opens as safetensors, every tensor is finite; returns its metadata."""
    tensors = safetensors.torch.load_file(str(path))
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values()), path
    with safetensors.safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("corrupt, message", [
    ("nan", r"latents: item 0, image 0 holds NaN or infinite values"),
    ("inf", r"latents: item 0, image 0 holds NaN or infinite values"),
    ("nan caption", r"positive: caption 3 holds NaN or infinite values \(its embedding\)"),
    ("inf pooled output", r"positive: caption 3 holds NaN or infinite values \('pooled_output'\)"),
])
def test_non_finite_training_data_is_an_error_naming_the_input_and_item(server, corrupt, message):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", corrupt=corrupt), save_prefix="nonfinite/data", steps=1,
                   **FAST)
    with pytest.raises(harness.PromptError, match=message):
        server.run(wf)
    assert lora_files(server, "nonfinite") == []


@pytest.mark.parametrize("corrupt", fast_cases(["nan", "nan caption"], "nan caption"))
def test_save_training_dataset_refuses_non_finite_data(server, corrupt):
    wf = {**wfs.test_data("sd3", corrupt=corrupt), "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "name": "nonfinite/refused"}}}
    with pytest.raises(harness.PromptError, match=r"(latents|positive): .* holds NaN or infinite values"):
        server.run(wf)
    assert not (server.base_dir / "output" / "training_datasets" / "nonfinite").exists()


def test_a_non_finite_existing_lora_is_an_error_naming_it(server):
    server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nonfinite_src/good", steps=1, **FAST))
    good = next(p for p in lora_files(server, "nonfinite_src") if p.suffix == ".safetensors")
    tensors = safetensors.torch.load_file(str(good))
    key = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    tensors[key][0, 0] = float("nan")
    safetensors.torch.save_file(tensors, str(good.with_name("nan_lora.safetensors")))
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nonfinite/continued", steps=1,
                   existing_lora="nonfinite_src/nan_lora.safetensors", **FAST)
    with pytest.raises(harness.PromptError, match=re.escape(
            f"existing_lora: 'nonfinite_src/nan_lora.safetensors' holds NaN or infinite values (in '{key}')")):
        server.run(wf)
    assert lora_files(server, "nonfinite") == []


@pytest.mark.fast
def test_a_non_finite_value_in_a_dataset_file_is_an_error_before_any_step(server):
    wf = {**wfs.test_data("sd3"), "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "name": "nonfinite_src/clean"}}}
    name = server.outputs(server.run(wf), "save")["text"][0]
    folder = server.base_dir / "output" / "training_datasets"
    tensors = safetensors.torch.load_file(str(folder / name))
    with safetensors.safe_open(str(folder / name), framework="pt") as f:
        metadata = f.metadata()
    tensors["cond.2.pooled_output"][0, 0] = float("-inf")
    safetensors.torch.save_file(tensors, str(folder / "nonfinite_src" / "poisoned.safetensors"), metadata=metadata)
    wf = wfs.train(wfs.sd3_model(), wfs.dataset_file("nonfinite_src/poisoned.safetensors"),
                   save_prefix="nonfinite/from_file", steps=1, **FAST)
    # Loading reads only the file's header (a data set may be larger than RAM): Train LoRA's check of its inputs
    # finds the value, before any step, naming the input and the item.
    with pytest.raises(harness.PromptError, match=re.escape(
            "positive: caption 2 holds NaN or infinite values ('pooled_output')")):
        server.run(wf)
    assert lora_files(server, "nonfinite") == []


@pytest.mark.parametrize("value", ["nan", "-inf"])
def test_save_lora_never_writes_a_non_finite_lora(server, value):
    """A LORA_MODEL from elsewhere (e.g. a diverged run of ComfyUI's own node) holding NaN/inf is refused."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nonfinite/poisoned", steps=1, **FAST)
    wf["poison"] = {"class_type": "LoraTrainerTest_PoisonLora", "inputs": {"lora": ["train", 1], "value": value}}
    wf["save"]["inputs"]["lora"] = ["poison", 0]
    with pytest.raises(harness.PromptError, match=r"lora: holds NaN or infinite values \(in 'diffusion_model\.[^']+"
                                                   r"lora_up\.weight'\); nothing was written"):
        server.run(wf)
    assert lora_files(server, "nonfinite") == []


@pytest.mark.parametrize("optimizer, training_dtype", fast_cases([("Adam", "bf16"), ("AdamW", "fp32")], ("AdamW", "fp32")))
def test_a_diverging_run_stops_with_a_clear_error_keeping_the_last_finite_lora(server, optimizer, training_dtype):
    """Adam at learning rate 1.0: the loss turns NaN after a few steps and stays so."""
    before = set(lora_files(server, "diverged"))
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nonfinite/diverged", steps=40,
                   learning_rate=1.0, optimizer=optimizer, training_dtype=training_dtype)
    with pytest.raises(harness.PromptError) as caught:
        server.run(wf)
    error = next(m[1] for m in caught.value.payload["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_type"].endswith("TrainingDiverged"), error["exception_type"]
    found = re.match(r"learning_rate: the training diverged: the loss or its gradients were NaN or infinite in 5 "
                     r"steps in a row \(steps (\d+)-(\d+)\), so it stopped\. Lower learning_rate \(it is 1\) and train "
                     r"again\. The LoRA of the last finite step \((\d+) steps in all\) is kept as loras/"
                     r"(diverged/diverged_step\3_\d{5}\.safetensors)\.", error["exception_message"])
    assert found, error["exception_message"]
    first, last, steps, name = int(found[1]), int(found[2]), int(found[3]), found[4]
    assert last - first == 4 and steps < first
    kept = server.base_dir / "models" / "loras" / name
    assert set(lora_files(server, "diverged")) - before == {kept}
    assert assert_finite_file(kept)["lora_trainer.steps"] == str(steps)
    assert lora_files(server, "nonfinite") == [], "Save LoRA never ran"
    log = server.log_text()
    assert f"step {last} skipped: its loss (nan) or gradients are not finite" in log


def test_skipped_steps_are_reported_and_training_goes_on(server):
    """SGD at learning rate 1.0 on the tiny model: a few steps overflow to NaN and are skipped, the run finishes;
    the step count, the loss map, the chart and the saved file account for them."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nonfinite_ok/sgd", loss_graph="nonfinite/sgd",
                   steps=40, learning_rate=1.0, optimizer="SGD", **FAST)
    entry = server.run(wf)
    ui = server.outputs(entry, "train")
    losses, skipped = ui["lora_trainer_loss"], ui["lora_trainer_skipped"]
    assert skipped, "this setting is expected to overflow in some steps"
    assert len(losses) + len(skipped) == 40 and all(isinstance(v, float) for v in losses)
    saved = server.outputs(entry, "save")["text"][0]
    assert saved.startswith(f"nonfinite_ok/sgd_{len(losses)}_steps_")
    assert assert_finite_file(server.base_dir / "models" / "loras" / saved)["ss_steps"] == str(len(losses))
    log = server.log_text()
    assert all(f"step {s} skipped: its loss" in log for s in skipped)
    image = server.outputs(entry, "graph")["images"][0]
    png = server.base_dir / "output" / image["subfolder"] / image["filename"]
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    red = ((pixels[:, 0] > 180) & (pixels[:, 1] < 80) & (pixels[:, 2] < 80)).sum()
    assert red > 100, "skipped steps are marked in red on the chart"
