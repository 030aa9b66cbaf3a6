"""LoRA files in other trainers' formats (tools/foreign_loras.py: hand-built from each format's public description)
for the tiny family models.

- Unit (no server): every fixture's deltas land on weights the family model has, at their shapes; and ComfyUI's own
  LoRA loader, run in this process, reads every key of the file and computes the same deltas as the format's math
  (an independent check of both the hand-written names and ComfyUI's reading of them).
- Server: ComfyUI's "LoraLoaderModelOnly" loads each file through a real prompt, with no key left unread, and the
  LoRA changes the model's output.
- Last section: continuing training from each file with the pack's Train LoRA gives the file's LoRA back (one step at
  the smallest learning rate), compared with ComfyUI's own loading of the same file.
"""
from __future__ import annotations

import functools
import logging
import math

import pytest
import torch

import family_models as fm
import foreign_loras as fl
import harness
import workflows as wfs
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("13 foreign formats x loading, continuing and converting on family models up to 0.5 B parameters; the fast tier keeps the unit checks and one of each server check")

NAMES = list(fl.FIXTURES)
# What ComfyUI logs when it cannot use part of a LoRA file: a key no layer takes, a patch for a missing weight, a
# delta it cannot compute or whose shape does not fit.
LOG_FAILURES = ("lora key not loaded", "NOT LOADED", "Calculate Weight Failed", "WEIGHT NOT MERGED", "ERROR lora",
                "ERROR loha", "ERROR lokr")
# Continuing from a file must give its LoRA back: within 1e-3 of ComfyUI's loading of it (relative output difference),
# and within a small share of how far the file moves the base model (on the tiny UNets a mild LoRA moves the output by
# only ~1e-4, below the absolute bound: dropping it entirely would pass that alone).
CONTINUE_TOLERANCE = 1e-3
CONTINUE_SHARE = 0.05


@functools.cache
def built(family: str) -> fm.Built:
    harness.put_comfyui_on_path()
    return fm.build(fm.BY_NAME[family])


def fixture(name: str) -> tuple[fm.Built, dict[str, torch.Tensor], dict[str, str]]:
    family, builder = fl.FIXTURES[name]
    b = built(family)
    tensors, metadata = builder(b.shapes, 0)
    return b, tensors, metadata


# -- unit: the fixtures themselves ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", fast_cases(NAMES, "kohya_sd15", "musubi_wan"))
def test_fixture_deltas_fit_the_family_model(name):
    b, tensors, metadata = fixture(name)
    deltas = fl.expected_deltas(name, tensors, b.shapes)
    assert deltas, name
    for key, delta in deltas.items():
        assert key in b.shapes, f"{name}: {key} is not a weight of the {fl.FIXTURES[name][0]} model"
        assert tuple(delta.shape) == b.shapes[key], key
        relative = float(delta.norm()) / math.sqrt(b.shapes[key][0])  # vs the norm of a fan-in-scaled weight
        assert 0 < relative <= fl.STRENGTH * 1.01, f"{key}: relative change {relative}"
    for key, t in tensors.items():
        assert torch.isfinite(t).all() and (key.endswith(".alpha") or t.abs().min() < t.abs().max()), key
        assert not key.endswith(".alpha") or t.dim() == 0, key
        if not key.endswith(".alpha"):
            assert t.count_nonzero() > 0, f"{key}: every factor is non-zero"
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    if fl.FORMATS[name].alpha is not None:
        assert fl.ALPHA in alphas and fl.ALPHA != fl.RANK  # a loader ignoring alpha would get the wrong strength
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


@pytest.mark.fast
def test_fixtures_are_reproducible():
    b, tensors, _ = fixture("kohya_sd15")
    again, _ = fl.FIXTURES["kohya_sd15"][1](b.shapes, 0)
    other, _ = fl.FIXTURES["kohya_sd15"][1](b.shapes, 1)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert any(not torch.equal(tensors[k], other[k]) for k in tensors if not k.endswith(".alpha"))


