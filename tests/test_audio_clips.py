"""Audio data sets through the real server: a folder of clips with captions (and lyrics) → Load Audio Clips →
ComfyUI's own VAE Encode Audio → Train LoRA on ACE-Step 1.5 → ComfyUI's LoraModelLoader → a generated audio latent.

- The node's outputs: each clip decoded by ComfyUI's own audio loader (PyAV), stereo, cut or padded with silence to
  the chosen seconds at its own sample rate, with its caption and lyrics; a changed caption loads again.
- A folder that is no audio data set, or a file that is no audio, is an error naming the file.
- Training: generated clips encoded by a generated VAE of the family (the full-size Oobleck VAE ComfyUI builds,
  seeded: tools/dataset_models.py) train a LoRA on the family matrix's ACE-Step 1.5 and Stable Audio (ComfyUI 0.33;
  0.3.75 has no ACE-Step 1.5 and detects Stable Audio only at 1.06 B parameters: skipped there); its every key loads in LoraModelLoader and it changes the
  audio latent KSampler generates. The text encoders (ACE-Step 1.5's Qwen3 language models, 0.6 B parameters and up;
  Stable Audio's T5) are replaced by a stand-in node that gives each clip's caption and lyrics their own conditioning
  of the family's shape, in the place of ComfyUI's TextEncodeAceStepAudio1.5.
ComfyUI's audio nodes import torchaudio: the server needs it (tools/requirements-dev.txt).
"""
from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import dataset_models
import family_models as fm
import harness
import untrainable_families
import workflows as wfs

pytestmark = pytest.mark.fast

NODE = "LoraTrainer_LoadAudioClips"
TRAIN = {"steps": 2, "batch_size": 2, "learning_rate": 0.001, "rank": 4, "training_dtype": "fp32",
         "lora_dtype": "fp32", "gradient_checkpointing": False}


