"""The training node through the real server: learning, determinism, fidelity of files, continuing, bad inputs."""
import hashlib

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import harness
import workflows as wfs

pytestmark = pytest.mark.fast

ALGORITHMS = ["LoRA", "LoHa", "LoKr", "OFT"]
FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def lora_digest(path) -> str:
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].float().numpy().tobytes())
    return h.hexdigest()


def saved_path(server, entry, node="save"):
    return server.base_dir / "models" / "loras" / entry["outputs"][node]["text"][0]


def family_model(family):
    return wfs.sd3_model() if family == "sd3" else wfs.sd15_model()


@pytest.mark.parametrize("family", ["sd3", "sd15"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_training_lowers_native_loss_and_file_reproduces_model(server, family, algorithm):
    prefix = f"learn/{family}_{algorithm}"
    wf = wfs.train(family_model(family), wfs.test_data(family, count=4, size=8), save_prefix=prefix,
                   steps=40, learning_rate=0.01, algorithm=algorithm, **FAST)
    wf["before"] = {"class_type": "LoraTrainerTest_EvalLoss",
                    "inputs": {"model": ["model", 0], "latents": ["data", 0], "positive": ["data", 1], "seed": 123}}
    wf["after"] = {"class_type": "LoraTrainerTest_EvalLoss",
                   "inputs": {"model": ["train", 0], "latents": ["data", 0], "positive": ["data", 1], "seed": 123}}
    log_start = len(server.log_text())
    entry = server.run(wf)
    before = entry["outputs"]["before"]["eval_loss"][0]
    after = entry["outputs"]["after"]["eval_loss"][0]
    assert after < before * 0.99, (before, after)

    saved = saved_path(server, entry)
    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
    assert meta["lora_trainer.algorithm"] == algorithm and meta["lora_trainer.steps"] == "40"

    # The saved file through ComfyUI's own loader reproduces model_with_lora (train node served from cache).
    lora_name = saved.relative_to(server.base_dir / "models" / "loras").as_posix()
    wf2 = dict(wf)
    wf2.pop("before"), wf2.pop("after"), wf2.pop("save")
    wf2["loaded"] = {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["model", 0], "lora_name": lora_name, "strength_model": 1.0}}
    wf2["cmp"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["train", 0], "model_b": ["loaded", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": 0}}
    entry2 = server.run(wf2)
    assert entry2["outputs"]["cmp"]["rel_diff"][0] < 1e-3
    assert "lora key not loaded" not in server.log_text()[log_start:]


def test_same_seed_same_lora_other_seed_other_lora(server):
    digests = []
    for seed in (0, 0, 1):
        server.free()  # clear the cache: really train again
        entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="det/run", steps=5,
                                     seed=seed, **FAST))
        digests.append(lora_digest(saved_path(server, entry)))
    assert digests[0] == digests[1]
    assert digests[2] != digests[0]


def test_continuing_a_lora_counts_steps_and_starts_from_its_weights(server):
    first = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="cont/first", steps=3,
                                 learning_rate=0.01, **FAST))
    first_path = saved_path(server, first)
    name = first_path.relative_to(server.base_dir / "models" / "loras").as_posix()
    # A tiny SGD learning rate: the continued LoRA must stay at the saved weights (a new one would start at zero).
    second = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="cont/second", steps=2,
                                  existing_lora=name, optimizer="SGD", learning_rate=1e-7, **FAST))
    assert second["outputs"]["save"]["text"][0].startswith("cont/second_5_steps")
    a, b = load_file(str(first_path)), load_file(str(saved_path(server, second)))
    assert set(a) == set(b)
    up_keys = [k for k in a if k.endswith("lora_up.weight")]
    assert max(float(a[k].abs().max()) for k in up_keys) > 1e-4  # the first run really trained
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() < 1e-5, key


def test_file_without_our_metadata_counts_zero_previous_steps(server):
    import safetensors.torch

    entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nometa/src", steps=2, **FAST))
    tensors = load_file(str(saved_path(server, entry)))
    plain = server.base_dir / "models" / "loras" / "nometa" / "some name without steps.safetensors"
    safetensors.torch.save_file(tensors, str(plain))
    out = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="nometa/cont", steps=3,
                               existing_lora="nometa/some name without steps.safetensors", **FAST))
    assert out["outputs"]["save"]["text"][0].startswith("nometa/cont_3_steps")


def error_of(server, wf) -> str:
    with pytest.raises(harness.PromptError) as err:
        server.run(wf)
    return str(err.value)


def test_count_mismatch_names_both_counts(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=4), steps=1, **FAST)
    wf["other"] = {"class_type": "LoraTrainerTest_TinyTrainingData", "inputs": {
        "family": "sd3", "count": 3, "height": 8, "width": 8, "seed": 0, "captions": "one per image", "corrupt": "no"}}
    wf["train"]["inputs"]["positive"] = ["other", 1]
    msg = error_of(server, wf)
    assert "3 conditionings for 4 latent images" in msg


@pytest.mark.parametrize("corrupt,expected", [
    ("empty", "latents: the data set is empty"),
    # NaN / inf data: tests/test_non_finite.py
    ("no pooled output", "positive: conditioning 0 does not fit this model"),
])
def test_bad_data_gives_clear_errors(server, corrupt, expected):
    assert expected in error_of(server, wfs.train(wfs.sd3_model(), wfs.test_data("sd3", corrupt=corrupt), steps=1,
                                                  **FAST))


def test_lora_of_another_model_and_corrupt_file_are_clear_errors(server):
    entry = server.run(wfs.train(wfs.sd15_model(), wfs.test_data("sd15"), save_prefix="other/sd15", steps=1, **FAST))
    name = saved_path(server, entry).relative_to(server.base_dir / "models" / "loras").as_posix()
    msg = error_of(server, wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=1, existing_lora=name, **FAST))
    assert "existing_lora" in msg or "is not a layer of this SD3 model" in msg, msg
    corrupt = server.base_dir / "models" / "loras" / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    msg = error_of(server, wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=1,
                                     existing_lora="corrupt.safetensors", **FAST))
    assert "existing_lora: 'corrupt.safetensors' is not a readable safetensors file" in msg
