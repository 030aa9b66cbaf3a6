"""Unit tests of ``lora.hub_metadata``: kohya's ss_* keys, the modelspec keys, the sshs_* hashes, tag frequency.

No ComfyUI and no server. Expected values are written out from kohya sd-scripts' and musubi-tuner's definitions
(train_network.py, library/train_util.py, library/sai_model_spec.py); the hashes are recomputed here from their
definition over the bytes of a file that safetensors wrote, and once over bytes built by hand.
"""
from __future__ import annotations

import ast
import base64
import datetime
import hashlib
import json
import re
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from lora import hub_metadata as hm  # noqa: E402
from lora.hub_metadata import TrainingRecord  # noqa: E402

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
STARTED, FINISHED = 1_700_000_000.25, 1_700_003_600.5
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(40))


def sdxl_lora() -> TrainingRecord:
    return TrainingRecord(
        steps=500, algorithm="LoRA", rank=16, alpha=8.0, base_model="SDXL", learning_rate=1e-4, optimizer="AdamW",
        seed=42, batch_size=2, grad_accumulation_steps=2, training_dtype="bf16", lora_dtype="fp32", images=10,
        resolutions=((1024, 1024), (832, 1216)), started_at=STARTED, finished_at=FINISHED,
        network_args={"dora": True, "rs_lora": False, "module_filter": "attn"}, lr_scheduler="cosine",
        loss_function="Huber", previous_steps=100)


def flux_lokr() -> TrainingRecord:
    return TrainingRecord(
        steps=250, algorithm="LoKr", rank=8, alpha=1, base_model="Flux", learning_rate=5e-5, optimizer="SGD",
        seed=7, batch_size=4, grad_accumulation_steps=1, training_dtype="fp32", lora_dtype="bf16", images=9,
        resolutions=((512, 512),), started_at=STARTED, finished_at=FINISHED, network_args={})


def with_(record: TrainingRecord, **changes) -> TrainingRecord:
    return TrainingRecord(**{**record.__dict__, **changes})


# --- kohya ss_* keys -------------------------------------------------------------------------------------------------

