"""Progress, cancel, the untouched input model, checkpointing and dtype behaviour, through the real server."""
import threading

import pytest
import torch
from safetensors.torch import load_file

import harness
import workflows as wfs

pytestmark = pytest.mark.fast

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def saved(server, entry):
    return load_file(str(server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]))


def model_digest(server, nonce: int) -> str:
    wf = {**wfs.sd3_model(), **wfs.test_data("sd3"), "cmp": {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["model", 0], "model_b": ["model", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": nonce}}}
    return server.run(wf)["outputs"]["cmp"]["digest_a"][0]


def test_progress_reaches_100_percent_per_micro_step(server):
    messages = []
    stop = server.listen(messages.append)
    prompt_id = None
    try:
        prompt_id = server.queue(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=2, grad_accumulation_steps=3,
                                           seed=11, **FAST))
        server.wait(prompt_id)
    finally:
        stop(prompt_id)
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "train"]
    values = [p["value"] for p in progress]
    # One update per micro-step (newer ComfyUI throttles what it sends, so only the end is certain there).
    assert values == sorted(set(values)) and set(values) <= {1, 2, 3, 4, 5, 6} and values[-1] == 6, values
    assert all(p["max"] == 6 for p in progress)
    steps = [m["data"]["step"] for m in messages if m["type"] == "lora_trainer.progress"]
    assert steps == [1, 2]


def test_input_model_untouched_after_success_error_and_cancel(server):
    before = model_digest(server, 1)
    server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=3, seed=21, **FAST))
    assert model_digest(server, 2) == before
    with pytest.raises(harness.PromptError):
        server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3", corrupt="nan"), steps=3, seed=22, **FAST))
    assert model_digest(server, 3) == before

    # Cancel a long run through /interrupt once it is training.
    seen = []
    ready = threading.Event()

    def on_message(msg):
        if msg["type"] == "lora_trainer.progress":
            seen.append(msg["data"]["step"])
            if msg["data"]["step"] >= 3:
                ready.set()
        if msg["type"] == "lora_trainer.cancelled":
            seen.append(("cancelled", msg["data"]["step"], msg["data"]["file"]))

    stop = server.listen(on_message)
    try:
        prompt_id = server.queue(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=100000, seed=23, **FAST))
        assert ready.wait(120), "training never started"
        server.interrupt()
        with pytest.raises(harness.PromptError) as err:
            server.wait(prompt_id, timeout=60)
    finally:
        stop(prompt_id)
    assert "execution_interrupted" in str(err.value)
    cancelled = [s for s in seen if isinstance(s, tuple)]
    assert cancelled, seen
    _, step, name = cancelled[0]
    last_seen = max(s for s in seen if isinstance(s, int))
    assert last_seen <= step <= last_seen + 2  # stopped within a micro-step of the cancel (events are async)
    kept = server.base_dir / "models" / "loras" / "cancelled" / name
    assert kept.is_file() and load_file(str(kept))
    assert model_digest(server, 4) == before


def test_gradient_checkpointing_gives_the_same_lora(server):
    results = []
    for gc in (False, True):
        entry = server.run(wfs.train(wfs.sd15_model(), wfs.test_data("sd15"), save_prefix=f"gc/{gc}", steps=3,
                                     seed=5, **{**FAST, "gradient_checkpointing": gc}))
        results.append(saved(server, entry))
    a, b = results
    assert set(a) == set(b)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5 * max(1.0, float(a[key].abs().max())), key


def test_bf16_lora_is_the_rounded_fp32_master(server):
    files = {}
    for dtype in ("fp32", "bf16"):
        entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=f"dtype/{dtype}", steps=4,
                                     seed=9, **{**FAST, "lora_dtype": dtype}))
        files[dtype] = saved(server, entry)
    for key, full in files["fp32"].items():
        half = files["bf16"][key]
        if key.endswith(".alpha"):
            assert half.dtype.is_floating_point and float(half) == float(full)
            continue
        assert half.dtype == __import__("torch").bfloat16
        assert (full.to(half.dtype) == half).all(), key  # trained in fp32, only the output is rounded


def test_mixed_resolution_list_trains(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=4), steps=4, seed=3, batch_size=2,
                   latents_from=["split", 0], **FAST)
    wf["split"] = {"class_type": "LoraTrainerTest_LatentList", "inputs": {"latents": ["data", 0],
                                                                         "second_half_scale": 2}}
    entry = server.run(wf)
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 4


def test_video_latents_train(server):
    wf = wfs.train({"model": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                                      "weight_dtype": "default"}}},
                   wfs.test_data("wan", count=2, size=8), steps=3, seed=2, batch_size=2, **FAST)
    entry = server.run(wf)
    losses = entry["outputs"]["train"]["lora_trainer_loss"]
    assert len(losses) == 3 and all(l == l for l in losses)


@pytest.mark.parametrize("base_dtype", ["fp16", "bf16"])
def test_half_precision_base_models_train_with_the_documented_defaults(server, base_dtype):
    # The node's own defaults: bf16 compute (autocast), bf16 LoRA, gradient checkpointing on.
    wf = wfs.train(wfs.sd15_model(dtype=base_dtype), wfs.test_data("sd15"), steps=3, seed=4)
    wf["cmp"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["model", 0], "model_b": ["train", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": 1}}
    entry = server.run(wf)
    losses = entry["outputs"]["train"]["lora_trainer_loss"]
    assert len(losses) == 3 and all(l == l and l < 1e3 for l in losses)
    assert entry["outputs"]["cmp"]["rel_diff"][0] > 0  # the LoRA changed the model
    lora = saved(server, entry)
    assert all(t.dtype == __import__("torch").bfloat16 for k, t in lora.items() if not k.endswith(".alpha"))


def test_training_reads_the_base_weights_after_a_lora_patched_model_ran(server):
    """A LoRA-patched clone of the model that ran last (here model_with_lora, as a sampler would use it) leaves its
    patched weights in the modules until it is unloaded; training must still start from the base weights: the same
    training, run again afterwards, gives the same LoRA."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="base_weights/first", steps=3, seed=21, **FAST)
    wf["use"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["train", 0], "model_b": ["train", 0], "latents": ["data", 0], "positive": ["data", 1], "nonce": 7}}
    first = saved(server, server.run(wf))
    wf["train"]["inputs"]["module_filter"] = ""  # the same training under another input signature: it runs again
    wf["save"]["inputs"]["prefix"] = "base_weights/again"
    again = saved(server, server.run(wf))
    assert all(torch.equal(first[k], again[k]) for k in first), "the second training started from patched weights"
