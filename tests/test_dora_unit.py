"""Unit tests of DoRA (``dora_scale``) and rsLoRA (alpha/√rank) in the ``lora`` package (issue 11, item 7).

The training-time forward is compared with what ComfyUI's loader merges from the saved tensors: ComfyUI's own
``comfy.lora.load_lora`` + ``calculate_weight`` where ComfyUI is importable, and always with a float64 reference
written out here from ``weight_decompose`` (comfy/weight_adapter/base.py).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from test_lora_unit import (LAYERS, Single, assert_close_rel, gen, init_module, merged_weight,  # noqa: E402
                            perturb, randn, run_layer, small_input, small_model)
from lora import dora  # noqa: E402
from lora.adapter_set import AdapterSet, LoraFileError, split_keys  # noqa: E402
from lora.injection import attached  # noqa: E402
from lora.layer_spec import LayerSpec  # noqa: E402

pytestmark = pytest.mark.fast

DORA_ALGOS = ("LoRA", "LoHa", "LoKr")
ALPHAS = {"LoRA": 2.0, "LoHa": 5.0, "LoKr": 1.5}


def comfyui():
    """ComfyUI's ``comfy.lora``, or a skip where ComfyUI is not installed next to the repository."""
    import harness  # tools/, on the path through conftest.py

    try:
        harness.put_comfyui_on_path()
        import comfy.lora
    except (ImportError, OSError) as e:
        pytest.skip(f"ComfyUI is not importable: {e}")
    return comfy.lora