def test_kohya_keys_of_an_sdxl_lora():
    meta = hm.kohya_metadata(sdxl_lora(), output_name="my_lora", captions=["a, b", "b"],
                             images_per_resolution={(1024, 1024): 7, (832, 1216): 3})
    assert all(isinstance(v, str) for v in meta.values())
    expected = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "16",
        "ss_network_alpha": "8.0",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_output_name": "my_lora",
        "ss_steps": "600",  # 100 before this run + 500
        "ss_max_train_steps": "600",
        "ss_learning_rate": "0.0001",
        "ss_unet_lr": "0.0001",
        "ss_text_encoder_lr": "0.0",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_lr_scheduler": "cosine",
        "ss_loss_type": "huber",
        "ss_seed": "42",
        "ss_mixed_precision": "bf16",
        "ss_num_train_images": "10",
        "ss_batch_size_per_device": "2",
        "ss_gradient_accumulation_steps": "2",
        "ss_total_batch_size": "4",
        "ss_resolution": "(1024, 1024)",
        # batches never mix resolutions: ceil(7/2) + ceil(3/2); an optimizer step takes 2 of them: 3 per epoch
        "ss_num_batches_per_epoch": "6",
        "ss_num_epochs": "200",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert float(meta["ss_training_started_at"]) == STARTED
    assert float(meta["ss_training_finished_at"]) == FINISHED
    assert ast.literal_eval(meta["ss_resolution"]) == (1024, 1024)
    assert json.loads(meta["ss_network_args"]) == {"dora": True, "rs_lora": False, "module_filter": "attn"}
    assert json.loads(meta["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [1024, 1024], "count": 7}, "1": {"resolution": [832, 1216], "count": 3}},
        "mean_img_ar_error": 0.0}
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": {"a": 1, "b": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 10}}


def test_kohya_keys_of_a_flux_lokr():
    meta = hm.kohya_metadata(flux_lokr(), output_name="flux_thing")
    expected = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": "8",
        "ss_network_alpha": "1.0",
        "ss_base_model_version": "flux1",
        "ss_v2": "False",
        "ss_steps": "250",
        "ss_learning_rate": "5e-05",
        "ss_optimizer": "torch.optim.sgd.SGD",
        "ss_lr_scheduler": "constant",
        "ss_loss_type": "l2",
        "ss_mixed_precision": "no",
        "ss_resolution": "(512, 512)",
        "ss_num_batches_per_epoch": "3",  # one resolution: ceil(9 / 4)
        "ss_num_epochs": "84",  # ceil(250 / 3)
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr"}
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {"0": {"resolution": [512, 512], "count": 9}}
    assert "ss_tag_frequency" not in meta  # only with captions


@pytest.mark.parametrize("algorithm, algo", [("LoHa", "loha"), ("LoKr", "lokr"), ("OFT", "diag-oft")])
def test_lycoris_algorithms_name_their_algo_first_and_keep_our_args(algorithm, algo):
    record = with_(flux_lokr(), algorithm=algorithm, network_args={"algo": "stale", "dora": True})
    meta = hm.kohya_metadata(record, output_name="x")
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert list(json.loads(meta["ss_network_args"]).items()) == [("algo", algo), ("dora", True)]


def test_a_lora_without_network_args_has_no_ss_network_args():
    # kohya writes ss_network_args only when network arguments were given
    assert "ss_network_args" not in hm.kohya_metadata(with_(sdxl_lora(), network_args={}), output_name="x")


def test_several_resolutions_without_counts_leave_out_what_depends_on_them():
    meta = hm.kohya_metadata(sdxl_lora(), output_name="x")
    for key in ("ss_bucket_info", "ss_num_batches_per_epoch", "ss_num_epochs"):
        assert key not in meta
    assert meta["ss_resolution"] == "(1024, 1024)"  # the first (most used) resolution


def test_tag_frequency_uses_the_given_dataset_name():
    meta = hm.kohya_metadata(flux_lokr(), output_name="x", captions=["Cat, dog"], dataset_name="10_pets")
    assert json.loads(meta["ss_tag_frequency"]) == {"10_pets": {"cat": 1, "dog": 1}}
    assert list(json.loads(meta["ss_dataset_dirs"])) == ["10_pets"]


def test_sd2_sets_ss_v2_and_unknown_optimizers_are_kept_as_named():
    meta = hm.kohya_metadata(with_(flux_lokr(), base_model="SD20", optimizer="Prodigy"), output_name="x")
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_optimizer"]) == ("True", "sd_v2", "Prodigy")


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="algorithm"):
        with_(flux_lokr(), algorithm="DyLoRA")


# --- modelspec -------------------------------------------------------------------------------------------------------

def test_modelspec_keys_of_an_sdxl_lora():
    meta = hm.modelspec_metadata(sdxl_lora(), title="My LoRA", trigger_words="mychar", description="A test.",
                                 implementation=hm.implementation_for("SDXL", "comfyui"), thumbnail_png=PNG)
    assert meta == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": "My LoRA",
        "modelspec.date": "2023-11-14T23:13:20+00:00",  # int(FINISHED) in UTC
        "modelspec.resolution": "1024x1024",
        "modelspec.trigger_phrase": "mychar",
        "modelspec.description": "A test.",
        "modelspec.thumbnail": "data:image/png;base64," + base64.b64encode(PNG).decode(),
    }
    stamp = datetime.datetime.fromisoformat(meta["modelspec.date"])
    assert stamp.timestamp() == int(FINISHED)
    assert base64.b64decode(meta["modelspec.thumbnail"].split(",", 1)[1]) == PNG


def test_modelspec_keys_of_a_flux_lokr_leave_out_what_is_not_given():
    meta = hm.modelspec_metadata(flux_lokr(), title="t", implementation="diffusers", date="2024-05-01")
    assert meta == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora",  # kohya writes /lora for LyCORIS networks too
        "modelspec.implementation": "diffusers",
        "modelspec.title": "t",
        "modelspec.date": "2024-05-01",
        "modelspec.resolution": "512x512",
    }


def test_a_thumbnail_that_is_no_png_is_refused():
    with pytest.raises(ValueError, match="PNG"):
        hm.modelspec_metadata(flux_lokr(), title="t", implementation="x", thumbnail_png=b"\xff\xd8\xff\xe0 jpeg")


