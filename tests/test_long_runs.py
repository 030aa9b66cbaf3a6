"""Long runs through the real server (issue 11): the Training Options node, schedules and clipping as the run
reports them, intermediate saves that ComfyUI's loader reads, and exact resume after kill -9."""
from __future__ import annotations

import re
import signal
import threading

import pytest
import safetensors
import safetensors.torch
import torch

import harness
import workflows as wfs
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("each option trained through the server; the fast tier keeps the schedule, a kill and exact resume, DoRA/rsLoRA files")

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def loss_map_of(server, wf: dict) -> dict:
    """Runs ``wf`` with a probe that records the training node's LOSS_MAP; returns it and the history entry."""
    wf = {**wf, "probe": {"class_type": "PreviewAny", "inputs": {"source": ["train", 2]}}}
    entry = server.run(wf)
    text = server.outputs(entry, "probe")["text"][0]
    import json

    return json.loads(text.replace("'", '"')), entry


def tensors_of(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


@pytest.mark.fast
def test_the_schedule_and_clipping_are_used_and_reported(server):
    wf = wfs.with_options(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=None, steps=8,
                                    learning_rate=0.001, **FAST),
                          lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1, max_grad_norm=0.05)
    loss_map, _ = loss_map_of(server, wf)
    rates = loss_map["learning_rate"]
    assert rates[:3] == pytest.approx([0.0005, 0.001, 0.001])
    assert all(a > b for a, b in zip(rates[2:], rates[3:])) and rates[-1] == pytest.approx(0.0001)  # the floor
    norms = loss_map["grad_norm"]
    assert len(norms) == 8 and any(n > 0.05 for n in norms), "the limit is below the gradients' norms here"
    # clipping changes what is trained (the same run without it ends elsewhere)
    unclipped = wfs.with_options(wf, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)  # replaces the options
    other, _ = loss_map_of(server, unclipped)
    assert other["learning_rate"] == rates and other["loss"][0] == loss_map["loss"][0]
    assert other["loss"][1:] != loss_map["loss"][1:]


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own (it gets killed), on a base directory that a second server reuses."""
    harness.put_comfyui_on_path()
    import tiny_models

    tiny_models.write_tiny_sd3(tmp_path / "models" / "diffusion_models" / "tiny_sd3.safetensors")
    servers = []

    def start() -> harness.ComfyServer:
        server = harness.ComfyServer(tmp_path, extra_node_packs=(harness.REPO / "tests" / "node_packs" /
                                                                  "lora_trainer_test_nodes",))
        servers.append(server.start())
        return server

    yield start
    for server in servers:
        server.stop()


RUN = dict(steps=40, batch_size=4, grad_accumulation_steps=2, learning_rate=0.002, seed=5, **FAST)


def run_workflow(prefix: str, steps: int = RUN["steps"], **options) -> dict:
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=6), save_prefix=prefix, **{**RUN, "steps": steps})
    return wfs.with_options(wf, lr_schedule="cosine", warmup_steps=3, max_grad_norm=1.0, save_every_n_steps=10,
                            save_prefix=prefix, **options)


def test_intermediate_saves_keep_the_last_k_and_load_in_comfyui(own_server):
    server = own_server()
    entry = server.run(run_workflow("runs/a", keep_last=3))
    loras = server.base_dir / "models" / "loras" / "runs"
    assert sorted(p.name for p in loras.iterdir()) == [f"a_{n}_steps_00001.safetensors" for n in (10, 20, 30, 40)]
    states = server.base_dir / "output" / "training_states" / "runs"
    assert sorted(p.name for p in states.iterdir()) == [f"a_{n}_steps_00001.safetensors" for n in (10, 20, 30)]
    assert server.outputs(entry, "train")["lora_trainer_saves"] == [10, 20, 30]
    for n in (10, 20, 30):
        with safetensors.safe_open(str(loras / f"a_{n}_steps_00001.safetensors"), framework="pt") as f:
            assert f.metadata()["lora_trainer.steps"] == str(n)
    # ComfyUI's own loader reads every intermediate LoRA (no key left unloaded) and it changes the model's output
    wf = {**wfs.sd3_model(), **wfs.test_data("sd3", count=2)}
    for n in (10, 20, 30):
        wf[f"load{n}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["model", 0], "lora_name": f"runs/a_{n}_steps_00001.safetensors", "strength_model": 1.0}}
        wf[f"cmp{n}"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": ["model", 0], "model_b": [f"load{n}", 0], "latents": ["data", 0], "positive": ["data", 1],
            "nonce": n, "points": 1}}
    log_start = len(server.log_text())
    entry = server.run(server.with_defaults(wf))
    assert all(server.outputs(entry, f"cmp{n}")["rel_diff"][0] > 0 for n in (10, 20, 30))
    assert "lora key not loaded" not in server.log_text()[log_start:]
    # keep_last 2: the oldest intermediate pair is removed as soon as a third exists
    entry = server.run(run_workflow("runs/b", keep_last=2))
    assert sorted(p.name for p in loras.glob("b_*")) == [f"b_{n}_steps_00001.safetensors" for n in (20, 30, 40)]
    assert sorted(p.name for p in states.glob("b_*")) == [f"b_{n}_steps_00001.safetensors" for n in (20, 30)]
    assert server.outputs(entry, "train")["lora_trainer_saves"] == [20, 30]  # the saves still there


def saves_on_disk(server, stem: str) -> list[int]:
    """The steps of the intermediate saves of runs/<stem> in output/training_states, each with its LoRA beside it."""
    states = server.base_dir / "output" / "training_states" / "runs"
    steps = sorted({int(p.name.split("_")[-3]) for p in states.glob(f"{stem}_*_steps_*.safetensors")})
    loras = server.base_dir / "models" / "loras" / "runs"
    assert all(any(loras.glob(f"{stem}_{n}_steps_*.safetensors")) for n in steps)
    return steps


@pytest.mark.slow("two runs through the server; the fast kill-and-resume test checks the reported saves too")
def test_a_resumed_run_reports_every_save_of_its_run_still_on_disk(own_server):
    """A run of 25 steps saves at 10 and 20; resumed from 20 with 40 steps, it saves at 30. With keep_last 2 the
    step-10 pair (before the resume) goes, and what the node reports is what is on disk: 20 and 30."""
    server = own_server()
    first = server.run(run_workflow("runs/r", 25, keep_last=2))
    assert server.outputs(first, "train")["lora_trainer_saves"] == [10, 20] == saves_on_disk(server, "r")
    resumed, entry = loss_map_of(server, run_workflow("runs/r", 40, keep_last=2,
                                                      resume_from="runs/r_20_steps_00001.safetensors"))
    assert saves_on_disk(server, "r") == [20, 30]
    assert resumed["saves"] == server.outputs(entry, "train")["lora_trainer_saves"] == [20, 30]
    assert not (server.base_dir / "models" / "loras" / "runs" / "r_10_steps_00001.safetensors").exists()


KILLED_RUN_STEPS = 40  # 30 steps (60 micro-steps) after the step-10 save: far longer than the kill takes to land


@pytest.mark.fast
def test_a_run_killed_and_resumed_gives_the_same_lora_as_one_never_stopped(own_server):
    server = own_server()
    whole = server.run(run_workflow("runs/whole", KILLED_RUN_STEPS))
    loras = server.base_dir / "models" / "loras" / "runs"
    reference = tensors_of(loras / f"whole_{KILLED_RUN_STEPS}_steps_00001.safetensors")

    saved = threading.Event()
    stop = server.listen(lambda m: saved.set() if m["type"] == "lora_trainer.saved" and m["data"]["step"] == 10
                         else None)
    try:
        server.queue(run_workflow("runs/killed", KILLED_RUN_STEPS))
        assert saved.wait(120), "the step-10 save never came"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    finally:
        stop()
    assert not (loras / f"killed_{KILLED_RUN_STEPS}_steps_00001.safetensors").exists(), "not killed mid-way"

    server = own_server()  # a new ComfyUI on the same folders
    state = "runs/killed_10_steps_00001.safetensors"
    options = server.object_info("LoraTrainer_TrainingOptions")["LoraTrainer_TrainingOptions"]
    assert state in options["input"]["required"]["resume_from"][0]
    resumed = server.run(run_workflow("runs/killed", KILLED_RUN_STEPS, resume_from=state))
    result = tensors_of(loras / server.outputs(resumed, "save")["text"][0].removeprefix("runs/"))
    assert result.keys() == reference.keys()
    assert all(torch.equal(result[k], reference[k]) for k in reference), "the resumed LoRA differs"
    train_ui = server.outputs(resumed, "train")
    assert train_ui["lora_trainer_loss"] == server.outputs(whole, "train")["lora_trainer_loss"]
    # the run's saves: the one before the kill (the state it resumed from) and those after it
    assert train_ui["lora_trainer_saves"] == list(range(10, KILLED_RUN_STEPS, 10))
    assert saves_on_disk(server, "killed") == train_ui["lora_trainer_saves"]

    mismatched = run_workflow("runs/other", KILLED_RUN_STEPS, resume_from=state)
    mismatched["train"]["inputs"]["learning_rate"] = 0.001
    with pytest.raises(harness.PromptError, match=re.escape(
            f"resume_from: '{state}' was saved by a run with other settings or data (learning_rate 0.002 there, "
            "0.001 here)")):
        server.run(mismatched)
    other_data = run_workflow("runs/other", KILLED_RUN_STEPS, resume_from=state)
    other_data["data"]["inputs"]["seed"] = 1
    with pytest.raises(harness.PromptError, match=r"resume_from: .* other settings or data \(data '\w+' there"):
        server.run(other_data)


def lora_of(server, wf: dict) -> dict[str, torch.Tensor]:
    entry = server.run(wf)
    return tensors_of(server.base_dir / "models" / "loras" / server.outputs(entry, "save")["text"][0])


@pytest.mark.parametrize("model, options", [
    ("sd3", dict(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)),
    ("sd3", dict(shift=6.0)),
    ("sd3", dict(noise_offset=0.1)),
    ("sd15", dict(min_snr_gamma=5.0)),
    ("sd15", dict(timestep_sampling="logit_normal", noise_offset=0.05, min_snr_gamma=1.0)),
], ids=["sd3 logit-normal", "sd3 shift", "sd3 noise offset", "sd15 min-snr", "sd15 all"])
def test_timestep_options_change_what_is_trained(server, model, options):
    base = wfs.sd3_model() if model == "sd3" else wfs.sd15_model()
    wf = wfs.train(base, wfs.test_data(model), save_prefix=f"timesteps/{model}", steps=3, **FAST)
    plain = lora_of(server, wf)
    changed = lora_of(server, wfs.with_options(wf, **options))
    assert plain.keys() == changed.keys()
    assert any(not torch.equal(plain[k], changed[k]) for k in plain)


@pytest.mark.parametrize("model, options, message", [
    ("sd3", dict(min_snr_gamma=5.0), "min_snr_gamma: min-SNR weighting is defined for ε- and v-prediction models; "
                                     "this model's prediction type is 'flow'"),
    ("sd3", dict(resolution_shift=True), "resolution_shift: "),
    ("sd15", dict(shift=3.0), "shift: applies to flow-matching models only; this model's prediction type is 'eps'"),
])
def test_timestep_options_a_model_cannot_use_are_named(server, model, options, message):
    base = wfs.sd3_model() if model == "sd3" else wfs.sd15_model()
    wf = wfs.with_options(wfs.train(base, wfs.test_data(model), save_prefix="timesteps/refused", steps=1, **FAST),
                          **options)
    with pytest.raises(harness.PromptError) as caught:
        server.run(wf)
    error = next(m[1] for m in caught.value.payload["status"]["messages"] if m[0] == "execution_error")
    assert error["exception_message"].startswith(message), error["exception_message"]


def test_validation_loss_is_its_own_series_and_leaves_training_alone(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="validation/plain", steps=12, **FAST)
    plain = lora_of(server, wf)
    wf = wfs.with_options(wf, validate_every_n_steps=4)
    wf["held_out"] = wfs.test_data("sd3", count=2, seed=9)["data"]
    wf["options"]["inputs"].update(validation_latents=["held_out", 0], validation_positive=["held_out", 1])
    wf["save"]["inputs"]["prefix"] = "validation/validated"
    loss_map, entry = loss_map_of(server, wf)
    assert loss_map["validation"]["step"] == [4, 8, 12]
    assert len(set(loss_map["validation"]["loss"])) == 3 and all(v > 0 for v in loss_map["validation"]["loss"])
    assert server.outputs(entry, "train")["lora_trainer_validation"] == [
        [s, v] for s, v in zip(loss_map["validation"]["step"], loss_map["validation"]["loss"])]
    validated = tensors_of(server.base_dir / "models" / "loras" / server.outputs(entry, "save")["text"][0])
    assert all(torch.equal(plain[k], validated[k]) for k in plain), "validating changed what was trained"


def test_validation_data_that_does_not_fit_is_named(server):
    wf = wfs.with_options(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="validation/refused",
                                    steps=2, **FAST), validate_every_n_steps=1)
    wf["held_out"] = wfs.test_data("sd15", count=4)["data"]
    wf["options"]["inputs"].update(validation_latents=["held_out", 0], validation_positive=["data", 1])
    with pytest.raises(harness.PromptError, match=r"validation_latents: image 0 has 4 channels"):
        server.run(wf)
    wf["options"]["inputs"].pop("validation_positive")
    with pytest.raises(harness.PromptError, match=r"validation_latents, validation_positive: connect both or neither"):
        server.run(wf)


def test_ema_is_the_result(server):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="ema/plain", steps=6, **FAST)
    plain = lora_of(server, wf)
    averaged = lora_of(server, wfs.with_options(wf, ema_decay=0.5))
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)


@pytest.mark.parametrize("algorithm", fast_cases(["LoRA", "LoHa", "LoKr"], "LoRA"))
def test_dora_and_rslora_files_load_in_comfyui_as_trained(server, algorithm):
    wf = wfs.with_options(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=f"dora/{algorithm}", steps=3,
                                    algorithm=algorithm, rank=4, **FAST), dora=True, rs_lora=True)
    name = server.outputs(server.run(wf), "save")["text"][0]
    # the same graph again (its training cached or replayed: the same weights) with the file through ComfyUI's loader
    wf["load"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["model", 0], "lora_name": name,
                                                                 "strength_model": 1.0}}
    for what, other in (("file_vs_trained", ["train", 0]), ("file_vs_base", ["model", 0])):
        wf[what] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": other, "model_b": ["load", 0], "latents": ["data", 0], "positive": ["data", 1], "nonce": 0}}
    del wf["save"]
    log_start = len(server.log_text())
    entry = server.run(server.with_defaults(wf))
    assert server.outputs(entry, "file_vs_trained")["rel_diff"][0] < 1e-5
    assert server.outputs(entry, "file_vs_base")["rel_diff"][0] > 1e-4
    assert "lora key not loaded" not in server.log_text()[log_start:]
    saved = tensors_of(server.base_dir / "models" / "loras" / name)
    assert any(k.endswith(".dora_scale") for k in saved)
    if algorithm == "LoRA":  # rsLoRA: scale alpha/√rank with alpha = rank, stored as alpha·√rank for the loader
        alpha = next(v for k, v in saved.items() if k.endswith(".alpha"))
        assert float(alpha) == pytest.approx(4 * 2.0)
