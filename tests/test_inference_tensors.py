"""Tensors made under ``torch.inference_mode`` never reach autograd (issue 22).

ComfyUI runs every node in inference mode, so a caption's tensors, any constant a conditioning carries, and the
buffers a model makes when it loads (e.g. ACE-Step 1.5's rotary tables) are inference tensors, which autograd
refuses to save for backward. Unit tests of ``training.data.out_of_inference`` (the per-micro-batch copy of those
in conditioning and latents), and, in-process with ComfyUI as a library on any version, the Train LoRA node on a
model whose forward multiplies by an inference-mode buffer and by a tensor nested in a conditioning constant.
(The family matrix trains ACE-Step 1.5 itself through the server where ComfyUI has it.)"""
from __future__ import annotations

import dataclasses
import sys
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness  # noqa: E402
from training.data import out_of_inference  # noqa: E402

pytestmark = pytest.mark.fast

Pair = namedtuple("Pair", "left right")


@dataclasses.dataclass
class Layout:  # an object a conditioning constant may hold (e.g. 0.33's MiniMax payload holds a layout object)
    name: str
    table: torch.Tensor


def made_in_inference_mode(*shape: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if dataclasses.is_dataclass(value):
        return [t for v in vars(value).values() for t in tensors_in(v)]
    return []


def test_inference_tensors_in_nested_conditioning_are_copied_and_nothing_else_is():
    ordinary = torch.randn(2, 3)
    hook = lambda x: x  # noqa: E731  code, kept as it is
    nested = {"c_crossattn": made_in_inference_mode(1, 4, 8), "pooled": ordinary, "strength": 1.0,
              "guide": [{"latent": made_in_inference_mode(1, 2), "frames": (0, 3)}, "note"],
              "pair": Pair(made_in_inference_mode(3), ordinary), "layout": Layout("packed", made_in_inference_mode(5)),
              "ordered": OrderedDict(a=made_in_inference_mode(2)), "hook": hook, "device": torch.device("cpu")}
    before = tensors_in(nested)
    out = out_of_inference(nested)

    assert [t.is_inference() for t in tensors_in(nested)] == [t.is_inference() for t in before], "input untouched"
    assert not any(t.is_inference() for t in tensors_in(out))
    for old, new in zip(before, tensors_in(out)):
        assert torch.equal(old, new)
        assert (new is old) == (not old.is_inference()), "only inference tensors are copied"
    assert out["strength"] == 1.0 and out["hook"] is hook and out["guide"][1] == "note"
    assert out["guide"][0]["frames"] == (0, 3) and out["device"] == torch.device("cpu")
    assert type(out["pair"]) is Pair and type(out["layout"]) is Layout and type(out["ordered"]) is OrderedDict
    assert out["layout"].name == "packed" and nested["layout"].table.is_inference()


def test_a_value_without_inference_tensors_is_returned_as_it_is():
    value = {"c_crossattn": torch.randn(1, 4, 8), "list": [torch.ones(2), (torch.zeros(1), 3)], "n": 2}
    assert out_of_inference(value) is value
    tensor = made_in_inference_mode(2)
    assert out_of_inference(tensor) is not tensor and not out_of_inference(tensor).is_inference()


def test_in_inference_mode_nothing_is_copied():
    value = {"c_crossattn": made_in_inference_mode(1, 4, 8)}
    with torch.inference_mode():
        assert out_of_inference(value) is value


def test_a_tensor_shared_in_two_places_is_copied_once_and_cycles_end():
    shared = made_in_inference_mode(4)
    loop: list = [shared]
    loop.append(loop)
    out = out_of_inference({"a": shared, "b": [shared], "loop": loop})
    assert out["a"] is out["b"][0] and not out["a"].is_inference()
    assert out["loop"][0] is out["a"]


def test_the_copy_trains():
    """What the copy is for: autograd saves the copied tensor for backward, and refuses the original."""
    weight = torch.randn(3, requires_grad=True)
    gains = {"gains": [made_in_inference_mode(3)]}
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (weight * gains["gains"][0]).sum().backward()
    (weight * out_of_inference(gains)["gains"][0]).sum().backward()
    assert torch.equal(weight.grad, gains["gains"][0])


# -- the Train LoRA node, in-process -------------------------------------------------------------------------------
GAIN_KEY = "lora_trainer_test_gain"


@pytest.fixture
def sd3_with_inference_tensors(tmp_path):
    """A tiny SD3 loaded the way ComfyUI loads it (in inference mode), whose forward, like ACE-Step 1.5's, multiplies
    activations by a buffer made at load time, and multiplies its output by a tensor that the conditioning carries
    nested in a constant (``GAIN_KEY``: a dict holding a list)."""
    harness.put_comfyui_on_path()
    harness.load_pack()
    import comfy.conds
    import comfy.sd
    import tiny_models

    path = tiny_models.write_tiny_sd3(tmp_path / "tiny_sd3.safetensors")
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path))
        root = model.model.diffusion_model
        root.final_layer.register_buffer("gain", torch.full((1,), 1.5))
    root.final_layer.register_forward_hook(lambda module, args, out: out * module.gain)
    root.register_forward_hook(lambda module, args, kwargs, out: out * kwargs[GAIN_KEY]["gains"][0], with_kwargs=True)
    own = model.model.extra_conds

    def extra_conds(**kwargs):  # what a model's extra_conds does with a constant of its conditioning
        out = own(**kwargs)
        out[GAIN_KEY] = comfy.conds.CONDConstant(kwargs[GAIN_KEY])
        return out

    model.model.extra_conds = extra_conds
    return model


