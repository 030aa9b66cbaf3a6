"""Real data sets through ComfyUI's own data-set nodes, through the real server.

Image and caption files in an input subfolder → LoadImageTextDataSetFromFolder → MakeTrainingDataset (a VAE from
VAELoader, CLIP-L from CLIPLoader) → our Train LoRA; on versions that have them also ResolutionBucket (one LATENT
batch per resolution) and LoadVideoTextDataSetFromFolder (5-D video latents, mixed frame counts). A probe on the model
records what every training forward received, so the test sees that each image was trained with its own caption
(tests/node_packs/lora_trainer_test_nodes/training_probe.py); the saved LoRA says how many images it was trained on
and loads through ComfyUI's LoRA loader. The models are the smallest the loaders accept (tools/dataset_models.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import dataset_models
import harness
import workflows as wfs

pytestmark = pytest.mark.fast

# Four square images and two wide ones (two latent sizes, so two same-size groups or buckets of 4 and 2). Caption 1
# is longer than CLIP's 77-token window: its context is 154 tokens, the others 77, as real caption files give.
IMAGES = [(64, 64)] * 4 + [(96, 64)] * 2  # (width, height)
CAPTIONS = [
    "a red cube on a wooden table",
    "a detailed photograph of a small blue sphere floating over calm water at dawn, " * 6,
    "sks dog sitting on green grass",
    "a yellow car parked in front of a white house",
    "a black cat sleeping on a windowsill at night",
    "a lighthouse on a rocky coast under a stormy sky",
]
# Videos of two sizes and two lengths: 5 frames give 2 latent frames, 9 give 3 (Wan's 4× temporal compression).
VIDEOS = [(64, 64, 5), (64, 64, 9), (96, 64, 5), (64, 64, 5)]  # (width, height, frames)
VIDEO_CAPTIONS = ["waves rolling onto a beach", "a candle flame flickering in the dark",
                  "traffic on a city street at dusk", "leaves falling from a tree in autumn"]
TEXT_ENCODER = "clip_l.safetensors"
IMAGE_MODELS = ("sd3_clip_l.safetensors", "taesd16.safetensors")  # (diffusion model, VAE)
VIDEO_MODELS = ("tiny_wan.safetensors", "wan_vae.safetensors")  # the session's tiny Wan 2.1 (tests/conftest.py)
TRAIN = {"steps": 12, "learning_rate": 0.001, "rank": 4}
CERTAIN = 3.0  # z above which a row's noisy latent shows its image for certain (see training_probe.TrainingPairs)
MIN_SHARE_IDENTIFIED = 1 / 3  # of the training rows: the check must not pass on no evidence


def blocks(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A seeded image of 8-pixel blocks of random colours (different images give clearly different latents)."""
    colours = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return colours.repeat(8, axis=0).repeat(8, axis=1)


