"""The templates in example_workflows/: listed by ComfyUI, and their API copies run (the demo as it is, the edit and
audio templates on generated stand-ins for their models) or validate (real world)."""
import json
from pathlib import Path

import dataset_models
import demo
import pytest

from tests.test_audio_clips import ace_step15, tone  # noqa: F401  (a fixture)
from tests.test_audio_clips import write as write_clips
from tests.test_edit_pairs import pictures, write

pytestmark = pytest.mark.fast

TEMPLATES = Path(__file__).resolve().parent.parent / "example_workflows"
NAMES = sorted(p.stem for p in TEMPLATES.glob("*.json"))
# Nodes a template uses that ComfyUI 0.3.75 (CI's) does not have: the audio template is for ACE-Step 1.5 (0.33+).
NEWER_NODES = {"TextEncodeAceStepAudio1.5"}


def test_templates_are_in_comfyuis_template_list(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed["lora_trainer"]) == NAMES == ["lora_trainer_audio_ace_step15", "lora_trainer_demo_tiny_model",
                                                       "lora_trainer_edit_flux_kontext", "lora_trainer_real_world",
                                                       "lora_trainer_samples_flux", "lora_trainer_video_wan21"]
    for name in NAMES:
        ui = server.get(f"/api/workflow_templates/lora_trainer/{name}.json")
        api = json.loads((TEMPLATES / "api" / f"{name}.json").read_text())
        assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())


@pytest.mark.parametrize("name", ["lora_trainer_real_world", "lora_trainer_edit_flux_kontext",
                                  "lora_trainer_audio_ace_step15", "lora_trainer_video_wan21", "lora_trainer_samples_flux"])
def test_real_world_template_uses_existing_nodes(server, name):
    """Every node of the template exists with the inputs it sets (on ComfyUI 0.3.75 every node but NEWER_NODES)."""
    info = server.object_info()
    api = json.loads((TEMPLATES / "api" / f"{name}.json").read_text())
    for node in api.values():
        if node["class_type"] not in info:
            assert node["class_type"] in NEWER_NODES, f"{name}: ComfyUI has no node {node['class_type']}"
            continue
        assert set(node["inputs"]) <= set(info[node["class_type"]]["input"]["required"]) | set(
            info[node["class_type"]]["input"].get("optional", {}))


def test_demo_template_trains(server):
    dataset = demo.write_dataset(server.base_dir)
    api = json.loads((TEMPLATES / "api" / "lora_trainer_demo_tiny_model.json").read_text())
    api["data"]["inputs"]["dataset"] = dataset
    entry = server.run(api)
    assert entry["outputs"]["save"]["text"][0].startswith("demo/demo_lora_40_steps")
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 40


def edit_folder(server) -> str:
    """Two edit items in the template's layouts (a reference beside one target, in control/ for the other)."""
    a, b, ref_a, ref_b = pictures(5, *[(64, 64)] * 4)
    return write(server.base_dir / "input" / "template_edit_pairs",
                 {"a.png": a, "a_ref.png": ref_a, "b.png": b, "control/b.png": ref_b},
                 {"a": "make it blue", "b": "make it red"})