def train(model, steps: int = 2) -> dict:
    """The Train LoRA node run as ComfyUI's executor runs it: in inference mode, so every input is an inference
    tensor (latents, caption, pooled output, and the gain in the caption's constant)."""
    from lora_trainer.nodes.train_lora import TrainLoRA
    import tiny_models

    settings = {"batch_size": 2, "grad_accumulation_steps": 1, "steps": steps, "learning_rate": 0.001, "rank": 4,
                "optimizer": "AdamW", "loss_function": "MSE", "seed": 3, "training_dtype": "fp32",
                "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False,
                "existing_lora": "[None]"}
    with torch.inference_mode():
        latents = tiny_models.smooth_latents(2, tiny_models.SD3_LATENT_CHANNELS, 8, 8, seed=1)
        emb = tiny_models.caption_embeddings(2, 4, tiny_models.SD3_CONTEXT_DIM, seed=2)
        positive = [[emb[i : i + 1], {"pooled_output": emb[i].mean(0, keepdim=True),
                                      GAIN_KEY: {"gains": [torch.full((1,), 0.5 + i)]}}] for i in range(2)]
        assert latents.is_inference() and positive[0][1][GAIN_KEY]["gains"][0].is_inference()
        return TrainLoRA().train([model], [{"samples": latents}], [positive],
                                 **{k: [v] for k, v in settings.items()})


def test_the_node_trains_with_inference_buffers_and_conditioning_constants(sd3_with_inference_tensors):
    model = sd3_with_inference_tensors
    buffers = dict(model.model.diffusion_model.named_buffers())
    assert buffers["final_layer.gain"].is_inference()
    out = train(model)
    losses = out["result"][2]["loss"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.model.diffusion_model.named_buffers())
    assert after.keys() == buffers.keys() and all(after[k] is buffers[k] for k in buffers), \
        "after training, the model holds its own buffers again (the aliases were object patches)"
    assert not any(isinstance(b, torch.nn.Parameter) for b in after.values()), "a buffer stays a buffer"


def test_without_the_copy_the_constant_stops_training(sd3_with_inference_tensors, monkeypatch):
    """The control: the conditioning constant's tensor is what autograd refused (the copy is what fixes it)."""
    from lora_trainer.nodes import comfy_bridge

    monkeypatch.setattr(comfy_bridge, "out_of_inference", lambda value: value)
    with pytest.raises(ValueError, match="Inference tensors cannot be saved for backward"):
        train(sd3_with_inference_tensors, steps=1)