@pytest.mark.fast
def test_write_fixture_saves_tensors_and_metadata(tmp_path):
    import safetensors

    b, tensors, metadata = fixture("aitoolkit_flux")
    path = fl.write_fixture("aitoolkit_flux", b.shapes, tmp_path / "sub" / "f.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == metadata
        assert set(f.keys()) == set(tensors)
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in tensors)
    assert '"step": 120' in metadata["training_info"]


def comfyui_deltas(b: fm.Built, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI's own LoRA loading makes of ``tensors`` for a model of these shapes: {native key: ΔW at strength
    1} (its key map and weight adapters, applied to zero weights, as LoraLoader's patches would be)."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_detection

    sd = {k: torch.empty(s, device="meta") for k, s in b.shapes.items()}
    config = comfy.model_detection.model_config_from_unet(sd, "")
    try:
        model = config.get_model(sd, "", device=torch.device("meta"))
    except Exception:  # builders that compute values need real memory
        model = config.get_model(sd, "")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(tensors)), key_map)
    by_key: dict[str, list] = {}
    for k, v in patches.items():
        key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        by_key.setdefault(key, []).append((1.0, v, 1.0, offset, function))
    out = {}
    for key, patch_list in by_key.items():
        native = key.removeprefix("diffusion_model.")
        out[native] = comfy.lora.calculate_weight(patch_list, torch.zeros(b.shapes[native]), key)
    return out


@pytest.mark.parametrize("name", fast_cases(NAMES, "kohya_sd15", "diffusers_sd3"))
def test_comfyui_reads_every_key_and_computes_the_expected_deltas(name, caplog):
    b, tensors, _ = fixture(name)
    with caplog.at_level(logging.WARNING):
        got = comfyui_deltas(b, tensors)
    unread = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not unread, unread
    expected = fl.expected_deltas(name, tensors, b.shapes)
    assert set(got) == set(expected)
    for key, delta in expected.items():
        err = float((got[key] - delta).norm() / delta.norm())
        assert err < 1e-5, f"{name}: ComfyUI's delta for {key} differs by {err:.2e} (relative)"


# -- server: ComfyUI loads each file in a real prompt ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir():
    return harness.REPO / ".cache" / "family_models" / harness.comfyui_version()


def install(server, name: str, cache_dir) -> tuple[str, str]:
    """The fixture's family model where UNETLoader lists it and the fixture file at models/loras/foreign/<name>:
    (model file name, lora name)."""
    family = fl.FIXTURES[name][0]
    b = built(family)
    model = fl.install_model(server.base_dir, family, b, cache_dir)
    lora = f"foreign/{name}.safetensors"
    fl.write_fixture(name, b.shapes, server.base_dir / "models" / "loras" / lora)
    return model.name, lora


