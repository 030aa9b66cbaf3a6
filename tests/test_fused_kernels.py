"""Fused kernels without a backward (issue 22): while the pack trains, ComfyUI 0.33's fused ``comfy_kitchen``
RMSNorm+RoPE ops, which Anima, JoyImage and Cosmos Predict2 call unguarded, are swapped for the pack's PyTorch
equivalents (``training.rms_rope``); outside training (sampling with the trained LoRA) the fused ops run again.

In-process, ComfyUI as a library: the swap's guard on any version (a stand-in comfy_kitchen module where ComfyUI has
none), and, where the running ComfyUI has these models, the Train LoRA node on a generated JoyImage and Cosmos
Predict2 (tools/family_models.py) with the ops counted. The family matrix trains all three through the server."""
from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch

import family_models as fm
import harness

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def bridge():
    harness.put_comfyui_on_path()
    harness.load_pack()
    from lora_trainer.nodes import comfy_bridge

    return comfy_bridge


def test_the_ops_are_swapped_only_while_training(bridge, monkeypatch):
    """With a stand-in comfy_kitchen (ComfyUI 0.3.75 has none): inside ``training_kernels`` each fused op of ours is
    the PyTorch one, an op we do not replace is left alone, and everything is back after, also after an error."""
    from lora_trainer.training import rms_rope

    fused = {name: (lambda *a, **k: "fused") for name in rms_rope.DROP_INS}
    kitchen = types.SimpleNamespace(**fused, rms_rope_=lambda *a: "in place", int8_attention=lambda *a: "other")
    monkeypatch.setitem(sys.modules, "comfy_kitchen", kitchen)
    untouched = {"rms_rope_": kitchen.rms_rope_, "int8_attention": kitchen.int8_attention}
    import comfy.model_management as mm

    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
            with bridge.training_kernels():
                assert {n: getattr(kitchen, n) for n in fused} == rms_rope.DROP_INS
                assert getattr(mm, "in_training", True), "ComfyUI's own switch is on where it has one"
                assert {n: getattr(kitchen, n) for n in untouched} == untouched
                if fail:
                    raise RuntimeError("a training step failed")
        assert {n: getattr(kitchen, n) for n in fused} == fused
        assert not getattr(mm, "in_training", False)


def test_without_comfy_kitchen_nothing_is_swapped(bridge, monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy_kitchen", raising=False)
    with bridge.training_kernels():
        assert "comfy_kitchen" not in sys.modules, "a ComfyUI that has not imported it gets nothing imported"


@pytest.mark.parametrize("name, op", [("joyimage", "rms_rope"), ("cosmos_predict2", "rms_rope_split_half")])
def test_a_model_calling_a_fused_op_trains_and_its_lora_samples_with_the_fused_op(bridge, tmp_path, monkeypatch,
                                                                                  name, op):
    import comfy.sd
    import comfy.supported_models
    import eval_loss
    from lora_trainer.nodes.train_lora import TrainLoRA
    from lora_trainer.training import rms_rope

    family = fm.BY_NAME[name]
    if not hasattr(comfy.supported_models, family.detected_as):
        pytest.skip(f"ComfyUI {harness.comfyui_version()} has no {family.detected_as} model (the test_the_ops_are_"
                    "swapped_only_while_training case checks the swap itself on every version)")
    kitchen = sys.modules.get("comfy_kitchen")  # 0.33 imports it at start-up (comfy.quant_ops)
    if kitchen is None:
        pytest.skip(f"ComfyUI {harness.comfyui_version()} has no comfy_kitchen: its {family.detected_as} calls no "
                    "fused op (the family matrix trains it)")
    calls = {"fused": 0, "ours": 0}

    def counted(kind, function):
        def call(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return call

    fused = counted("fused", getattr(kitchen, op))
    monkeypatch.setattr(kitchen, op, fused)
    monkeypatch.setitem(rms_rope.DROP_INS, op, counted("ours", rms_rope.DROP_INS[op]))
    path = fm.write(family, fm.build(family), tmp_path)
    settings = {"batch_size": 2, "grad_accumulation_steps": 1, "steps": 2, "learning_rate": 0.001, "rank": 4,
                "optimizer": "AdamW", "loss_function": "MSE", "seed": 3, "training_dtype": "fp32",
                "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]"}
    with torch.inference_mode():  # as ComfyUI loads models and runs nodes
        model = comfy.sd.load_diffusion_model(str(path))
        latents, positive = fm.latents(family, 2, 0), fm.conditioning(family, 2, 1)
        out = TrainLoRA().train([model], [{"samples": latents}], [positive], **{k: [v] for k, v in settings.items()})
    losses = out["result"][2]["loss"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert calls["fused"] == 0 and calls["ours"] > 0, f"training called the PyTorch op only: {calls}"
    assert getattr(kitchen, op) is fused, "the fused op is back in comfy_kitchen after training"

    calls["ours"] = 0
    with torch.inference_mode():  # sampling with the trained LoRA, as a sampler node runs it
        eval_loss.denoised_and_errors(out["result"][0], latents, positive, 5, points=1)
    assert calls["fused"] > 0 and calls["ours"] == 0, f"after training, the model runs the fused op: {calls}"