# --- base model names ------------------------------------------------------------------------------------------------

FAMILIES = [  # base_model, ss_base_model_version, modelspec.architecture, ss_v2
    ("SD15", "sd_v1", "stable-diffusion-v1/lora", "False"),
    ("SD20", "sd_v2", "stable-diffusion-v2/lora", "True"),
    ("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
    ("SDXLRefiner", "sdxlrefiner", "stable-diffusion-xl-v1-refiner/lora", "False"),
    ("SD3", "sd3", "stable-diffusion-3/lora", "False"),
    ("Flux", "flux1", "flux-1-dev/lora", "False"),
    ("FluxSchnell", "flux1", "flux-1-schnell/lora", "False"),
    ("Chroma", "chroma", "chroma/lora", "False"),
    ("Lumina2", "lumina2", "lumina-2/lora", "False"),
    ("HunyuanImage21", "hunyuan-image-2.1", "hunyuan-image-2.1/lora", "False"),
    ("HunyuanVideo", "hunyuan_video", "hunyuan-video/lora", "False"),
    ("WAN21_T2V", "wan", "wan2.1/lora", "False"),
    ("WAN21_I2V", "wan", "wan2.1/lora", "False"),
    ("QwenImage", "qwen_image", "Qwen-Image/lora", "False"),
    ("ZImage", "z_image", "Z-Image/lora", "False"),
    ("WAN22_T2V", "wan22_t2v", "wan22-t2v/lora", "False"),
    ("LTXV", "ltxv", "ltxv/lora", "False"),
    ("AuraFlow", "auraflow", "auraflow/lora", "False"),
    ("PixArtSigma", "pixartsigma", "pixartsigma/lora", "False"),
    ("HiDream", "hidream", "hidream/lora", "False"),
    ("", "unknown", "unknown/lora", "False"),
]


@pytest.mark.parametrize("base_model, ss_version, architecture, v2", FAMILIES)
def test_base_model_names(base_model, ss_version, architecture, v2):
    record = with_(flux_lokr(), base_model=base_model)
    kohya = hm.kohya_metadata(record, output_name="x")
    spec = hm.modelspec_metadata(record, title="t", implementation="x")
    assert (kohya["ss_base_model_version"], spec["modelspec.architecture"], kohya["ss_v2"]) == \
        (ss_version, architecture, v2)


def test_every_comfyui_model_class_gets_a_plain_name():
    source = REPO / ".cache" / "comfyui-0.3.75" / "comfy" / "supported_models.py"
    if not source.is_file():
        pytest.skip("the ComfyUI 0.3.75 source is not in .cache")
    classes = [node.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.ClassDef)]
    assert len(classes) > 50
    for name in classes:
        family = hm.family_of(name)
        assert re.fullmatch(r"[A-Za-z0-9._-]+", family.ss_base_model_version), name
        assert re.fullmatch(r"[A-Za-z0-9.-]+", family.architecture), name  # no "/": the suffix is added once
        assert family.implementation.startswith("https://"), name


@pytest.mark.parametrize("base_model, file_format, implementation", [
    ("SDXL", "diffusers", "diffusers"),
    ("Flux", "diffusers", "diffusers"),
    ("SD15", "comfyui", "https://github.com/Stability-AI/generative-models"),
    ("SDXL", "kohya", "https://github.com/Stability-AI/generative-models"),
    ("SD3", "comfyui", "https://github.com/Stability-AI/generative-models"),
    ("Flux", "comfyui", "https://github.com/black-forest-labs/flux"),
    ("FluxSchnell", "kohya", "https://github.com/black-forest-labs/flux"),
    ("LTXV", "comfyui", "https://github.com/comfyanonymous/ComfyUI"),
    ("AuraFlow", "kohya", "https://github.com/comfyanonymous/ComfyUI"),
])
def test_implementation_for(base_model, file_format, implementation):
    assert hm.implementation_for(base_model, file_format) == implementation


# --- sshs hashes -----------------------------------------------------------------------------------------------------

