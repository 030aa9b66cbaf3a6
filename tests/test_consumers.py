"""Files other tools load as trained, proven by those tools: a LoRA trained through the real server on a tiny model,
saved by Save LoRA in each format, is loaded by **diffusers' own loader** (``pipeline.load_lora_weights``, pinned
diffusers + peft) into the model's diffusers twin (tools/diffusers_twins.py: diffusers' single-file converter applied
to the same weights). Every layer is loaded (no dropped, unexpected or unmatched key: diffusers and peft only log
those) and the LoRA changes the output as ComfyUI's own loader applies it, within 1e-3 relative.

Also: the module layouts of diffusers' classes the pack ships (lora/diffusers_layouts.json) are what the installed
diffusers builds; a format no tool reads for a family is refused, naming the family and the formats it has."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

import diffusers_twins as dt
import harness
import workflows as wfs
from lora import consumers
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("a model of up to 0.5 B parameters trained, saved three ways and loaded by ComfyUI and "
                              "diffusers per family; the fast tier keeps SD3's")

TOLERANCE = 1e-3
# diffusers' Flux reader converts kohya files to its own names but writes the layers outside the double/single
# blocks (x_embedder, context_embedder, time_text_embed, norm_out, proj_out) without the "transformer." prefix, and
# its loader then drops them without a word (diffusers 0.42.1). The blocks are what sd-scripts trains by default.
DIFFUSERS_READS_OF_KOHYA = {"Flux": lambda layer: layer.startswith(("double_blocks.", "single_blocks."))}


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    return harness.REPO / ".cache" / "consumer_models" / harness.comfyui_version()


def trained_files(server, twin: dt.Twin, cache_dir: Path) -> tuple[Path, dict[str, Path]]:
    """The twin's model file, and the LoRA trained on it through the server saved in every format its family has."""
    path = dt.write(twin, cache_dir)
    link = server.base_dir / "models" / "diffusion_models" / path.name
    if not link.exists():
        link.symlink_to(path)
    formats = consumers.formats_for(twin.family.detected_as)
    wf = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": path.name, "weight_dtype": "default"}},
          "data": {"class_type": "LoraTrainerTest_FamilyData", "inputs": {"family": twin.name, "count": 2, "seed": 0}}}
    wf = wfs.train(wf, {}, save_prefix=None, steps=2, training_dtype="fp32", lora_dtype="fp32", learning_rate=0.01,
                   rank=4, gradient_checkpointing=False)
    for fmt in formats:
        wf[f"save_{fmt}"] = {"class_type": "LoraTrainer_SaveLoRA", "inputs": {
            "lora": ["train", 1], "prefix": f"consumers/{twin.name}_{fmt}", "format": fmt}}
    server.free()
    entry = server.run(server.with_defaults(wf))
    loras = server.base_dir / "models" / "loras"
    return path, {fmt: loras / entry["outputs"][f"save_{fmt}"]["text"][0] for fmt in formats}


def comfy_change(twin: dt.Twin, model_file: Path, lora: dict[str, torch.Tensor], inputs: dt.Inputs, twin_model):
    """The LoRA's change of the output as ComfyUI's own loader applies it (LoraLoaderModelOnly's path)."""
    import comfy.sd

    patcher = dt.comfy_model(model_file)
    base = dt.comfy_output(twin, patcher, inputs, twin_model)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    patched.patch_model()
    change = dt.comfy_output(twin, patched, inputs, twin_model) - base
    patched.unpatch_model()
    return change


def diffusers_change(twin: dt.Twin, state: dict[str, torch.Tensor], lora_file: Path, inputs: dt.Inputs):
    """The change diffusers' own loader gives, the modules peft adapted, and what diffusers/peft complained of."""
    model = dt.diffusers_model(twin, state)
    base = dt.diffusers_output(twin, model, inputs)
    with dt.Complaints() as complaints:
        dt.pipeline(twin, model).load_lora_weights(str(lora_file))
    change = dt.diffusers_output(twin, model, inputs) - base
    # the pipelines look for text-encoder LoRAs too; ours adapt the diffusion model only (there is no text encoder)
    relevant = [m for m in complaints.messages if "No LoRA keys associated to NoneType" not in m]
    return change, dt.lora_layers(model), relevant