def tone(seed: int, seconds: float, rate: int, channels: int) -> np.ndarray:
    """A seeded chord with noise, as 16-bit PCM (samples, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    chord = sum(np.sin(2 * math.pi * f * t) for f in rng.uniform(110, 880, 3)) / 4
    pcm = chord[:, None] + 0.05 * rng.standard_normal((t.size, channels))
    return np.clip(pcm * 32767, -32768, 32767).astype("<i2")


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


def write_flac(path: Path, pcm: np.ndarray, rate: int) -> None:
    """A lossless FLAC through PyAV (ComfyUI's own audio library)."""
    import av

    with av.open(str(path), "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, layout="mono" if pcm.shape[1] == 1 else "stereo")
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16",
                                           layout="mono" if pcm.shape[1] == 1 else "stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def write(folder: Path, clips: dict[str, tuple[np.ndarray, int]], texts: dict[str, str]) -> str:
    """Clips (``.wav`` or ``.flac`` by name) and text files in an input subfolder; its name, as the node takes it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (pcm, rate) in clips.items():
        (write_flac if name.endswith(".flac") else write_wav)(folder / name, pcm, rate)
    for name, text in texts.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder.name


def audio_clips(folder: str, seconds: float, node_id: str = "clips") -> dict:
    return {node_id: {"class_type": NODE, "inputs": {"folder": folder, "seconds": seconds}}}


def described(server, folder: str, seconds: float, samples: int = 8) -> dict:
    wf = {**audio_clips(folder, seconds), "report": {"class_type": "LoraTrainerTest_DescribeAudio", "inputs": {
        "samples": samples, "audio": ["clips", 0], "captions": ["clips", 1], "lyrics": ["clips", 2]}}}
    return server.run(wf)["outputs"]["report"]


def test_each_clip_is_decoded_as_stereo_of_the_chosen_length_with_its_caption_and_lyrics(server):
    a = tone(0, 0.5, 22050, 1)  # mono: heard on both channels
    b = tone(1, 0.2, 16000, 2)  # shorter than the length: padded with silence
    c = tone(2, 0.5, 48000, 1)
    root = server.base_dir / "input" / "audio_layout"
    folder = write(root, {"a.wav": (a, 22050), "b.wav": (b, 16000), "c.flac": (c, 48000)},
                   {"a.txt": "rock, electric guitar", "b.txt": "jazz, piano", "c.txt": "ambient",
                    "a.lyrics.txt": "[verse]\nla la la"})
    report = described(server, folder, 0.3, samples=8)
    assert [x["sample_rate"] for x in report["audio"]] == [22050, 16000, 48000]
    assert [x["shape"] for x in report["audio"]] == [[1, 2, 6615], [1, 2, 4800], [1, 2, 14400]]
    assert report["audio"][0]["pcm"] == [a[:8, 0].tolist()] * 2
    assert report["audio"][1]["pcm"] == b[:8].T.tolist()
    assert report["audio"][2]["pcm"] == [c[:8, 0].tolist()] * 2
    assert report["captions"] == ["rock, electric guitar", "jazz, piano", "ambient"]
    assert report["lyrics"] == ["[verse]\nla la la", "", ""]
    # b's 0.2 s end in silence up to 0.3 s: its last samples are zeros
    tail = described(server, folder, 0.3, samples=4800)["audio"][1]["pcm"]
    assert tail[0][3200:] == [0] * 1600 and tail[0][:3200] == b[:, 0].tolist()
    # 0 s: each clip's own length
    assert [x["shape"][2] for x in described(server, folder, 0.0)["audio"]] == [11025, 3200, 24000]

    # Files changed since: loaded again, not ComfyUI's cached result of the same folder name.
    (root / "a.txt").write_text("metal\n", encoding="utf-8")
    assert described(server, folder, 0.3)["captions"][0] == "metal"


@pytest.mark.parametrize("files, message", [
    ({"a.wav": True, "b.wav": True, "a.txt": "rock"}, r"folder: b\.wav has no caption file b\.txt"),
    ({"a.wav": False, "a.txt": "rock"}, r"folder: a\.wav is not an audio file that can be read"),
    ({"a.txt": "rock"}, r"folder: 'audio_bad' holds no audio files"),
])
def test_a_folder_that_is_no_audio_data_set_names_the_file(server, files, message):
    root = server.base_dir / "input" / "audio_bad"
    for old in root.glob("*") if root.exists() else ():
        old.unlink()
    clips = {name: (tone(3, 0.1, 8000, 1), 8000) for name, good in files.items() if good is True}
    folder = write(root, clips, {name: text for name, text in files.items() if isinstance(text, str)})
    for name in (n for n, good in files.items() if good is False):
        (root / name).write_bytes(b"RIFF not really a wave file")
    with pytest.raises(harness.PromptError, match=message):
        described(server, folder, 0.1)


@dataclass(frozen=True)
class AudioFamily:
    """An audio model family trained from clips: its generated VAE (tools/dataset_models.py), ComfyUI's empty-latent
    node for it, and the latent frames of 1 s."""
    vae: str
    empty: str
    frames: int


AUDIO_FAMILIES = {
    "ace_step15": AudioFamily("ace15_vae.safetensors", "EmptyAceStep1.5LatentAudio", 25),  # 48 kHz / 1920
    # Stable Audio Open: the same Oobleck VAE at 44.1 kHz / 2048 (58 M parameters on ComfyUI 0.33; 0.3.75's detection
    # fixes 24 layers, 1.06 B: skipped there, as in the family matrix)
    "stable_audio": AudioFamily("stable_audio_vae.safetensors", "EmptyLatentAudio", 21),
}


def installed_family(server, name: str) -> str:
    """The family matrix's generated model (tools/family_models.py, cached) and the family's VAE, linked where
    UNETLoader and VAELoader find them; the model's file name. Skips where the running ComfyUI lacks the class or
    detects it only above the family matrix's size limit."""
    import comfy.supported_models

    family = fm.BY_NAME[name]
    if not hasattr(comfy.supported_models, family.detected_as):
        pytest.skip(f"ComfyUI {harness.comfyui_version()} has no {family.detected_as} (ACE-Step 1.5: ComfyUI 0.33+; "
                    f"its ACE-Step 1 has a fixed 3.3 B-parameter layout)")
    built = fm.build(family)
    if built.parameters > untrainable_families.TINY_LIMIT:  # as the family matrix: minutes and GBs on a CPU
        pytest.skip(f"the smallest {family.detected_as} ComfyUI {harness.comfyui_version()} detects has "
                    f"{built.parameters / 1e9:.2f} B parameters, over the {untrainable_families.TINY_LIMIT / 1e9:.0f} B "
                    f"the tests train on a CPU (it took over ten minutes)")
    path = fm.write(family, built, harness.REPO / ".cache" / "family_models" / harness.comfyui_version())
    link = server.base_dir / "models" / "diffusion_models" / path.name
    if not link.exists():
        link.symlink_to(path)
    dataset_models.install(server.base_dir, AUDIO_FAMILIES[name].vae)
    return path.name


@pytest.fixture(scope="module")
def ace_step15(comfy_server) -> str:
    """The tiny ACE-Step 1.5 of the family matrix and its VAE (ComfyUI 0.33+)."""
    return installed_family(comfy_server, "ace_step15")


def generated(model: list, positive: list) -> dict:
    """One step of KSampler from an empty 1 s audio latent (a fixed seed)."""
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": positive, "negative": positive, "latent_image": ["empty", 0], "denoise": 1.0}}


@pytest.mark.slow("encodes with a full-size (169 M-parameter) audio VAE and trains a 318 M-parameter ACE-Step 1.5 "
                  "and a 58 M-parameter Stable Audio (ComfyUI 0.33) on the CPU, one to three minutes each; the fast "
                  "tests check the node's outputs")
@pytest.mark.parametrize("name", list(AUDIO_FAMILIES))
def test_a_lora_trains_on_audio_clips_and_changes_the_generated_latent(server, name):
    family = AUDIO_FAMILIES[name]
    model = installed_family(server, name)
    root = server.base_dir / "input"
    folder = write(root / "audio_train", {"a.wav": (tone(4, 1.0, 48000, 2), 48000),
                                          "b.wav": (tone(5, 0.6, 44100, 1), 44100)},
                   {"a.txt": "rock, electric guitar", "b.txt": "jazz, piano", "a.lyrics.txt": "[verse]\nla la la"})
    wf = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}},
          "vae": {"class_type": "VAELoader", "inputs": {"vae_name": family.vae}},
          **audio_clips(folder, 1.0),
          "latents": {"class_type": "VAEEncodeAudio", "inputs": {"audio": ["clips", 0], "vae": ["vae", 0]}},
          "text": {"class_type": "LoraTrainerTest_FamilyCaption", "inputs": {
              "family": name, "tags": ["clips", 1], "lyrics": ["clips", 2]}},
          "train": {"class_type": "LoraTrainer_TrainLoRA", "inputs": {
              **wfs.TRAIN_DEFAULTS, **TRAIN, "model": ["model", 0], "latents": ["latents", 0],
              "positive": ["text", 0]}},
          "save": {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
              "lora": ["train", 1], "prefix": f"audio/{name}", "steps": ["train", 3], "captions": ["clips", 1]}},
          "lora": {"class_type": "LoraModelLoader", "inputs": {
              "model": ["model", 0], "lora": ["train", 1], "strength_model": 1.0}},
          "prompt": {"class_type": "LoraTrainerTest_FamilyCaption", "inputs": {
              "family": name, "tags": "rock", "lyrics": ""}},
          "empty": {"class_type": family.empty, "inputs": {"seconds": 1.0, "batch_size": 1}},
          "base": generated(["model", 0], ["prompt", 0]),
          "with_lora": generated(["lora", 0], ["prompt", 0]),
          "report_data": {"class_type": "LoraTrainerTest_DescribeAudio", "inputs": {
              "samples": 0, "audio": ["clips", 0], "latents": ["latents", 0]}},
          "report_base": {"class_type": "LoraTrainerTest_DescribeAudio", "inputs": {
              "samples": 0, "latents": ["base", 0]}},
          "report_lora": {"class_type": "LoraTrainerTest_DescribeAudio", "inputs": {
              "samples": 0, "latents": ["with_lora", 0]}}}
    server.free()  # other tests' models leave memory first
    log_start = len(server.log_text())
    outputs = server.run(server.with_defaults(wf))["outputs"]
    log = server.log_text()[log_start:]
    # 1 s of each clip (b padded, both resampled by VAE Encode Audio to the VAE's rate where it differs)
    assert [x["shape"] for x in outputs["report_data"]["latents"]] == [[1, 64, family.frames]] * 2
    assert len(outputs["train"]["lora_trainer_loss"]) == TRAIN["steps"]
    assert outputs["save"]["text"][0].startswith(f"audio/{name}_2_steps")
    assert "lora key not loaded" not in log, next(l for l in log.splitlines() if "lora key not loaded" in l)
    base, with_lora = outputs["report_base"]["latents"][0], outputs["report_lora"]["latents"][0]
    assert base["shape"] == with_lora["shape"] and base["shape"][:2] == [1, 64]
    assert base["digest"] != with_lora["digest"], "the LoRA left the generated audio latent unchanged"
