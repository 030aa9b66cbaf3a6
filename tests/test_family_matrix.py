"""Every model family ComfyUI's "Load Diffusion Model" detects trains at the node's defaults through the real server
(in fp32 and without DoRA above BIG_PARAMETERS: see there).

Per family (tools/family_models.py): a generated model at the smallest size the running ComfyUI detects, loaded by
UNETLoader from models/diffusion_models, trained 2 steps with gradient checkpointing on and off in one prompt (the
model loads once); each LoRA goes through ComfyUI's own LoraModelLoader, which must load every key, and must change
the model's output. A family the running ComfyUI cannot test (no such model class, too big for CI) is skipped with
the reason. Generated files are cached in .cache/family_models/<ComfyUI version>/ (git-ignored).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

import family_models as fm
import harness
import untrainable_families
import workflows as wfs
from lora import consumers
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("88 families, up to 0.9 B parameters each (many minutes in all); the fast tier keeps one "
                              "of each kind")

# Beyond this, one family needs minutes and several GB (fp32 on the CPU, plus ComfyUI's patch backups) on CI's
# 2-core, 24 GB machine. FAMILY_MATRIX_MAX_PARAMETERS lowers it on slower machines (or raises it on bigger ones).
MAX_PARAMETERS = int(os.environ.get("FAMILY_MATRIX_MAX_PARAMETERS", untrainable_families.TINY_LIMIT))
LOG_FAILURES = ("lora key not loaded", "unet missing", "unet unexpected")
# Above this size (the fixed-width families: Flux, Qwen-Image, Lumina2, AuraFlow, … at ~0.5 B parameters) each family
# took 3-4 minutes on a 2-core CPU, and the matrix most of CI's time, for two reasons:
# - bf16 autocast has no fast kernels on a CPU without AVX-512 BF16 or AMX (CI's): a 3072-wide layer trains ~20x
#   slower than in fp32. These families train in fp32.
# - DoRA: every time ComfyUI applies a DoRA LoRA (each comparison of outputs) it recomputes the norm of every merged
#   weight (weight_decompose), two thirds of such a family's time. The options run leaves DoRA out here; DoRA is
#   per-layer math and trains on every family up to this size, with the same Linear and Conv layers.
# The smaller families (most of the matrix) keep the node's bf16 default and every option.
BIG_PARAMETERS = 100_000_000


def training_dtype(built: fm.Built) -> str:
    return "bf16" if built.parameters <= BIG_PARAMETERS else "fp32"


def matrix_options(built: fm.Built) -> dict:
    return wfs.MATRIX_OPTIONS if built.parameters <= BIG_PARAMETERS else {**wfs.MATRIX_OPTIONS, "dora": False}


def matrix(path: Path, name: str, built: fm.Built) -> dict:
    """The matrix workflow of ``name`` at the settings its size gets (see BIG_PARAMETERS), its LoRAs saved as kohya
    where a kohya trainer reads the family's files (lora/consumers.py), else in ComfyUI's names."""
    kohya = "kohya" in consumers.formats_for(fm.BY_NAME[name].detected_as)
    return wfs.family_matrix(path.name, name, training_dtype=training_dtype(built), options=matrix_options(built),
                             save_format="kohya" if kohya else "comfyui")


@pytest.fixture(scope="module")
def cache_dir():
    return harness.REPO / ".cache" / "family_models" / harness.comfyui_version()


def untestable_reason(family: fm.Family) -> str:
    """Why the running ComfyUI cannot test this family (it lacks the model class), or "" (needs ComfyUI importable:
    the server fixture). Classes no family trains are in tools/untrainable_families.py, with the reason."""
    import comfy.supported_models

    if not hasattr(comfy.supported_models, family.detected_as):
        return f"ComfyUI {harness.comfyui_version()} has no {family.detected_as} model"
    return ""


def installed(server, family: fm.Family, built, cache_dir) -> Path:
    """The family's generated model file (cached), where the server's "Load Diffusion Model" lists it."""
    path = fm.write(family, built, cache_dir)
    link = server.base_dir / "models" / "diffusion_models" / path.name
    if not link.exists():
        link.symlink_to(path)
    return path


# One family of each kind in the fast tier: a UNet, an MMDiT, a Flux-like DiT (in-place blocks), a video model.
FAST_FAMILIES = ("sd15", "sd3", "flux_dev", "wan21_t2v")


@pytest.mark.parametrize("name", fast_cases([f.name for f in fm.FAMILIES], *FAST_FAMILIES))
def test_family_trains_and_its_lora_loads_and_acts(server, cache_dir, name):
    family = fm.BY_NAME[name]
    reason = untestable_reason(family)
    if reason:
        pytest.skip(reason)
    built = fm.build(family)
    if built.parameters > MAX_PARAMETERS:
        pytest.skip(f"the smallest {family.detected_as} ComfyUI {harness.comfyui_version()} detects has "
                    f"{built.parameters / 1e9:.2f} B parameters (width {built.width}), over the "
                    f"{MAX_PARAMETERS / 1e9:.2f} B this matrix trains on a CPU (FAMILY_MATRIX_MAX_PARAMETERS)")
    start = time.monotonic()
    path = installed(server, family, built, cache_dir)
    generated = time.monotonic()

    server.free()  # the previous family's model leaves memory before this one loads
    log_start = len(server.log_text())
    entry = server.run(server.with_defaults(matrix(path, name, built)))
    log = server.log_text()[log_start:]
    print(f"{name}: {built.parameters / 1e6:.1f} M parameters (width {built.width}, {training_dtype(built)}); "
          f"file {generated - start:.1f} s, prompt {time.monotonic() - generated:.1f} s")

    check_matrix_run(server, entry, log, name, family.outside)
    check_diffusers_round_trip(server, matrix(path, name, built), name, big=built.parameters > BIG_PARAMETERS)


def read_by_the_builder(log: str, outside: Iterable[str]) -> str:
    """The log without the diffusion model's "unexpected" line when it names exactly the family's ``outside``
    weights: the model's builder read those from the file before the diffusion model's load (which does not know
    them) named them, as for every real such file (Zero123's cc_projection)."""
    expected = f"unet unexpected: {sorted(outside)}"
    # (0.33 puts a coloured level before the message)
    return "\n".join(line for line in log.splitlines() if not (outside and line.endswith(expected)))


def check_matrix_run(server, entry: dict, log: str, save_name: str, outside: Iterable[str] = ()) -> None:
    """What a matrix prompt (``matrix``) must have done: every LoRA key loaded, both LoRAs change the model's output,
    the options run saved after step 1 (as ``save_name``), the saved files act as model_with_lora. ``outside``: the
    weights of the file beside the diffusion model's (Family.outside)."""
    log = read_by_the_builder(log, outside)
    for failure in LOG_FAILURES:
        assert failure not in log, next(line for line in log.splitlines() if failure in line)
    for tag in ("ckpt", "plain"):
        rel = entry["outputs"][f"cmp_{tag}"]["rel_diff"][0]
        assert math.isfinite(rel) and rel > 0, f"checkpointing {tag}: LoRA changed the output by {rel}"
    # the Training Options run (DoRA, rsLoRA, EMA, schedule, clipping, logit-normal, noise offset) saved after step 1
    assert entry["outputs"]["train_plain"]["lora_trainer_saves"] == [1]
    for folder in ("models/loras", "output/training_states"):
        assert (server.base_dir / folder / "matrix" / f"{save_name}_1_steps_00001.safetensors").is_file(), folder
    # the saved files (plain LoRA; DoRA + rsLoRA) reloaded by ComfyUI's own loader act exactly as model_with_lora
    for tag in ("ckpt", "plain"):
        rel = entry["outputs"][f"cmp_saved_{tag}"]["rel_diff"][0]
        assert rel < 1e-3, f"saved file of the {tag} run: output differs from model_with_lora by {rel}"


def with_av_latents(wf: dict, name: str) -> dict:
    """A matrix workflow on the family's audio+video latents: its video latents and seeded audio latents joined by
    ComfyUI's own LTXVConcatAVLatent (a NestedTensor of both streams), which every training and comparison reads
    instead; the options run saves as ``<name>_av``."""
    wf = {node: {**spec, "inputs": {k: ["av", 0] if v == ["data", 0] else v for k, v in spec["inputs"].items()}}
          for node, spec in wf.items()}
    wf["audio"] = {"class_type": "LoraTrainerTest_FamilyAudio", "inputs": {"family": name, "count": 2, "seed": 7}}
    wf["av"] = {"class_type": "LTXVConcatAVLatent", "inputs": {"video_latent": ["data", 0],
                                                               "audio_latent": ["audio", 0]}}
    wf["options"]["inputs"]["save_prefix"] = f"matrix/{name}_av"
    return wf


@pytest.mark.parametrize("name", [f.name for f in fm.FAMILIES if f.audio is not None])
def test_family_trains_on_audio_and_video_latents(server, cache_dir, name):
    """The matrix of an audio+video family (LTX-2) on latents of both streams, as ComfyUI's own nodes make them: both
    trainings (with every option: the noise offset per stream's channel) and their LoRAs, loaded by LoraModelLoader
    with every key, change the output of the video and of the audio stream; the saved files act as
    model_with_lora."""
    family = fm.BY_NAME[name]
    reason = untestable_reason(family)
    if reason:
        pytest.skip(reason)
    built = fm.build(family)
    wf = with_av_latents(matrix(installed(server, family, built, cache_dir), name, built), name)
    server.free()
    log_start = len(server.log_text())
    entry = server.run(server.with_defaults(wf))
    check_matrix_run(server, entry, server.log_text()[log_start:], f"{name}_av", family.outside)
    for tag in ("ckpt", "plain"):
        streams = entry["outputs"][f"cmp_{tag}"]["rel_diff_streams"]
        assert len(streams) == 2 and min(streams) > 0, f"checkpointing {tag}: the LoRA changes each stream: {streams}"


def check_diffusers_round_trip(server, wf: dict, name: str, big: bool) -> None:
    """The same prompt again (the trainings come from ComfyUI's cache) with the default LoRA in diffusers names and
    the options LoRA in ComfyUI's names, both reloaded: each acts as its model_with_lora, or, for a family diffusers
    does not read (lora/consumers.py), the diffusers save fails clearly. A ``big`` family (BIG_PARAMETERS) skips the
    ComfyUI-names reload: those names are the model's own state-dict keys whatever the family (checked on every
    smaller family, and for every algorithm in test_save_formats), and each reload re-patches all of a 0.5 B model's
    weights."""
    family = fm.BY_NAME[name].detected_as
    wf = dict(wf)
    formats = ("diffusers",) if big else ("diffusers", "comfyui")
    if not big:
        wf.update(wfs.saved_and_reloaded("train_plain", "comfyui", f"matrix/{name}_comfyui", "comfyui"))
    wf.update(wfs.saved_and_reloaded("train_ckpt", "diffusers", f"matrix/{name}_diffusers", "diffusers"))
    try:
        entry = server.run(server.with_defaults(wf))
    except harness.PromptError as e:
        assert "diffusers" not in consumers.formats_for(family), f"{name} must save as diffusers: {e}"
        assert f"no tool reads diffusers LoRA files of {family} models" in str(e), str(e)
        return
    assert "diffusers" in consumers.formats_for(family), f"{name}: diffusers must be refused"
    for fmt in formats:
        rel = entry["outputs"][f"cmp_{fmt}"]["rel_diff"][0]
        assert rel < 1e-3, f"{fmt} file: output differs from model_with_lora by {rel}"


@pytest.mark.parametrize("name", ["wan21_t2v", "hunyuan_video", "ltxv", "ltxav"])
def test_video_trains_on_clips_of_different_lengths(server, cache_dir, name):
    """A list of clips of 2 and 3 latent frames, each with its own caption, trains at the defaults (they go to
    different same-shape groups); the LoRA changes the model's output on both clips."""
    family = fm.BY_NAME[name]
    reason = untestable_reason(family)
    if reason:
        pytest.skip(reason)
    path = installed(server, family, fm.build(family), cache_dir)
    wf = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": path.name, "weight_dtype": "default"}},
          "data": {"class_type": "LoraTrainerTest_VideoClips", "inputs": {"family": name, "frames": "2,3", "seed": 0}}}
    wf = wfs.train(wf, {}, save_prefix=None, steps=4)
    wf["lora"] = {"class_type": "LoraModelLoader", "inputs": {
        "model": ["model", 0], "lora": ["train", 1], "strength_model": 1.0}}
    wf["cmp"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["model", 0], "model_b": ["lora", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": 0, "points": 1}}
    server.free()
    log_start = len(server.log_text())
    entry = server.run(server.with_defaults(wf))
    assert "lora key not loaded" not in server.log_text()[log_start:]
    losses = entry["outputs"]["train"]["lora_trainer_loss"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    rel = entry["outputs"]["cmp"]["rel_diff"]
    assert len(rel) == 2 and min(rel) > 0, f"the LoRA changes the output on both clips: {rel}"


@pytest.mark.parametrize("name", ["flux_dev", "ltxv"])
def test_trains_on_top_of_a_bypass_lora(server, cache_dir, name):
    """ComfyUI 0.33 can apply a LoRA as forward hooks ("bypass") instead of patching weights: a new LoRA trains on
    top of such a model, through in-place blocks, with checkpointing on and off, and adds to the upstream one."""
    spec = server.object_info("LoraModelLoader")["LoraModelLoader"]["input"]
    if "bypass" not in {**spec.get("required", {}), **spec.get("optional", {})}:
        pytest.skip(f"ComfyUI {harness.comfyui_version()}'s LoraModelLoader has no bypass mode")
    family = fm.BY_NAME[name]
    built = fm.build(family)
    if built.parameters > MAX_PARAMETERS / 4:
        pytest.skip(f"{name} is {built.parameters / 1e6:.0f} M parameters on this ComfyUI: the matrix covers it")
    path = installed(server, family, built, cache_dir)
    wf = matrix(path, name, built)
    wf["upstream"] = {"class_type": "LoraModelLoader", "inputs": {
        "model": ["model", 0], "lora": ["train_plain", 1], "strength_model": 1.0, "bypass": True}}
    for tag in ("ckpt", "plain"):  # the second trainings start from the bypass model
        wf[f"again_{tag}"] = {**wf[f"train_{tag}"], "inputs": {**wf[f"train_{tag}"]["inputs"], "model": ["upstream", 0],
                                                                "seed": 1}}
        wf[f"cmp_{tag}"]["inputs"].update(model_a=["upstream", 0], model_b=[f"again_{tag}", 0])
    server.free()
    entry = server.run(server.with_defaults(wf))
    for tag in ("ckpt", "plain"):
        assert all(math.isfinite(v) for v in entry["outputs"][f"again_{tag}"]["lora_trainer_loss"])
        rel = entry["outputs"][f"cmp_{tag}"]["rel_diff"][0]
        assert math.isfinite(rel) and rel > 0, f"checkpointing {tag}: the new LoRA changed the output by {rel}"


@pytest.mark.parametrize("name", ["hunyuan3d_v2_1"])
def test_a_cfg_pair_model_denoises_each_sample_with_its_own_caption(cache_dir, name):
    """Hunyuan 3D 2.1 takes each batch as a sampler's (cond, uncond) pair (comfy_bridge.CFG_PAIR_MODELS): the trainer's
    forward of two different samples with two captions in one batch gives what each gives alone."""
    harness.put_comfyui_on_path()
    import comfy.model_management
    import comfy.sd
    import torch

    pack = harness.load_pack()
    bridge, inputs = pack.nodes.comfy_bridge, pack.nodes.inputs
    family = fm.BY_NAME[name]
    patcher = comfy.sd.load_diffusion_model(str(fm.write(family, fm.build(family), cache_dir)))
    comfy.model_management.load_models_gpu([patcher])
    device = comfy.model_management.get_torch_device()
    x0 = bridge.ModelSpaceLatents(patcher, inputs.latent_samples({"samples": fm.latents(family, 2, 0)}))
    conds = bridge.SampleConditioning(patcher, fm.conditioning(family, 2, 0), x0.shapes, device, layouts=x0.layouts)
    x_t = x0.load([0, 1]).to(device) + torch.randn((2, *x0.shapes[0]), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.7], device=device)
    with torch.no_grad():
        both = conds.forward(patcher, x_t, sigma, [0, 1])
        alone = torch.cat([conds.forward(patcher, x_t[i:i + 1], sigma[i:i + 1], [i]) for i in (0, 1)])
        swapped = conds.forward(patcher, x_t, sigma, [1, 0])  # the captions matter: another pairing differs
    assert both.shape == x_t.shape
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
    assert (swapped - both).abs().max() > 1e-4
