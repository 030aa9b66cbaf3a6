"""Bases as users load them: fp8-weight diffusion models and models with an upstream LoRA already patched in, at the
node's defaults (bf16 compute, checkpointing on), through the real server."""
import pytest

import workflows as wfs

pytestmark = pytest.mark.fast

UNLOADED = "lora key not loaded"


def compare(model_a: list, model_b: list) -> dict:
    return {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": model_a, "model_b": model_b, "latents": ["data", 0], "positive": ["data", 1]}}


def unet(weight_dtype: str = "default") -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": weight_dtype}}


def run_logged(server, workflow: dict) -> tuple[dict, str]:
    """Runs a workflow (cache cleared so everything really runs) and returns its history entry and its server log."""
    server.free()
    start = len(server.log_text())
    entry = server.run(server.with_defaults(workflow))
    return entry, server.log_text()[start:]


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weight_base_trains_and_its_lora_loads_back(server, weight_dtype):
    wf = wfs.train({"model": unet(weight_dtype)}, wfs.test_data("sd3"), save_prefix=f"fp8/{weight_dtype}", steps=2)
    wf["plain"] = unet()
    wf["apply"] = {"class_type": "LoraModelLoader", "inputs": {
        "model": ["plain", 0], "lora": ["train", 1], "strength_model": 1.0}}
    wf["compare"] = compare(["plain", 0], ["apply", 0])
    wf["compare_fp8"] = compare(["model", 0], ["train", 0])
    entry, log = run_logged(server, wf)
    losses = entry["outputs"]["train"]["lora_trainer_loss"]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)
    assert entry["outputs"]["compare"]["rel_diff"][0] > 1e-4, "the LoRA trained on fp8 weights changes the model"
    assert entry["outputs"]["compare_fp8"]["rel_diff"][0] > 1e-4, "model_with_lora (fp8 base) differs from its base"
    assert UNLOADED not in log


def test_trains_on_top_of_an_upstream_lora(server):
    first, _ = run_logged(server, wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="upstream/base",
                                            steps=3, learning_rate=0.01, seed=7))
    upstream_file = first["outputs"]["save"]["text"][0]
    wf = wfs.train({"model": unet()}, wfs.test_data("sd3"), latents_from=None, save_prefix=None, steps=2, seed=8)
    wf["upstream"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["model", 0], "lora_name": upstream_file, "strength_model": 1.0}}
    wf["train"]["inputs"]["model"] = ["upstream", 0]
    wf["upstream_vs_plain"] = compare(["model", 0], ["upstream", 0])
    wf["trained_vs_upstream"] = compare(["upstream", 0], ["train", 0])
    entry, log = run_logged(server, wf)
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 2
    assert entry["outputs"]["upstream_vs_plain"]["rel_diff"][0] > 1e-4, "the upstream LoRA is active"
    assert entry["outputs"]["trained_vs_upstream"]["rel_diff"][0] > 1e-4, "the new LoRA adds to the upstream one"
    assert UNLOADED not in log
