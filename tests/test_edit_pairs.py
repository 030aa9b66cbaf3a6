"""Edit data sets through the real server: a folder of target images, their reference images and edit instructions →
Load Edit Pairs (a VAE from VAELoader, CLIP-L from CLIPLoader) → Train LoRA on a Flux, the class Flux Kontext loads as,
which reads the references (``ref_latents``).

- The node's outputs: each target's latent, its instruction, and exactly its own references in order, in both layouts
  (the references here are copies of other items' targets, so their latents must be those targets' latents).
- Training: each item trains against its own references: swapping two items' references changes the LoRA, while a
  copy of the folder gives the identical LoRA (the Flux is ~0.5 B parameters on ComfyUI 0.3.75, whose Flux width is
  fixed: tools/dataset_models.py).
- A folder that is no edit data set is an error naming the file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import dataset_models
import harness
import workflows as wfs
from tests.test_dataset_nodes import blocks

pytestmark = pytest.mark.fast

NODE = "LoraTrainer_LoadEditPairs"
TEXT_ENCODER, VAE = "clip_l.safetensors", "taesd16.safetensors"
TRAIN = {"steps": 2, "batch_size": 2, "learning_rate": 0.001, "rank": 4, "training_dtype": "fp32",
         "lora_dtype": "fp32", "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def encoders(comfy_server) -> None:
    dataset_models.install(comfy_server.base_dir, TEXT_ENCODER, VAE)


def pictures(seed: int, *sizes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [blocks(rng, w, h) for w, h in sizes]


def write(folder: Path, images: dict[str, np.ndarray], captions: dict[str, str]) -> str:
    """Image files (``.webp`` lossless, so a copy of a picture encodes to the same latent) and caption files in an
    input subfolder; its name, as the node's folder input takes it."""
    for name, pixels in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name, lossless=True)
    for stem, text in captions.items():
        (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    return folder.name


def loaders() -> dict:
    return {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
            # type sd3: CLIP-L's context padded to 4096 wide and a 2048-wide pooled output
            "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT_ENCODER, "type": "sd3"}}}


def edit_pairs(folder: str, node_id: str = "data") -> dict:
    return {node_id: {"class_type": NODE, "inputs": {"folder": folder, "vae": ["vae", 0], "clip": ["clip", 0]}}}


def described(server, folder: str) -> list[dict]:
    wf = {**loaders(), **edit_pairs(folder), "report": {"class_type": "LoraTrainerTest_DescribeDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "captions": ["data", 2]}}}
    return server.run(wf)["outputs"]["report"]["items"]


def test_each_target_gets_its_caption_and_its_own_references_in_order(server, encoders):
    a, b, c = pictures(0, (64, 64), (64, 64), (96, 64))
    root = server.base_dir / "input" / "edit_layouts"
    # a: one reference beside it (b's picture); b: two in control folders (c's picture, then a's); c: one beside it
    # (a's picture), the target itself a .webp of another size.
    folder = write(root, {"a.png": a, "a_ref.png": b, "b.png": b, "control/b.png": c, "control2/b.png": a,
                          "c.webp": c, "c_ref.png": a},
                   {"a": "make it blue", "b": "swap the colours", "c": "crop the left side"})
    items = described(server, folder)
    latent = {name: item["latent"] for name, item in zip("abc", items)}
    assert [item["references"] for item in items] == [[latent["b"]], [latent["c"], latent["a"]], [latent["a"]]]
    assert [item["caption"] for item in items] == ["make it blue", "swap the colours", "crop the left side"]
    assert [item["shape"] for item in items] == [[1, 16, 8, 8], [1, 16, 8, 8], [1, 16, 8, 12]]
    assert all(item["context"] == [1, 77, dataset_models.CLIP_L_SD3_CONTEXT] for item in items)

    # Files changed since: loaded again, not ComfyUI's cached result of the same folder name.
    (root / "a.txt").write_text("make it red\n", encoding="utf-8")
    assert described(server, folder)[0]["caption"] == "make it red"


def test_an_edit_data_set_saved_and_loaded_keeps_each_items_references(server, encoders):
    """Save Training Data Set stores each caption's reference latents; Load Training Data Set gives them back."""
    a, b, c = pictures(6, (64, 64), (64, 64), (96, 64))
    folder = write(server.base_dir / "input" / "edit_saved", {"a.png": a, "a_ref.png": b, "b.png": b,
                                                              "control/b.png": c, "control2/b.png": a},
                   {"a": "make it blue", "b": "swap the colours"})
    wf = {**loaders(), **edit_pairs(folder), "save": {"class_type": "LoraTrainer_SaveTrainingDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1], "name": "edit/saved"}},
          "report": {"class_type": "LoraTrainerTest_DescribeDataset", "inputs": {
              "latents": ["data", 0], "positive": ["data", 1]}}}
    outputs = server.run(wf)["outputs"]
    loaded = server.run({"data": {"class_type": "LoraTrainer_LoadTrainingDataset", "inputs": {
        "dataset": outputs["save"]["text"][0]}}, "report": {"class_type": "LoraTrainerTest_DescribeDataset", "inputs": {
            "latents": ["data", 0], "positive": ["data", 1]}}})["outputs"]
    assert [len(item["references"]) for item in outputs["report"]["items"]] == [1, 2]
    assert loaded["report"]["items"] == outputs["report"]["items"]


def test_a_folder_that_is_no_edit_data_set_names_the_file(server, encoders):
    a, b = pictures(1, (64, 64), (64, 64))
    folder = write(server.base_dir / "input" / "edit_unpaired", {"a.png": a, "a_ref.png": b, "b.png": b},
                   {"a": "make it blue", "b": "make it red"})
    with pytest.raises(harness.PromptError, match=r"folder: b\.png has no reference image: add b_ref\.png beside it "
                                                  r"or control/b\.png"):
        described(server, folder)


@pytest.mark.slow("trains a 0.5 B-parameter Flux three times (ComfyUI 0.3.75 fixes Flux's width); the fast tests "
                  "check the node's references and the family matrix trains Flux")
def test_each_item_trains_against_its_own_references(server, encoders):
    """Two items (one reference beside it, one in control/) trained in one batch: the same folder again gives the
    identical LoRA, the folder with the two items' references swapped a different one."""
    model = dataset_models.install_flux_for_clip_l(server.base_dir)
    a, b, ref_a, ref_b = pictures(2, *[(64, 64)] * 4)
    captions = {"a": "make it blue", "b": "make it red"}
    root = server.base_dir / "input"
    original = write(root / "edit_train", {"a.png": a, "a_ref.png": ref_a, "b.png": b, "control/b.png": ref_b},
                     captions)
    copy = shutil.copytree(root / original, root / "edit_train_copy").name
    swapped = write(root / "edit_train_swapped", {"a.png": a, "a_ref.png": ref_b, "b.png": b, "control/b.png": ref_a},
                    captions)
    wf = {**loaders(), "model": {"class_type": "UNETLoader", "inputs": {"unet_name": model, "weight_dtype": "default"}}}
    for key, folder in (("original", original), ("copy", copy), ("swapped", swapped)):
        wf.update(edit_pairs(folder, f"data_{key}"))
        wf[f"train_{key}"] = {"class_type": "LoraTrainer_TrainLoRA", "inputs": {
            **wfs.TRAIN_DEFAULTS, **TRAIN,
            "model": ["model", 0], "latents": [f"data_{key}", 0], "positive": [f"data_{key}", 1]}}
        wf[f"save_{key}"] = {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
            "lora": [f"train_{key}", 1], "prefix": f"edit/{key}", "steps": [f"train_{key}", 3],
            "captions": [f"data_{key}", 2]}}
    server.free()  # other tests' models leave memory before the 0.5 B one loads
    outputs = server.run(wf)["outputs"]
    loras = {key: load_file(server.base_dir / "models" / "loras" / outputs[f"save_{key}"]["text"][0])
             for key in ("original", "copy", "swapped")}
    assert all(len(outputs[f"train_{key}"]["lora_trainer_loss"]) == TRAIN["steps"] for key in loras)
    assert loras["original"].keys() == loras["copy"].keys() == loras["swapped"].keys()
    same = [k for k in loras["original"] if not loras["original"][k].equal(loras["copy"][k])]
    assert not same, f"the same data set trained differently: {same[:5]}"
    changed = [k for k in loras["original"] if not loras["original"][k].equal(loras["swapped"][k])]
    # The LoRA's up weights start at zero, so after 2 steps each changed layer shows it in its up weights.
    assert any(k.endswith("lora_up.weight") for k in changed), "swapping the references left the LoRA unchanged"


class RecordingClip:
    """A CLIP that records what it is asked to tokenize; its tokenizer takes images, as Qwen-Image's does."""

    class tokenizer:
        @staticmethod
        def tokenize_with_weights(text, return_word_ids=False, llama_template=None, images=(), **kwargs):
            raise AssertionError("only the signature is read")

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def tokenize(self, text: str, **kwargs):
        self.calls.append((text, kwargs))
        return {}

    def encode_from_tokens_scheduled(self, tokens):
        import torch

        return [[torch.zeros(1, 4, 8), {}]]


@pytest.mark.parametrize("mode", ["Qwen-Image-Edit", "Qwen-Image-Edit Plus"])
def test_qwen_image_edit_prompts_show_the_references_as_comfyuis_own_node_does(mode):
    """``references_in_prompt``: the text encoder gets the prompt, template and pictures that ComfyUI's text node for
    the model (TextEncodeQwenImageEdit, or ...Plus) gives it at inference for the same instruction and references."""
    import importlib

    import torch

    edit_node = importlib.import_module(f"{harness.load_pack().__name__}.nodes.edit_pairs")
    from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit, TextEncodeQwenImageEditPlus

    references = [torch.from_numpy(p.astype(np.float32) / 255)[None] for p in pictures(3, (96, 64), (64, 128))]
    if mode == "Qwen-Image-Edit":  # one reference
        references = references[:1]
    ours, comfy = RecordingClip(), RecordingClip()
    edit_node.encode_caption(ours, "put a hat on it", references, mode)
    if mode == "Qwen-Image-Edit":
        TextEncodeQwenImageEdit.execute(comfy, "put a hat on it", image=references[0])
    else:
        TextEncodeQwenImageEditPlus.execute(comfy, "put a hat on it", image1=references[0], image2=references[1])
    (text, kwargs), = ours.calls
    (want_text, want_kwargs), = comfy.calls
    assert text == want_text and kwargs.keys() == want_kwargs.keys()
    assert kwargs.get("llama_template") == want_kwargs.get("llama_template")
    assert [i.shape for i in kwargs["images"]] == [i.shape for i in want_kwargs["images"]]
    assert all(torch.equal(i, j) for i, j in zip(kwargs["images"], want_kwargs["images"]))


def test_references_in_prompt_needs_a_text_encoder_that_reads_images(server, encoders):
    a, b = pictures(4, (64, 64), (64, 64))
    folder = write(server.base_dir / "input" / "edit_text_only", {"a.png": a, "a_ref.png": b}, {"a": "make it blue"})
    wf = {**loaders(), **edit_pairs(folder), "report": {"class_type": "LoraTrainerTest_DescribeDataset", "inputs": {
        "latents": ["data", 0], "positive": ["data", 1]}}}
    wf["data"]["inputs"]["references_in_prompt"] = "Qwen-Image-Edit Plus"
    with pytest.raises(harness.PromptError, match="references_in_prompt: this text encoder reads text only"):
        server.run(wf)


def test_qwen_image_edit_shows_its_text_encoder_one_reference():
    import importlib

    edit_node = importlib.import_module(f"{harness.load_pack().__name__}.nodes.edit_pairs")
    pairs = [edit_node.EditPair(Path("a.png"), (Path("a_ref.png"),), "x"),
             edit_node.EditPair(Path("b.png"), (Path("b_ref.png"), Path("b_ref2.png")), "y")]
    with pytest.raises(ValueError, match=r"references_in_prompt: b\.png has 2 references; 'Qwen-Image-Edit' shows .* "
                                         r"use 'Qwen-Image-Edit Plus'"):
        edit_node.check_prompt_mode("Qwen-Image-Edit", RecordingClip(), pairs)
    edit_node.check_prompt_mode("Qwen-Image-Edit Plus", RecordingClip(), pairs)