def write_images(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ((w, h), caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        Image.fromarray(blocks(rng, w, h)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption + "\n", encoding="utf-8")


def write_videos(folder: Path, seed: int = 0) -> None:
    import av

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ((w, h, frames), caption) in enumerate(zip(VIDEOS, VIDEO_CAPTIONS, strict=True)):
        with av.open(str(folder / f"vid_{i}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for _ in range(frames):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(blocks(rng, w, h), format="rgb24")))
            container.mux(stream.encode())
        (folder / f"vid_{i}.txt").write_text(caption + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def models(comfy_server) -> None:
    dataset_models.install(comfy_server.base_dir, TEXT_ENCODER, *IMAGE_MODELS, VIDEO_MODELS[1])


@pytest.fixture(scope="module")
def image_folder(comfy_server, models) -> str:
    write_images(comfy_server.base_dir / "input" / "lora_dataset")
    return "lora_dataset"


def has_nodes(server, *names: str) -> bool:
    info = server.object_info()
    return all(n in info for n in names)


def dataset_workflow(key: str, folder: str, *, video: bool = False, **settings) -> dict:
    """Loaders → data-set nodes → probe → Train LoRA → Save LoRA, and the probe's report once training is done.
    Images: a tiny SD3 for CLIP-L with a TAESD-layout VAE; videos: the tiny Wan 2.1 with a Wan VAE."""
    unet, vae = VIDEO_MODELS if video else IMAGE_MODELS
    loaders = {
        **wfs.sd3_model(unet),  # UNETLoader
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        # Type sd3 gives CLIP-L's context padded to 4096 wide, the width SD3's and Wan's text inputs have.
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT_ENCODER, "type": "sd3"}},
    }
    wf = wfs.train(loaders, wfs.folder_dataset(folder, vae=["vae", 0], clip=["clip", 0], video=video),
                   save_prefix=f"dataset/{key}", **{**TRAIN, **settings})
    wf["probe"] = {"class_type": "LoraTrainerTest_RecordTrainingCalls", "inputs": {"model": ["model", 0], "key": key}}
    wf["train"]["inputs"]["model"] = ["probe", 0]
    wf["pairs"] = {"class_type": "LoraTrainerTest_TrainingPairs", "inputs": {
        "model": ["model", 0], "latents": ["data", 0], "conditioning": ["data", 1], "key": key, "after": ["train", 3]}}
    return wf


def assert_own_captions(entry: dict, count: int, rows: int) -> None:
    """Every training row had one of the data set's captions, all of them were used, and wherever the noisy latent
    shows which image it is, that image is the caption's own (item i of the data set has caption i)."""
    pairs = entry["outputs"]["pairs"]["pairs"]  # [sigma, image, caption, z] per trained row
    assert len(pairs) == rows, f"{len(pairs)} training rows recorded, expected {rows}"
    captions = [caption for _, _, caption, _ in pairs]
    assert -1 not in captions, f"a training row had a context that is none of the captions: {pairs}"
    assert sorted(set(captions)) == list(range(count)), f"captions used: {sorted(set(captions))}"
    identified = [(image, caption) for _, image, caption, z in pairs if z > CERTAIN]
    assert len(identified) >= MIN_SHARE_IDENTIFIED * len(pairs), f"too few rows identified: {pairs}"
    wrong = [(image, caption) for image, caption in identified if image != caption]
    assert not wrong, f"(image, caption) pairs trained together: {wrong}"


def assert_trained_on(server, entry: dict, images: int) -> Path:
    path = server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]
    with safe_open(str(path), framework="pt") as f:
        settings = json.loads(f.metadata()["lora_trainer.training_settings"])
    assert settings["images"] == images
    return path


def assert_lora_loads(server, wf: dict, path: Path, images: int, log_start: int) -> None:
    """The saved file through ComfyUI's LoraLoaderModelOnly changes the model and equals the node's model_with_lora
    on every item of the data set (the training node itself is served from the cache)."""
    wf = {k: v for k, v in wf.items() if k not in ("save", "pairs")}
    wf["loaded"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["model", 0], "strength_model": 1.0,
        "lora_name": path.relative_to(server.base_dir / "models" / "loras").as_posix()}}
    for name, model_a in (("same", ["train", 0]), ("changed", ["model", 0])):
        wf[name] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
            "model_a": model_a, "model_b": ["loaded", 0], "latents": ["data", 0], "positive": ["data", 1], "nonce": 0}}
    out = server.run(wf)["outputs"]
    assert len(out["same"]["rel_diff"]) == images  # one comparison per item (ComfyUI maps the node over the list)
    assert max(out["same"]["rel_diff"]) < 1e-3, out["same"]["rel_diff"]
    assert min(out["changed"]["rel_diff"]) > 1e-4, out["changed"]["rel_diff"]
    assert "lora key not loaded" not in server.log_text()[log_start:]


def test_folder_of_captioned_images_trains_each_image_with_its_caption(server, image_folder):
    log_start = len(server.log_text())
    wf = dataset_workflow("folder", image_folder)
    entry = server.run(wf)
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == TRAIN["steps"]
    assert_own_captions(entry, len(IMAGES), rows=TRAIN["steps"])
    assert_lora_loads(server, wf, assert_trained_on(server, entry, len(IMAGES)), len(IMAGES), log_start)


def test_resolution_buckets_train_each_image_with_its_caption(server, image_folder):
    if not has_nodes(server, "ResolutionBucket"):
        pytest.skip("this ComfyUI has no ResolutionBucket node (added after 0.3.75)")
    # ResolutionBucket gives one LATENT batch per resolution (4 and 2 images) and lists of 4 and 2 conditionings.
    wf = dataset_workflow("buckets", image_folder)
    wf["buckets"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["data", 0], "conditioning": ["data", 1]}}
    wf["train"]["inputs"].update(latents=["buckets", 0], positive=["buckets", 1])
    entry = server.run(wf)
    assert_own_captions(entry, len(IMAGES), rows=TRAIN["steps"])
    assert_trained_on(server, entry, len(IMAGES))