def big_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {  # > 1.1 MB of data, in several dtypes (safetensors orders the data by dtype, then name)
        "diffusion_model.a.lora_down.weight": torch.randn(300, 1000, generator=g),
        "diffusion_model.a.lora_up.weight": torch.randn(1000, 16, generator=g).to(torch.bfloat16),
        "diffusion_model.a.alpha": torch.tensor(8.0),
        "diffusion_model.b.lokr_w1": torch.randn(64, 64, generator=g).to(torch.float16),
    }


def hashes_from_file(path: Path) -> tuple[str, str]:
    """The definition, applied to a file's bytes: SHA-256 of what follows the 8-byte length and the header, and the
    first 8 hex digits of the SHA-256 of bytes [0x100000, 0x110000)."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_len:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def full_metadata() -> dict[str, str]:
    record = sdxl_lora()
    return {**hm.kohya_metadata(record, output_name="hash_me", captions=["a, b"]),
            **hm.modelspec_metadata(record, title="t", implementation="x", thumbnail_png=PNG),
            "lora_trainer.version": "1"}


def test_sshs_hashes_follow_the_definition_over_the_ss_only_serialisation(tmp_path):
    tensors, metadata = big_tensors(), full_metadata()
    path = tmp_path / "ss_only.safetensors"
    safetensors.torch.save_file(tensors, path, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert path.stat().st_size > 0x110000  # the legacy window lies in tensor data
    model_hash, legacy_hash = hm.sshs_hashes(tensors, metadata)
    assert (model_hash, legacy_hash) == hashes_from_file(path)
    assert re.fullmatch(r"[0-9a-f]{64}", model_hash) and re.fullmatch(r"[0-9a-f]{8}", legacy_hash)
    assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]


def test_the_model_hash_is_the_saved_files_data_hash_whatever_its_header_holds(tmp_path):
    tensors, metadata = big_tensors(), full_metadata()
    model_hash, legacy_hash = hm.sshs_hashes(tensors, metadata)
    path = tmp_path / "saved.safetensors"
    safetensors.torch.save_file(tensors, path, {**metadata, "sshs_model_hash": model_hash,
                                                "sshs_legacy_hash": legacy_hash})
    assert hashes_from_file(path)[0] == model_hash  # what A1111 recomputes from the file


def test_only_ss_keys_and_the_tensors_change_the_hashes():
    tensors, metadata = big_tensors(), full_metadata()
    base = hm.sshs_hashes(tensors, metadata)
    others = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    assert hm.sshs_hashes(tensors, others) == base
    assert hm.sshs_hashes(tensors, {**metadata, "modelspec.title": "another title"}) == base
    # a longer ss_ value moves the data within the serialisation: the legacy window sees other bytes
    longer = hm.sshs_hashes(tensors, {**metadata, "ss_output_name": "a much longer output name"})
    assert longer[0] == base[0] and longer[1] != base[1]
    changed = dict(tensors)
    changed["diffusion_model.a.lora_down.weight"] = changed["diffusion_model.a.lora_down.weight"].clone()
    changed["diffusion_model.a.lora_down.weight"][0, 0] += 1
    assert hm.sshs_hashes(changed, metadata)[0] != base[0]


def test_sshs_hashes_of_a_file_built_by_hand():
    # one float32 tensor: the data after the header is its 16 little-endian bytes; the serialisation is far shorter
    # than 1 MiB, so the legacy hash is that of no bytes
    tensor = torch.tensor([0.0, 1.0, 2.0, 3.0])
    model_hash, legacy_hash = hm.sshs_hashes({"a": tensor}, {"ss_x": "1", "modelspec.title": "t"})
    assert model_hash == hashlib.sha256(struct.pack("<4f", 0.0, 1.0, 2.0, 3.0)).hexdigest()
    assert legacy_hash == "e3b0c442"


# --- tag frequency ---------------------------------------------------------------------------------------------------

def test_tag_frequency_counts_stripped_lower_cased_non_empty_tags():
    captions = ["a cat, Long Hair,  smile ", "A Cat,,smile, , smile", "", "   ", "long hair"]
    assert hm.tag_frequency(captions) == {"a cat": 2, "long hair": 2, "smile": 3}
    assert hm.tag_frequency([]) == {}