def comfy_merge(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI's LoRA loader makes of one layer's file tensors at strength 1 (as its patcher does: on a
    float32 copy of the weight)."""
    comfy_lora = comfyui()
    patches = comfy_lora.load_lora({f"layer.{k}": v for k, v in tensors.items()}, {"layer": "layer.weight"})
    patch = (1.0, patches["layer.weight"], 1.0, None, None)  # (strength, adapter, strength_model, offset, function)
    return comfy_lora.calculate_weight([patch], weight.detach().float().clone(), "layer.weight")


def input_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖weight‖ per input channel, shaped (1, in, 1, …) as the loader's weight_decompose shapes it."""
    per_input = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return per_input.view(1, -1, *([1] * (weight.ndim - 2)))


def reference_merge(algo: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """weight_decompose in float64 for a per-input-channel dora_scale: m · (W + ΔW) / (‖W + ΔW‖ + eps)."""
    merged = merged_weight(algo, weight, tensors)
    if "dora_scale" not in tensors:
        return merged
    return merged * (tensors["dora_scale"].double() / (input_norms(merged) + torch.finfo(torch.float32).eps))


MERGES = {"comfyui": lambda algo, t, w: comfy_merge(t, w), "reference": reference_merge}


def dora_set(layer: nn.Module, algo: str, rank: int = 3, seed: int = 13, **options):
    root = Single(layer)
    aset = AdapterSet.create(root, algo, rank, ALPHAS[algo], gen(seed), dora=True, **options)
    return root, aset, aset.adapters["layer"]


def layer_and_input(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = LAYERS[kind]
    return init_module(factory(), seed), randn(*shape, g=gen(seed + 1))


EVERY_ALGO_LAYER_AND_MERGE = pytest.mark.parametrize(
    "algo,kind,merge", list(itertools.product(DORA_ALGOS, LAYERS, MERGES)))


def layer_tensors(aset: AdapterSet) -> dict[str, torch.Tensor]:
    """The file tensors of the set's one layer, by key suffix (float32, as a float32 file holds them)."""
    return {k.split(".", 1)[1]: v for k, v in aset.file_state("", torch.float32).items()}


# -- training forward = the loader's merge -------------------------------------------------------------------------
@EVERY_ALGO_LAYER_AND_MERGE
def test_dora_forward_equals_loader_merge(algo, kind, merge):
    layer, x = layer_and_input(kind, 11)
    root, aset, adapter = dora_set(layer, algo)
    perturb(adapter, 14)  # the factors and the magnitude
    with torch.no_grad():
        plain = root(x)
        with attached(root, aset):
            hooked = root(x)
        tensors = layer_tensors(aset)
        assert tensors["dora_scale"].shape == dora.magnitude_shape(adapter.spec)
        expected = run_layer(layer.double(), x.double(), MERGES[merge](algo, tensors, layer.weight).double())
        layer.float()
    assert not torch.allclose(hooked, plain, atol=1e-3), "the perturbed adapter should change the output"
    assert_close_rel(hooked, expected)


def test_dora_magnitude_shapes_are_comfy_input_axis_shapes():
    """(1, in) for linear, (1, in, 1, 1) for conv2d: the first size is not out (for more than one output), so the
    loader takes the input axis and normalises W + ΔW."""
    spec_linear = LayerSpec.of(nn.Linear(6, 8))
    spec_conv = LayerSpec.of(nn.Conv2d(4, 6, 3))
    assert dora.magnitude_shape(spec_linear) == (1, 6)
    assert dora.magnitude_shape(spec_conv) == (1, 4, 1, 1)


# -- step 0 ----------------------------------------------------------------------------------------------------------
@EVERY_ALGO_LAYER_AND_MERGE
def test_dora_is_the_base_layer_at_step_0(algo, kind, merge):
    layer, x = layer_and_input(kind, 1)
    before = layer(x)
    root, aset, adapter = dora_set(layer, algo)
    w = layer.weight.detach()
    assert_close_rel(adapter.dora_scale.detach(), input_norms(w) + dora.EPS, rel=1e-6)
    with torch.no_grad(), attached(root, aset):
        assert torch.equal(root(x), before)
    # and the loader, given the step-0 file, leaves the weight as it is
    tensors = layer_tensors(aset)
    assert_close_rel(MERGES[merge](algo, tensors, w), w, rel=1e-6)


# -- gradients -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("algo", DORA_ALGOS)
def test_dora_gradients_are_those_of_the_merged_weight_with_the_norm_detached(algo, kind):
    """Gradients reach dora_scale and the factors, equal to autograd through the merged weight
    m · (W + ΔW) / (‖W + ΔW‖ + eps) with the norm a constant (DoRA paper, section 4.3); the base weight gets none
    and is not changed."""
    layer, x = layer_and_input(kind, 21)
    for p in layer.parameters():
        p.requires_grad_(False)
    weight_before = layer.weight.detach().clone()
    target = randn(*layer(x).shape, g=gen(23))
    root, aset, adapter = dora_set(layer, algo)
    perturb(adapter, 24)
    with attached(root, aset):
        F.mse_loss(root(x), target).backward()
    got = {name: p.grad.clone() for name, p in adapter.named_parameters()}
    assert got["dora_scale"].abs().sum() > 0
    assert torch.equal(layer.weight, weight_before) and layer.weight.grad is None

    adapter.zero_grad()
    delta = adapter.delta_weight() if algo != "LoRA" else (
        (adapter.up @ adapter.down).reshape(layer.weight.shape) * (adapter.alpha / adapter.rank))
    merged = layer.weight + delta
    gain = adapter.dora_scale / (input_norms(merged.detach()) + dora.EPS)
    F.mse_loss(run_layer(layer, x, merged * gain), target).backward()
    for name, p in adapter.named_parameters():
        assert_close_rel(got[name], p.grad, rel=1e-4)


# -- files -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", DORA_ALGOS)
def test_dora_file_state_from_modules_round_trip(algo):
    model = small_model()
    aset = AdapterSet.create(model, algo, 2, 0.0, gen(1), dora=True)
    perturb(aset, 2, std=0.1)
    x = small_input()
    with torch.no_grad(), attached(model, aset):
        out = model(x)
    prefix = "diffusion_model."
    state = aset.file_state(prefix, torch.bfloat16)
    assert {k for k in state if k.endswith(".dora_scale")} == {f"{prefix}{n}.dora_scale" for n in aset.adapters}
    # the magnitude stays float32 in a bf16 file: it scales the base weight itself
    assert all(t.dtype == torch.float32 for k, t in state.items() if k.endswith((".dora_scale", ".alpha")))

    exact = aset.file_state(prefix, torch.float32)
    rebuilt = AdapterSet.from_modules(model, split_keys(exact, prefix))
    assert all(a.dora_scale is not None for a in rebuilt.adapters.values())
    assert sum(1 for _ in rebuilt.trainable()) == sum(1 for _ in aset.trainable())
    again = rebuilt.file_state(prefix, torch.float32)
    assert set(again) == set(exact) and all(torch.equal(again[k], exact[k]) for k in exact)
    with torch.no_grad(), attached(model, rebuilt):
        assert torch.equal(model(x), out)


def test_from_modules_refuses_magnitudes_it_cannot_train_as_comfyui_loads_them():
    model = small_model()  # proj: 8 -> 12
    lora = {"lora_up.weight": torch.zeros(12, 2), "lora_down.weight": torch.zeros(2, 8), "alpha": torch.tensor(2.0)}
    with pytest.raises(LoraFileError, match=r"'proj'.*per output channel"):  # LyCORIS's wd_on_out, PEFT's layout
        AdapterSet.from_modules(model, {"proj": {**lora, "dora_scale": torch.ones(12, 1)}})
    with pytest.raises(LoraFileError, match=r"'proj'.*'dora_scale' has shape \(8,\)"):
        AdapterSet.from_modules(model, {"proj": {**lora, "dora_scale": torch.ones(8)}})
    with pytest.raises(LoraFileError, match=r"'proj'.*dora_scale"):
        AdapterSet.from_modules(model, {"proj": {"oft_blocks": torch.zeros(3, 4, 4), "dora_scale": torch.ones(1, 8)}})
    rebuilt = AdapterSet.from_modules(model, {"proj": {**lora, "dora_scale": torch.ones(1, 8)}})
    assert rebuilt.adapters["proj"].dora_scale.shape == (1, 8)


# -- options -------------------------------------------------------------------------------------------------------
def test_oft_refuses_dora_and_rs_lora_naming_the_option():
    model = small_model()
    with pytest.raises(ValueError, match=r"^dora: only LoRA, LoHa and LoKr"):
        AdapterSet.create(model, "OFT", 4, 0.0, gen(0), dora=True)
    with pytest.raises(ValueError, match=r"^rs_lora: OFT has no alpha/rank scale"):
        AdapterSet.create(model, "OFT", 4, 0.0, gen(0), rs_lora=True)


def test_a_single_output_layer_gets_no_dora():
    """ComfyUI reads a (1, in) dora_scale of a layer with one output as per output channel: that layer stays LoRA."""
    root = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    aset = AdapterSet.create(root, "LoRA", 2, 0.0, gen(0), dora=True)
    assert aset.adapters["0"].dora_scale is not None and aset.adapters["1"].dora_scale is None
    assert "1.dora_scale" not in aset.file_state("", torch.float32)


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("algo,rank,used_rank", [("LoRA", 4, 4), ("LoHa", 9, 9), ("LoKr", 8, 4)])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_rs_lora_scale_and_stored_alpha(algo, rank, used_rank, alpha, merge):
    """Scale alpha/√rank (alpha 0: the default alpha = rank), stored as alpha·√rank: the loader divides by rank."""
    layer = init_module(nn.Linear(8, 8), 31)  # LoKr: o2 = i2 = 4, so rank 8 is clamped to 4
    root = Single(layer)
    aset = AdapterSet.create(root, algo, rank, alpha, gen(32), rs_lora=True)
    adapter = aset.adapters["layer"]
    assert adapter.rank == used_rank
    user_alpha = alpha or float(used_rank)
    stored = float(aset.file_state("", torch.float32)["layer.alpha"])
    assert stored == pytest.approx(user_alpha * used_rank ** 0.5, rel=1e-6)
    assert stored / used_rank == pytest.approx(user_alpha / used_rank ** 0.5, rel=1e-6)
    perturb(adapter, 33)
    x = randn(3, 8, g=gen(34))
    tensors = layer_tensors(aset)
    with torch.no_grad():
        with attached(root, aset):
            hooked = root(x)
        expected = run_layer(layer.double(), x.double(), MERGES[merge](algo, tensors, layer.weight).double())
        layer.float()
    assert_close_rel(hooked, expected)


def test_rs_lora_with_dora():
    layer = init_module(nn.Conv2d(4, 6, 3, padding=1), 41)
    x = randn(2, 4, 5, 5, g=gen(42))
    root, aset, adapter = dora_set(layer, "LoRA", rank=4, rs_lora=True)
    assert adapter.alpha == pytest.approx(ALPHAS["LoRA"] * 2.0)
    perturb(adapter, 43)
    tensors = layer_tensors(aset)
    with torch.no_grad():
        with attached(root, aset):
            hooked = root(x)
        assert_close_rel(hooked, run_layer(layer.double(), x.double(), reference_merge("LoRA", tensors, layer.weight)))
        layer.float()


@pytest.mark.parametrize("algo", ["LoRA", "LoHa", "LoKr", "OFT"])
def test_defaults_are_plain_adapters(algo):
    model = small_model()
    default = AdapterSet.create(model, algo, 2, 0.0, gen(5)).file_state("", torch.float32)
    explicit = AdapterSet.create(model, algo, 2, 0.0, gen(5), dora=False, rs_lora=False).file_state("", torch.float32)
    assert not any(k.endswith(".dora_scale") for k in default)
    assert set(default) == set(explicit) and all(torch.equal(default[k], explicit[k]) for k in default)
    expected_alpha = 0.0 if algo == "OFT" else 2.0
    assert all(float(v) == expected_alpha for k, v in default.items() if k.endswith(".alpha"))


# -- base weights in other forms -------------------------------------------------------------------------------------
class ScaledLinear(nn.Linear):
    """A stand-in for ComfyUI's scaled-fp8 ops: the stored weight times ``scale_weight`` is the real weight, and
    ``convert_weight`` is what ComfyUI's patcher calls before it merges a LoRA."""

    scale_weight = 4.0

    def forward(self, x):
        return F.linear(x, self.weight * self.scale_weight, self.bias)

    def convert_weight(self, weight, inplace=False, **kwargs):
        return weight.mul_(self.scale_weight) if inplace else weight * self.scale_weight


def test_dora_uses_the_converted_base_weight_and_never_writes_it():
    layer = init_module(ScaledLinear(6, 8), 51)
    stored = layer.weight.detach().clone()
    x = randn(2, 6, g=gen(52))
    before = layer(x)
    root, aset, adapter = dora_set(layer, "LoRA")
    real = stored * ScaledLinear.scale_weight
    assert_close_rel(adapter.dora_scale.detach(), input_norms(real) + dora.EPS, rel=1e-6)
    with torch.no_grad(), attached(root, aset):
        assert torch.equal(root(x), before)
    perturb(adapter, 53)
    tensors = layer_tensors(aset)
    with torch.no_grad(), attached(root, aset):
        hooked = root(x)
    assert_close_rel(hooked, F.linear(x.double(), reference_merge("LoRA", tensors, real), layer.bias.double()))
    assert torch.equal(layer.weight, stored)


def test_dora_on_a_bf16_layer():
    """A bf16 base weight and input: the input keeps its dtype, the result is the float32 merge to bf16 accuracy."""
    layer = init_module(nn.Linear(16, 12), 61).to(torch.bfloat16)
    x = randn(4, 16, g=gen(62)).to(torch.bfloat16)
    root, aset, adapter = dora_set(layer, "LoRA", rank=4)
    perturb(adapter, 63, std=0.05)
    tensors = layer_tensors(aset)
    with torch.no_grad(), attached(root, aset):
        hooked = root(x)
    assert hooked.dtype == torch.bfloat16
    expected = F.linear(x.double(), reference_merge("LoRA", tensors, layer.weight), layer.bias.double())
    assert_close_rel(hooked, expected, rel=2e-2)