def test_micro_batches_mix_caption_lengths(server, image_folder):
    """Captions of 77 and 154 tokens in one micro-batch: ComfyUI cannot concatenate such conditionings on SD3, Flux,
    Wan, …, so the batch runs as chunks that it can, as ComfyUI's samplers do."""
    # Batches of 2 from groups of 4 and 2 images: the 154-token caption always shares a batch with a 77-token one.
    entry = server.run(dataset_workflow("batches", image_folder, batch_size=2, steps=3))
    assert_own_captions(entry, len(IMAGES), rows=6)


def test_folder_of_captioned_videos_trains_each_video_with_its_caption(server, models):
    if not has_nodes(server, "LoadVideoTextDataSetFromFolder", "GetVideoComponents"):
        pytest.skip("this ComfyUI has no LoadVideoTextDataSetFromFolder node (added after 0.3.75)")
    write_videos(server.base_dir / "input" / "lora_videos")
    log_start = len(server.log_text())
    wf = dataset_workflow("videos", "lora_videos", video=True, steps=8)
    entry = server.run(wf)
    assert_own_captions(entry, len(VIDEOS), rows=8)
    assert_lora_loads(server, wf, assert_trained_on(server, entry, len(VIDEOS)), len(VIDEOS), log_start)


def test_latents_and_captions_from_different_nodes_are_refused(server, image_folder):
    """ResolutionBucket reorders: its latents with MakeTrainingDataset's captions would pair images with other
    images' captions. Same totals, different split: a clear error naming the inputs, not silent mistraining."""
    if not has_nodes(server, "ResolutionBucket"):
        pytest.skip("this ComfyUI has no ResolutionBucket node (added after 0.3.75)")
    wf = dataset_workflow("miswired", image_folder)
    wf["buckets"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["data", 0], "conditioning": ["data", 1]}}
    wf["train"]["inputs"].update(latents=["buckets", 0])
    with pytest.raises(harness.PromptError, match="connect latents and positive from the same node"):
        server.run(wf)


def test_saved_file_carries_the_metadata_hubs_read(server, image_folder):
    """A kohya file saved from the folder data set, with its captions, a title, trigger words and the loss graph as
    thumbnail: every ss_* / modelspec key has the run's value and the sshs hashes are kohya's definition of them."""
    import base64
    import collections
    import datetime
    import hashlib
    import io

    import safetensors.torch

    wf = dataset_workflow("metadata", image_folder, steps=2)
    wf["save"]["inputs"].update(format="kohya", title="Blocks", trigger_words="sks blocks", loss=["train", 2],
                                captions=["images", 1])
    wf["save_pictured"] = {**wf["save"], "inputs": {**wf["save"]["inputs"], "thumbnail": ["images", 0]}}
    entry = server.run(wf)
    pictured = server.base_dir / "models" / "loras" / entry["outputs"]["save_pictured"]["text"][0]
    with safe_open(str(pictured), framework="pt") as f:
        thumb = f.metadata()["modelspec.thumbnail"].removeprefix("data:image/png;base64,")
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(thumb))).convert("RGB"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in (server.base_dir / "input" / image_folder).glob("*.png")]
    assert any(i.shape == thumb.shape and (i == thumb).all() for i in images)  # the first image the list gave
    path = server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("lora_unet_") for k in tensors)
    want = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
            "ss_base_model_version": "sd3", "ss_steps": "2", "ss_learning_rate": "0.001", "ss_seed": "0",
            "ss_optimizer": "torch.optim.adamw.AdamW", "ss_num_train_images": str(len(IMAGES)),
            "ss_resolution": "(64, 64)", "ss_output_name": "metadata", "ss_batch_size_per_device": "1",
            "modelspec.architecture": "stable-diffusion-3/lora", "modelspec.title": "Blocks",
            "modelspec.trigger_phrase": "sks blocks", "modelspec.resolution": "64x64", "lora_trainer.format": "kohya"}
    assert {k: meta.get(k) for k in want} == want
    assert 0 < float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"  # SD3's own names
    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).tzinfo is not None
    tags = json.loads(meta["ss_tag_frequency"])["dataset"]
    # kohya's tags: the comma-separated parts of every caption (the long caption repeats one tag six times)
    assert tags == dict(collections.Counter(
        t.strip() for c in CAPTIONS for t in c.split(",") if t.strip()))
    png = base64.b64decode(meta["modelspec.thumbnail"].removeprefix("data:image/png;base64,"))
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] <= 256
    # kohya: model hash = SHA-256 of the file after its header; legacy = 64 KiB at 1 MiB of the ss_*-only serialisation
    data = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
