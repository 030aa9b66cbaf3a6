"""Load Video Clips through the real server: a folder of video files and frame folders becomes one 5-D latent per
clip (ComfyUI's MakeTrainingDataset with a Wan VAE) with its own caption, in name order; ``max_frames`` cuts clips;
an unreadable video or a clip of frames of different sizes is an error naming the file. The folder rules themselves:
tests/test_video_clips_unit.py; training on such a set: the video template's test (tests/test_templates.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dataset_models
import harness
from tests.test_dataset_nodes import VIDEO_CAPTIONS, VIDEOS, blocks, write_videos

pytestmark = pytest.mark.fast

VAE = "wan_vae.safetensors"
TEXT_ENCODER = "clip_l.safetensors"
FRAMES = 6  # the frame folder's clip


def write_frames(folder, name: str, sizes: list[tuple[int, int]], caption: str) -> None:
    rng = np.random.default_rng(2)
    (folder / name).mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(blocks(rng, w, h)).save(folder / name / f"{i:04d}.png")
    (folder / f"{name}.txt").write_text(caption, encoding="utf-8")


def described(server, folder: str, max_frames: int) -> list[dict]:
    """The data set's items (latent shape, caption) as MakeTrainingDataset encodes the node's outputs."""
    dataset_models.install(server.base_dir, TEXT_ENCODER, VAE)
    wf = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
          "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT_ENCODER, "type": "sd3"}},
          "clips": {"class_type": "LoraTrainer_LoadVideoClips", "inputs": {"folder": folder, "max_frames": max_frames}},
          "data": {"class_type": "MakeTrainingDataset", "inputs": {
              "images": ["clips", 0], "texts": ["clips", 1], "vae": ["vae", 0], "clip": ["clip", 0]}},
          "report": {"class_type": "LoraTrainerTest_DescribeDataset", "inputs": {
              "latents": ["data", 0], "positive": ["data", 1], "captions": ["clips", 1]}}}
    return server.run(wf)["outputs"]["report"]["items"]


@pytest.fixture(scope="module")
def clips(comfy_server) -> str:
    folder = comfy_server.base_dir / "input" / "video_clips"
    write_videos(folder)  # vid_0 … vid_3
    write_frames(folder, "frames", [(64, 64)] * FRAMES, "a checkerboard changing colours")
    return folder.name


def latent_frames(frames: int) -> int:
    """Wan's VAE: the first frame, then one latent frame per 4 (frames after the last 4k + 1 left out)."""
    return 1 + (frames - 1) // 4


@pytest.mark.parametrize("max_frames", [0, 5])
def test_each_clip_is_one_video_latent_with_its_caption(server, clips, max_frames):
    items = described(server, clips, max_frames)
    lengths = [FRAMES] + [f for _, _, f in VIDEOS]  # name order: frames, vid_0, …
    sizes = [(64, 64)] + [(w, h) for w, h, _ in VIDEOS]
    want = [[1, 16, latent_frames(min(n, max_frames or n)), h // 8, w // 8] for n, (w, h) in zip(lengths, sizes)]
    assert [item["shape"] for item in items] == want
    assert [item["caption"] for item in items] == ["a checkerboard changing colours", *VIDEO_CAPTIONS]


def test_an_unreadable_video_is_an_error_naming_it(server):
    folder = server.base_dir / "input" / "video_clips_broken"
    folder.mkdir(parents=True)
    (folder / "a.mp4").write_bytes(b"not a video")
    (folder / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(harness.PromptError, match=r"folder: a\.mp4 is not a video that can be read"):
        described(server, folder.name, 0)


def test_frames_of_different_sizes_are_an_error_naming_the_clip(server):
    folder = server.base_dir / "input" / "video_clips_sizes"
    write_frames(folder, "a", [(64, 64), (64, 64), (96, 64)], "x")
    with pytest.raises(harness.PromptError, match=r"folder: the frames of a/ have different sizes \(height x width: "
                                                  r"64x64, 64x96\)"):
        described(server, folder.name, 0)


def test_a_folder_that_is_no_video_data_set_is_an_error(server):
    folder = server.base_dir / "input" / "video_clips_stray"
    folder.mkdir(parents=True)
    (folder / "notes.pdf").write_bytes(b"")
    with pytest.raises(harness.PromptError, match=r"folder: notes\.pdf is neither a video"):
        described(server, folder.name, 0)
