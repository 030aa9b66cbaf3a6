"""Sample images while training (Training Samples → Training Options → Train LoRA, Sample Grid): through the real
server on the tiny SD3 with a generated 16-channel TAESD as its VAE."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dataset_models
import harness
import workflows as wfs

pytestmark = pytest.mark.fast

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}


def training(prefix: str, samples: dict | None = None, steps: int = 4, **settings) -> dict:
    """4 tiny SD3 images, ``steps`` steps at a learning rate that visibly changes the samples; the LoRA saved under
    ``prefix``; with Training Samples (``samples`` overrides its defaults) unless ``samples`` is None."""
    wf = wfs.with_options(wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=4, size=8), save_prefix=prefix,
                                    steps=steps, seed=3, learning_rate=0.01, **{**FAST, **settings}))
    return wf if samples is None else wfs.with_samples(wf, **samples)


def run_listening(server, wf: dict, timeout: float = 600) -> tuple[dict, list[dict]]:
    messages: list[dict] = []
    stop = server.listen(messages.append)
    prompt_id = None
    try:
        prompt_id = server.queue(wf)
        entry = server.wait(prompt_id, timeout)
    finally:
        stop(prompt_id)
    return entry, messages


def pixels(server, relative: str) -> np.ndarray:
    return np.asarray(Image.open(server.base_dir / "output" / relative).convert("RGB"), dtype=np.int16)


def lora_of(server, entry: dict) -> dict[str, torch.Tensor]:
    return load_file(str(server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]))


@pytest.fixture
def vae(server):
    dataset_models.install(server.base_dir, "taesd16.safetensors")


def test_samples_on_the_node_and_on_disk_every_n_steps_and_the_lora_is_unchanged(server, vae):
    entry, messages = run_listening(server, training("samples/with", {"filename_prefix": "samples/run_a"}))
    sampled = [m["data"] for m in messages if m["type"] == "lora_trainer.sample"]
    # step 0 (before training), every 2 steps, the last one
    assert [s["step"] for s in sampled] == [0, 2, 4]
    folder = server.base_dir / "output" / "samples" / "run_a_samples"
    for s in sampled:
        assert len(s["files"]) == 2 and all((server.base_dir / "output" / f).is_file() for f in s["files"])
        assert all(Path(f).parent == Path("samples/run_a_samples") for f in s["files"])
        record = json.loads(Image.open(server.base_dir / "output" / s["files"][1]).text["lora_trainer_sample"])
        assert record == {"step": s["step"], "prompt": "prompt 2", "prompt_index": 1, "width": 64, "height": 64,
                          "frames": 1, "sampler_name": "euler", "scheduler": "simple", "steps": 4, "cfg": 2.0,
                          "seed": 0}
    # live on the node: one preview image per sampling step, sent while the node runs (ComfyUI's preview path)
    train_ran = [i for i, m in enumerate(messages) if m["type"] == "executing" and m["data"].get("node") == "train"]
    previews = [i for i, m in enumerate(messages) if m["type"] == "binary"]
    assert len(previews) == 3 and train_ran and all(i > train_ran[0] for i in previews), previews
    # training time and sampling time apart
    progress = [m["data"] for m in messages if m["type"] == "lora_trainer.progress"]
    assert progress[-1]["sampling_s"] > 0 and progress[0]["elapsed_s"] >= 0
    assert entry["outputs"]["train"]["lora_trainer_sampling_s"][0] >= progress[-1]["sampling_s"]
    # the grid: a file, shown on the training node, and the Sample Grid node's IMAGE (rows = prompts, cols = steps)
    shown = entry["outputs"]["train"]["images"]
    assert shown == entry["outputs"]["grid"]["images"] and len(shown) == 1
    grid = pixels(server, f"{shown[0]['subfolder']}/{shown[0]['filename']}")
    assert grid.shape == (18 + 2 * 64, 3 * 64, 3)
    assert (folder / shown[0]["filename"]).is_file()
    # the LoRA learns: the last samples differ from the step-0 ones (a random TAESD decodes to dark, low-contrast
    # images, hence the small threshold); the grid holds them in place
    first, last = pixels(server, sampled[0]["files"][0]), pixels(server, sampled[-1]["files"][0])
    assert np.abs(first - last).mean() > 0.1
    assert np.array_equal(grid[18:18 + 64, 0:64], first) and np.array_equal(grid[18:18 + 64, 128:192], last)

    # the same run without samples trains the bit-identical LoRA
    plain = server.run(training("samples/without"))
    with_samples, without = lora_of(server, entry), lora_of(server, plain)
    assert with_samples.keys() == without.keys()
    assert all(torch.equal(with_samples[k], without[k]) for k in with_samples)

    # the same sampling seed gives the same images (another prefix, so the prompt runs again)
    again, messages = run_listening(server, training("samples/again", {"filename_prefix": "samples/run_b",
                                                                       "prompt_labels": "a red cat\na blue dog"}))
    repeated = [m["data"] for m in messages if m["type"] == "lora_trainer.sample"]
    # the labels name the files and are the PNGs' prompt
    assert repeated[0]["files"][1].endswith("_step000000_p2_a_blue_dog.png")
    assert json.loads(Image.open(server.base_dir / "output" / repeated[0]["files"][1]).text[
        "lora_trainer_sample"])["prompt"] == "a blue dog"
    for a, b in zip(sampled, repeated):
        assert all(np.array_equal(pixels(server, x), pixels(server, y)) for x, y in zip(a["files"], b["files"]))


def test_cancel_during_sampling_stops_promptly_and_keeps_the_trained_steps(server, vae):
    """Sampling after step 2 is long (1000 sampler steps); a cancel during it ends the prompt within seconds, with
    the LoRA of step 2 kept in loras/cancelled/."""
    sampling, events = threading.Event(), []

    def on_message(m):
        if m["type"] == "lora_trainer.progress" and m["data"]["step"] == 2:
            sampling.set()  # the samples of step 2 start right after this report
        if m["type"] in ("lora_trainer.cancelled", "lora_trainer.sample", "lora_trainer.progress"):
            events.append((m["type"], m["data"]))

    stop = server.listen(on_message)
    prompt_id = None
    try:
        prompt_id = server.queue(training("samples/cancel", {"steps": 1000, "sample_at_start": False,
                                                              "filename_prefix": "samples/cancel"}, steps=6))
        assert sampling.wait(120), "training never reached step 2"
        time.sleep(0.5)
        asked = time.monotonic()
        server.interrupt()
        with pytest.raises(harness.PromptError) as err:
            server.wait(prompt_id, timeout=120)
        took = time.monotonic() - asked
    finally:
        stop(prompt_id)
    assert "execution_interrupted" in str(err.value)
    assert took < 10, took
    kinds = [k for k, _ in events]
    assert "lora_trainer.sample" not in kinds  # stopped inside the sampling
    steps = [d["step"] for k, d in events if k == "lora_trainer.progress"]
    assert steps == [1, 2]
    cancelled = [d for k, d in events if k == "lora_trainer.cancelled"]
    assert cancelled and cancelled[0]["step"] == 2
    assert (server.base_dir / "models" / "loras" / "cancelled" / cancelled[0]["file"]).is_file()


@pytest.mark.parametrize("change, named", [
    ({"vae": "wan_vae.safetensors"}, "samples: vae:"),
    ({"latent": "sd15"}, "samples: latent: 4 channels"),
])
def test_a_sample_input_that_cannot_work_is_refused_before_training(server, vae, change, named):
    dataset_models.install(server.base_dir, "wan_vae.safetensors")
    wf = training("samples/refused", {"filename_prefix": "samples/refused"})
    if "vae" in change:
        wf["sample_vae"]["inputs"]["vae_name"] = change["vae"]
    else:  # a 4-channel latent with content (an empty one ComfyUI's samplers widen, as for its own KSampler)
        wf["sample_latent"] = wfs.test_data(change["latent"], count=1, size=8, seed=9)["data"]
        wf["samples"]["inputs"]["latent"] = ["sample_latent", 0]
    messages: list[dict] = []
    stop = server.listen(messages.append)
    prompt_id = None
    try:
        prompt_id = server.queue(wf)
        with pytest.raises(harness.PromptError) as err:
            server.wait(prompt_id)
    finally:
        stop(prompt_id)
    assert named in str(err.value)
    assert not [m for m in messages if m["type"] == "lora_trainer.progress"]  # no training step ran


def test_missing_vae_is_refused_naming_it(server):
    wf = training("samples/no_vae", {})
    del wf["samples"]["inputs"]["vae"]
    with pytest.raises(harness.PromptError) as err:
        server.queue(wf)
    assert "vae" in str(err.value)


@pytest.mark.slow("the template on stand-ins (~50 s: a CLIP-L text encoder, a folder data set); the fast tests cover "
                  "sampling on the same tiny SD3")
def test_samples_template_trains_and_writes_its_grid(server):
    """The Flux template with samples on generated stand-ins for its files (a tiny SD3 that takes CLIP-L's
    conditioning, CLIP-L for Flux's two text encoders, a 16-channel TAESD for Flux's VAE), 4 steps, samples every 2
    steps at 64×64: the grid of 1 prompt × steps 0, 2, 4 comes out of Sample Grid and is kept in test-artifacts/."""
    from tests.test_edit_pairs import pictures, write

    dataset_models.install(server.base_dir, "clip_l.safetensors", "taesd16.safetensors", "sd3_clip_l.safetensors")
    api = json.loads((harness.REPO / "example_workflows" / "api" / "lora_trainer_samples_flux.json").read_text())
    api["model"]["inputs"].update(unet_name="sd3_clip_l.safetensors", weight_dtype="default")
    api["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}}
    api["vae"]["inputs"]["vae_name"] = "taesd16.safetensors"
    a, b = pictures(7, (64, 64), (64, 64))
    api["images"]["inputs"]["folder"] = write(server.base_dir / "input" / "samples_template",
                                              {"a.png": a, "b.png": b}, {"a": "a red square", "b": "a blue square"})
    api["train"]["inputs"].update(steps=4, training_dtype="fp32", lora_dtype="fp32", learning_rate=0.01)
    api["samples"]["inputs"].update(width=64, height=64, steps=4, every_n_steps=2)
    server.free()  # a model of an earlier test leaves memory first
    entry = server.run(api)
    shown = entry["outputs"]["grid"]["images"]
    assert shown and shown == entry["outputs"]["train"]["images"]
    grid = server.base_dir / "output" / shown[0]["subfolder"] / shown[0]["filename"]
    assert shown[0]["subfolder"] == "flux/my_lora_samples"
    assert Image.open(grid).size == (3 * 64, 18 + 64)
    artifacts = harness.REPO / "test-artifacts" / "samples"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "template_grid.png").write_bytes(grid.read_bytes())


@pytest.mark.slow("a headless subprocess loading ComfyUI (~50 s); tests/test_headless.py covers the runner, the fast "
                  "tests here the sampling")
def test_headless_writes_the_samples_too(server, vae, tmp_path):
    from tests.test_headless import explain, run_headless

    proc = run_headless(tmp_path, server.base_dir, training("samples/headless", {"filename_prefix": "samples/hl"}))
    assert proc.returncode == 0, explain(proc)
    lines = [line for line in proc.stdout.splitlines() if ": samples samples/hl_samples/" in line]
    assert [line.split(":")[0].split()[-1] for line in lines] == ["0", "2", "4"], explain(proc)
    files = sorted((server.base_dir / "output" / "samples" / "hl_samples").glob("*.png"))
    assert len([f for f in files if "_step" in f.name]) == 6 and [f.name for f in files if "grid" in f.name]
    assert "[grid] LoraTrainer_SampleGrid" in proc.stdout, explain(proc)
    assert re.search(r"step 4/4 .* sampling \d+:\d\d:\d\d", proc.stdout), explain(proc)  # its time apart


@pytest.mark.slow("torchrun starts 2 ranks of the headless runner, each loading ComfyUI (~30-60 s); the headless "
                  "test covers the runner and the unit tests a cancel during sampling")
def test_torchrun_samples_are_written_by_rank_0_only(server, vae, tmp_path):
    from tests.test_distributed import env, job

    wf = training("samples/ddp", {"filename_prefix": "samples/ddp"}, batch_size=1)
    proc = subprocess.run(job(tmp_path, server.base_dir, wf, 2), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env())
    assert proc.returncode == 0, proc.stderr[-6000:]
    files = sorted((server.base_dir / "output" / "samples" / "ddp_samples").glob("*.png"))
    assert len([f for f in files if "_step" in f.name]) == 6, files  # 2 prompts × steps 0, 2, 4, once
    assert len([f for f in files if f.name.endswith("_grid.png")]) == 1, files


@pytest.mark.slow("a second family (a video model with a Wan VAE, ~40 s); the SD3 tests cover the sampling path")
def test_a_video_model_samples_a_clip(server, vae):
    """The tiny Wan 2.1 with a Wan VAE: each sample is a clip of `length` frames (its first frame as the PNG and in
    the grid, the clip beside it as an animated WebP)."""
    dataset_models.install(server.base_dir, "wan_vae.safetensors")
    wf = wfs.with_options(wfs.train(wfs.sd3_model("tiny_wan.safetensors"), wfs.test_data("wan", count=2, size=8),
                                    save_prefix=None, steps=2, seed=3, **FAST))
    prompts = [f"p{i}" for i in range(2)]
    for i, seed in enumerate((101, 102)):
        wf[prompts[i]] = wfs.test_data("wan", count=1, seed=seed)["data"]
    wf = wfs.with_samples(wf, prompts=[[p, 1] for p in prompts], vae="wan_vae.safetensors", length=5,
                          filename_prefix="samples/wan", every_n_steps=2)
    entry, messages = run_listening(server, wf)
    sampled = [m["data"] for m in messages if m["type"] == "lora_trainer.sample"]
    assert [s["step"] for s in sampled] == [0, 2]
    first = server.base_dir / "output" / sampled[0]["files"][0]
    assert json.loads(Image.open(first).text["lora_trainer_sample"])["frames"] == 5
    clip = Image.open(first.with_suffix(".webp"))
    assert clip.n_frames == 5 and clip.size == Image.open(first).size == (64, 64)
    assert entry["outputs"]["grid"]["images"]


@pytest.mark.slow("drives the real frontend in Chromium (~60 s); the fast test sees the same previews on the websocket")
def test_the_frontend_shows_the_samples_live_on_the_training_node_and_the_grid_after(server, vae):
    """The graph loaded into the real frontend and queued there: a sample preview appears on Train LoRA while it
    runs, the grid once it is done (screenshots in test-artifacts/browser/)."""
    from playwright.sync_api import sync_playwright

    from tests.test_browser import CHROMIUM, open_app, shot

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            page = open_app(browser, server, "en")
            api = training("samples/browser", {"filename_prefix": "samples/browser"}, steps=6)
            page.evaluate("async (api) => { await app.loadApiJson(api, 'samples'); app.graph.arrange?.(); }", api)
            train = page.evaluate("""() => {
              const node = app.graph._nodes.find((n) => n.type === 'LoraTrainer_TrainLoRA');
              app.canvas.ds.scale = 0.6;  // the whole node, previews below its chart included, in the screenshots
              app.canvas.centerOnNode?.(node);
              app.graph.setDirtyCanvas(true, true);
              return String(node.id);
            }""")
            page.evaluate("() => app.queuePrompt(0, 1)")
            page.wait_for_function("(id) => (app.nodePreviewImages?.[id] ?? []).length > 0", arg=train,
                                   timeout=300000, polling=50)
            shot(page, "samples_live_preview")
            page.wait_for_function("(id) => (app.nodeOutputs?.[id]?.images ?? []).length > 0", arg=train,
                                   timeout=300000)
            images = page.evaluate("(id) => app.nodeOutputs[id].images", train)
            assert images[0]["subfolder"] == "samples/browser_samples" and images[0]["filename"].endswith("_grid.png")
            page.wait_for_timeout(4000)  # the frontend drops the last live preview for the outputs after a delay
            shot(page, "samples_grid_on_the_node")
        finally:
            browser.close()