@pytest.mark.parametrize("unet", [
    "sd3", pytest.param("flux", marks=pytest.mark.slow(
        "a 0.5 B-parameter Flux (ComfyUI 0.3.75 fixes Flux's width); the fast case runs the same graph on a tiny SD3")),
])
def test_edit_template_trains(server, unet):
    """The Flux Kontext template with generated stand-ins for its files: the Flux class Kontext loads as (or, in the
    fast tier, a tiny SD3 that runs the same graph without reading the references), CLIP-L for Flux's two text
    encoders (no T5 here), a 16-channel VAE; 2 steps in fp32 (a CPU)."""
    dataset_models.install(server.base_dir, "clip_l.safetensors", "taesd16.safetensors", "sd3_clip_l.safetensors")
    api = json.loads((TEMPLATES / "api" / "lora_trainer_edit_flux_kontext.json").read_text())
    model = dataset_models.install_flux_for_clip_l(server.base_dir) if unet == "flux" else "sd3_clip_l.safetensors"
    api["model"]["inputs"].update(unet_name=model, weight_dtype="default")
    api["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "sd3"}}
    api["vae"]["inputs"]["vae_name"] = "taesd16.safetensors"
    api["data"]["inputs"]["folder"] = edit_folder(server)
    api["train"]["inputs"].update(steps=2, training_dtype="fp32", lora_dtype="fp32")
    server.free()  # a model of an earlier test leaves memory first
    entry = server.run(api)
    assert entry["outputs"]["save"]["text"][0].startswith("flux_kontext/my_edit_lora_2_steps")
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2
    assert entry["outputs"]["graph"]["images"]


@pytest.mark.slow("encodes with a full-size (169 M-parameter) audio VAE and trains a 318 M-parameter ACE-Step 1.5 on "
                  "the CPU (about a minute); the fast tier checks that the template's nodes exist")
def test_audio_template_trains(server, ace_step15):  # noqa: F811  (the fixture)
    """The ACE-Step 1.5 template with generated stand-ins for its files (ComfyUI 0.33+): the tiny ACE-Step 1.5 of
    the family matrix, a generated ACE-Step 1.5 VAE, and in the place of the Qwen3 text encoders and
    TextEncodeAceStepAudio1.5 a stand-in giving each clip's caption and lyrics their own conditioning; two 1 s clips,
    2 steps in fp32 (a CPU)."""
    api = json.loads((TEMPLATES / "api" / "lora_trainer_audio_ace_step15.json").read_text())
    api["model"]["inputs"]["unet_name"] = ace_step15
    api["vae"]["inputs"]["vae_name"] = "ace15_vae.safetensors"
    del api["clip"]
    api["text"] = {"class_type": "LoraTrainerTest_FamilyCaption", "inputs": {
        "family": "ace_step15", "tags": api["text"]["inputs"]["tags"], "lyrics": api["text"]["inputs"]["lyrics"]}}
    api["clips"]["inputs"].update(seconds=1.0, folder=write_clips(
        server.base_dir / "input" / "template_audio_clips",
        {"a.wav": (tone(6, 1.2, 48000, 2), 48000), "b.flac": (tone(7, 0.9, 48000, 1), 48000)},
        {"a.txt": "rock, electric guitar", "b.txt": "jazz, piano", "b.lyrics.txt": "[chorus]\nla la"}))
    api["train"]["inputs"].update(steps=2, training_dtype="fp32", lora_dtype="fp32")
    server.free()  # a model of an earlier test leaves memory first
    entry = server.run(api)
    assert entry["outputs"]["save"]["text"][0].startswith("ace_step15/my_audio_lora_2_steps")
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2
    assert entry["outputs"]["graph"]["images"]


def clips_folder(server) -> tuple[str, int]:
    """(an input subfolder in the video template's layouts, its clip count): the four captioned video files of the
    data-set test (5 and 9 frames, two sizes) and one clip as a folder of 7 frame images."""
    import numpy as np
    from PIL import Image

    from tests.test_dataset_nodes import VIDEOS, blocks, write_videos

    folder = server.base_dir / "input" / "template_video_clips"
    write_videos(folder)
    rng = np.random.default_rng(1)
    (folder / "frames").mkdir()
    for i in range(7):
        Image.fromarray(blocks(rng, 64, 64)).save(folder / "frames" / f"{i:04d}.png")
    (folder / "frames.txt").write_text("a checkerboard changing colours\n", encoding="utf-8")
    return folder.name, len(VIDEOS) + 1


def test_video_template_trains(server):
    """The Wan 2.1 video template with generated stand-ins for its files: the session's tiny Wan 2.1 for the 1.3 B
    model, CLIP-L as type sd3 (its 4096-wide context is Wan's text width) for UMT5-XXL, a Wan 2.1 VAE of the smallest
    width; the clips cut to 5 frames (2 latent frames); 2 steps in fp32 (a CPU)."""
    from tests.test_dataset_nodes import VIDEO_MODELS, assert_trained_on

    dataset_models.install(server.base_dir, "clip_l.safetensors", VIDEO_MODELS[1])
    api = json.loads((TEMPLATES / "api" / "lora_trainer_video_wan21.json").read_text())
    api["model"]["inputs"]["unet_name"] = VIDEO_MODELS[0]
    api["clip"]["inputs"].update(clip_name="clip_l.safetensors", type="sd3")
    api["vae"]["inputs"]["vae_name"] = VIDEO_MODELS[1]
    api["clips"]["inputs"].update(folder=(folder := clips_folder(server))[0], max_frames=5)
    api["train"]["inputs"].update(steps=2, training_dtype="fp32", lora_dtype="fp32")
    entry = server.run(api)
    assert entry["outputs"]["save"]["text"][0].startswith("wan/my_video_lora_2_steps")
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2
    assert entry["outputs"]["graph"]["images"]
    assert_trained_on(server, entry, folder[1])