def diffusers_modules(path: Path) -> set[str]:
    from safetensors import safe_open

    from lora.key_formats import split_key

    with safe_open(str(path), framework="pt") as f:
        return {consumers.diffusers_module(split_key(k)[0]) for k in f.keys()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", fast_cases([t.name for t in dt.TWINS], "sd3"))
def test_diffusers_loads_the_kohya_and_diffusers_files_as_trained(server, cache_dir, name):
    harness.load_pack()  # ComfyUI importable in this process
    import comfy.utils
    from safetensors.torch import load_file

    twin = dt.BY_NAME[name]
    family = twin.family.detected_as
    model_file, files = trained_files(server, twin, cache_dir)
    assert set(files) >= {"comfyui", "diffusers"}, files
    state = {k: v.float() for k, v in comfy.utils.load_torch_file(str(model_file)).items()}
    inputs = twin.inputs(torch.Generator().manual_seed(1))
    twin_model = dt.diffusers_model(twin, state)
    with torch.no_grad():  # the twin is the same model: the same output before any LoRA
        assert relative(dt.diffusers_output(twin, twin_model, inputs),
                        dt.comfy_output(twin, dt.comfy_model(model_file), inputs, twin_model)) < 1e-5
    ours = load_file(str(files["comfyui"]))
    reference = comfy_change(twin, model_file, ours, inputs, twin_model)
    assert float(reference.norm()) > 1e-3 * float(dt.diffusers_output(twin, twin_model, inputs).norm()), \
        "the trained LoRA must change the output"
    expected = diffusers_modules(files["diffusers"])

    change, adapted, complaints = diffusers_change(twin, state, files["diffusers"], inputs)
    assert not complaints, complaints
    assert set(adapted) == expected, sorted(set(adapted) ^ expected)[:5]
    assert relative(change, reference) < TOLERANCE

    if "kohya" not in files or family == "SD3":  # diffusers' SD3 loader has no kohya reader (sd-scripts reads it)
        return
    reads = DIFFUSERS_READS_OF_KOHYA.get(family)
    kohya_reference = reference
    if reads is not None:  # the reference: ComfyUI applying only the layers diffusers reads of such a file
        kept = {k: v for k, v in ours.items() if reads(k.split(".", 1)[1])}
        assert 0 < len(kept) < len(ours)
        kohya_reference = comfy_change(twin, model_file, kept, inputs, twin_model)
    del twin_model
    gc.collect()
    change, adapted, complaints = diffusers_change(twin, state, files["kohya"], inputs)
    assert not complaints, complaints
    if reads is None:
        assert set(adapted) == expected, sorted(set(adapted) ^ expected)[:5]
    assert adapted and relative(change, kohya_reference) < TOLERANCE


@pytest.mark.fast
def test_the_shipped_diffusers_layouts_are_what_diffusers_builds():
    import diffusers_layouts

    shipped = json.loads(consumers.LAYOUTS_FILE.read_text())
    assert shipped == diffusers_layouts.layouts(), "regenerate: .venv/bin/python tools/diffusers_layouts.py"
    for model_class in {d.model_class for d in consumers.DIFFUSERS.values()}:
        assert shipped[model_class], model_class


@pytest.mark.fast
def test_a_format_no_tool_reads_is_refused_naming_the_family_and_its_formats(server):
    wf = wfs.train({"model": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors",
                                                                    "weight_dtype": "default"}}},
                   wfs.test_data("wan", count=1), save_prefix=None, steps=1, training_dtype="fp32")
    wf["save"] = {"class_type": "LoraTrainer_SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "consumers/wan",
                                                                   "format": "diffusers"}}
    with pytest.raises(harness.PromptError, match="no tool reads diffusers LoRA files of WAN21_T2V models .*this "
                                                  "family saves as: comfyui, kohya"):
        server.run(wf)