def workflow(name: str, model_name: str, lora: str) -> dict:
    """Base model, one latent and caption of its family, and the fixture through ComfyUI's LoraLoaderModelOnly."""
    return {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": model_name, "weight_dtype": "default"}},
            "data": {"class_type": "LoraTrainerTest_FamilyData",
                     "inputs": {"family": fl.FIXTURES[name][0], "count": 1, "seed": 0}},
            "foreign": {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": ["model", 0], "lora_name": lora, "strength_model": 1.0}}}


def compare(a: list, b: list) -> dict:
    return {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": a, "model_b": b, "latents": ["data", 0], "positive": ["data", 1], "nonce": 0, "points": 1}}


def run(server, wf: dict) -> tuple[dict, str]:
    server.free()  # the previous family's model leaves memory; the same prompt really runs again
    start = len(server.log_text())
    entry = server.run(server.with_defaults(wf))
    return entry, server.log_text()[start:]


def assert_fully_read(log: str) -> None:
    for failure in LOG_FAILURES:
        assert failure not in log, "\n".join(line for line in log.splitlines() if failure in line)[:4000]


@pytest.mark.parametrize("name", fast_cases(NAMES, "diffusers_sd3"))
def test_comfyui_loads_the_fixture_fully_and_it_changes_the_output(server, cache_dir, name):
    model_name, lora = install(server, name, cache_dir)
    wf = workflow(name, model_name, lora)
    wf["cmp"] = compare(["model", 0], ["foreign", 0])
    entry, log = run(server, wf)
    assert_fully_read(log)
    rel = entry["outputs"]["cmp"]["rel_diff"][0]
    print(f"{name}: the LoRA changes the output by {rel:.4g} (relative)")
    assert math.isfinite(rel) and rel > 0, f"{name}: the LoRA changed the output by {rel}"


# -- continuing training from a foreign file (being built: may fail today) --------------------------------------------
@pytest.mark.parametrize("name", fast_cases(NAMES, "kohya_sd15"))
def test_continue_training_from_fixture(server, cache_dir, name):
    """Train LoRA with existing_lora = the fixture, 1 step at the smallest learning rate: its model_with_lora is the
    model with the fixture's LoRA, as ComfyUI's LoraLoaderModelOnly applies it (within CONTINUE_TOLERANCE, and
    within CONTINUE_SHARE of the fixture's own effect on the output)."""
    model_name, lora = install(server, name, cache_dir)
    base = workflow(name, model_name, lora)
    # fp32 compute: bf16 has no fast CPU kernels (see test_family_matrix.BIG_PARAMETERS) and the check is exact
    wf = wfs.train({"model": base["model"]}, {"data": base["data"]}, save_prefix=None, steps=1,
                   learning_rate=1e-7, existing_lora=lora, training_dtype="fp32")
    wf["foreign"] = base["foreign"]
    wf["cmp"] = compare(["foreign", 0], ["train", 0])
    wf["cmp_base"] = compare(["model", 0], ["foreign", 0])  # how far the fixture moves the model: the scale of a miss
    entry, log = run(server, wf)
    assert_fully_read(log)
    rel = entry["outputs"]["cmp"]["rel_diff"][0]
    moved = entry["outputs"]["cmp_base"]["rel_diff"][0]
    print(f"{name}: continued vs loaded {rel:.3g}; the fixture moves the base model by {moved:.3g}")
    assert math.isfinite(rel) and rel < CONTINUE_TOLERANCE and rel < CONTINUE_SHARE * moved, (
        f"{name}: Train LoRA continued from {lora} differs from ComfyUI's loading of it by {rel:.4g} (relative; the "
        f"fixture itself moves the base model's output by {moved:.4g})")


@pytest.mark.fast
@pytest.mark.parametrize("name", NAMES)
def test_the_step_count_a_trainer_records_is_read(name):
    """Continuing counts the steps the file already has: kohya's ss_steps, ai-toolkit's training_info."""
    from lora.file_format import stored_steps

    _, _, metadata = fixture(name)
    if "ss_steps" in metadata or "training_info" in metadata:
        assert stored_steps(metadata) == fl.STEPS, metadata


# -- Convert LoRA: a foreign file into another naming ------------------------------------------------------------------
CONVERSIONS = [("diffusers_flux", "kohya", 1.0), ("kohya_flux", "diffusers", 0.5), ("lycoris_lokr_flux", "kohya", 0.5),
               ("aitoolkit_wan", "kohya", 1.0), ("musubi_wan", "comfyui", -1.0), ("diffusers_sd3", "kohya", 1.0),
               ("peft_qwen_image", "kohya", 1.0), ("lycoris_loha_sdxl", "comfyui", 2.0),
               ("kohya_sd15", "diffusers", 1.0)]


@pytest.mark.parametrize("name, fmt, strength", fast_cases(CONVERSIONS, ("musubi_wan", "comfyui", -1.0)))
def test_convert_lora_writes_a_file_that_acts_as_the_original(server, cache_dir, name, fmt, strength):
    """Convert LoRA (strength baked in) → the new file through ComfyUI's LoraLoaderModelOnly at 1 acts as the original
    file loaded at that strength; the original is unchanged and the new file loads fully."""
    model_name, lora = install(server, name, cache_dir)
    original = server.base_dir / "models" / "loras" / lora
    before = original.read_bytes()
    wf = workflow(name, model_name, lora)
    wf["foreign"]["inputs"]["strength_model"] = strength
    wf["convert"] = {"class_type": "LoraTrainer_ConvertLoRA", "inputs": {
        "model": ["model", 0], "lora_name": lora, "format": fmt, "strength": strength, "prefix": f"converted/{name}"}}
    wf["converted"] = {"class_type": "LoraTrainerTest_LoadLoraByName", "inputs": {
        "model": ["model", 0], "lora_name": ["convert", 0], "strength": 1.0}}
    wf["cmp"] = compare(["foreign", 0], ["converted", 0])
    wf["cmp_base"] = compare(["model", 0], ["foreign", 0])
    entry, log = run(server, wf)
    assert_fully_read(log)
    assert original.read_bytes() == before
    rel, moved = entry["outputs"]["cmp"]["rel_diff"][0], entry["outputs"]["cmp_base"]["rel_diff"][0]
    print(f"{name} → {fmt} at {strength}: converted vs original {rel:.3g}; the original moves the model by {moved:.3g}")
    assert rel < CONTINUE_TOLERANCE and rel < CONTINUE_SHARE * moved, (name, fmt, rel, moved)


@pytest.mark.fast
def test_convert_lora_refuses_what_a_format_cannot_hold(server, cache_dir):
    model_name, lora = install(server, "lycoris_lokr_flux", cache_dir)
    wf = workflow("lycoris_lokr_flux", model_name, lora)
    del wf["foreign"]
    wf["convert"] = {"class_type": "LoraTrainer_ConvertLoRA", "inputs": {
        "model": ["model", 0], "lora_name": lora, "format": "diffusers", "strength": 1.0, "prefix": "converted/x"}}
    with pytest.raises(harness.PromptError, match="format: this LoRA cannot be saved as diffusers: the diffusers "
                                                  "format holds plain LoRA factors only"):
        run(server, wf)
    assert not (server.base_dir / "models" / "loras" / "converted" / "x_00001.safetensors").exists()


@pytest.mark.parametrize("name", fast_cases(["diffusers_flux", "musubi_wan", "lycoris_lokr_flux"], "musubi_wan"))
def test_apply_lora_takes_a_foreign_file_as_comfyui_loads_it(server, cache_dir, name):
    model_name, lora = install(server, name, cache_dir)
    wf = workflow(name, model_name, lora)
    wf["foreign"]["inputs"]["strength_model"] = 0.7
    wf["ours"] = {"class_type": "LoraTrainer_ApplyLoRA", "inputs": {"model": ["model", 0], "strength": 0.7,
                                                                      "lora_name": lora}}
    wf["cmp"] = compare(["foreign", 0], ["ours", 0])
    wf["cmp_base"] = compare(["model", 0], ["ours", 0])
    entry, log = run(server, wf)
    assert_fully_read(log)
    assert entry["outputs"]["cmp"]["rel_diff"][0] < 1e-6 < entry["outputs"]["cmp_base"]["rel_diff"][0]


@pytest.mark.fast
def test_apply_lora_refuses_a_file_of_another_model(server, cache_dir):
    """A Wan LoRA on Flux: ComfyUI's loader would skip every key and return the model unchanged; ours says so."""
    _, lora = install(server, "musubi_wan", cache_dir)
    model_name, _ = install(server, "kohya_flux", cache_dir)
    wf = workflow("kohya_flux", model_name, lora)
    del wf["foreign"]
    wf["ours"] = {"class_type": "LoraTrainer_ApplyLoRA", "inputs": {"model": ["model", 0], "strength": 1.0,
                                                                      "lora_name": lora}}
    wf["cmp"] = compare(["model", 0], ["ours", 0])
    with pytest.raises(harness.PromptError, match="lora_name: ComfyUI cannot apply all of it to this model"):
        run(server, wf)
