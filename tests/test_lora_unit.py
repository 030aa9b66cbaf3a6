"""Unit tests of the pure-PyTorch ``lora`` package: adapter algorithms, injection, AdapterSet, file format.

No ComfyUI and no server: tiny layers on the CPU. The merged-weight reference formulas are written out here,
independently of the package, following ComfyUI's LoRA loader (comfy/weight_adapter/*.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from lora import file_format  # noqa: E402
from lora.finite import first_non_finite  # noqa: E402
from lora.adapter_set import AdapterSet, LoraFileError, split_keys  # noqa: E402
from lora.key_formats import holds_adapters  # noqa: E402
from lora.algorithms import ALGORITHMS, detect  # noqa: E402
from lora.injection import attached  # noqa: E402
from lora.layer_spec import LayerSpec  # noqa: E402

pytestmark = pytest.mark.fast

ALGOS = ("LoRA", "LoHa", "LoKr", "OFT")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g: torch.Generator, std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def init_module(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights without touching the global RNG."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, g=g, std=0.3))
    return module


# Layers under test: (factory, input shape). Out channels divisible by the OFT block size (rank 3 / 4).
LAYERS = {
    "linear": (lambda: nn.Linear(6, 8), (2, 5, 6)),
    "conv2d": (lambda: nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(4, 6, kernel_size=3, padding=1), (2, 4, 9)),
}


class Single(nn.Module):
    """A root holding one layer under the name 'layer' (so AdapterSet/attached can address it)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def single_set(layer: nn.Module, algo: str, rank: int, alpha: float, seed: int = 0):
    root = Single(layer)
    spec = LayerSpec.of(layer)
    adapter = ALGORITHMS[algo].create(spec, rank, alpha, gen(seed))
    return root, AdapterSet(ALGORITHMS[algo], {"layer": adapter}), adapter


def perturb(module: nn.Module, seed: int, std: float = 0.2) -> None:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(randn(*p.shape, g=g, std=std))


# -- reference merges, from ComfyUI's loader formulas ------------------------------------------------------------
def merged_weight(algo: str, w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    t = {k: v.detach().double() for k, v in t.items()}
    w = w.detach().double()
    alpha = float(t["alpha"])
    if algo == "LoRA":
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        r = down.shape[0]
        return w + (alpha / r) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    if algo == "LoHa":
        r = t["hada_w1_b"].shape[0]
        d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return w + (alpha / r) * d.reshape(w.shape)
    if algo == "LoKr":
        r = t["lokr_w2_b"].shape[0]
        d = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])
        return w + (alpha / r) * d.reshape(w.shape)
    if algo == "OFT":
        blocks = t["oft_blocks"]
        k, n, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        if alpha > 0 and torch.linalg.norm(q) > alpha:
            q = q * (alpha / torch.linalg.norm(q))
        eye = torch.eye(n, dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        return torch.einsum("k n m, k n ... -> k m ...", r, w.view(k, n, *w.shape[1:])).reshape(w.shape)
    raise AssertionError(algo)


def run_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The layer's own operation with another weight (bias unchanged)."""
    bias = layer.bias
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    return conv(x, weight, bias, layer.stride, layer.padding, layer.dilation)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * scale + 1e-7, f"max abs error {err:.3g} vs scale {scale:.3g}"


# -- 1. algorithms on single layers --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("bias", ["none", "small", "large"])
def test_create_is_identity_at_step_0(algo, kind, bias):
    factory, shape = LAYERS[kind]
    layer = init_module(factory(), 1)
    if bias == "none":
        layer.bias = None
    elif bias == "large":
        with torch.no_grad():
            layer.bias.mul_(30)  # OFT subtracts and re-adds the bias: that must not round
    x = randn(*shape, g=gen(2))
    before = layer(x)
    root, aset, _ = single_set(layer, algo, rank=3, alpha=2.0 if algo != "OFT" else 0.0, seed=3)
    with attached(root, aset):
        hooked = root(x)
    assert torch.equal(hooked, before)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("algo,alpha", [("LoRA", 2.0), ("LoHa", 5.0), ("LoKr", 1.5), ("OFT", 0.0), ("OFT", 0.05)])
def test_unmerged_equals_comfy_merged(algo, alpha, kind):
    factory, shape = LAYERS[kind]
    layer = init_module(factory(), 11)
    x = randn(*shape, g=gen(12))
    root, aset, adapter = single_set(layer, algo, rank=3, alpha=alpha, seed=13)
    perturb(adapter, 14)
    with torch.no_grad():
        with attached(root, aset):
            hooked = root(x)
        unhooked = root(x)
        tensors = adapter.tensors()
        assert set(tensors) >= {"alpha"}
        assert float(tensors["alpha"]) == pytest.approx(alpha if alpha > 0 else 0.0)
        if algo == "OFT" and alpha > 0:  # the norm constraint must really be active in this case
            q = tensors["oft_blocks"] - tensors["oft_blocks"].transpose(1, 2)
            assert torch.linalg.norm(q) > alpha
        w = merged_weight(algo, layer.weight, tensors)
        expected = run_layer(layer.double(), x.double(), w)
        layer.float()
    assert not torch.allclose(hooked, unhooked, atol=1e-3), "the perturbed adapter should change the output"
    assert_close_rel(hooked, expected)


@pytest.mark.parametrize("algo", ALGOS)
def test_tensors_from_tensors_round_trip_and_detect(algo):
    layer = init_module(nn.Conv2d(4, 6, 3, stride=2, padding=1), 1)
    spec = LayerSpec.of(layer)
    adapter = ALGORITHMS[algo].create(spec, 3, 2.0, gen(0))
    perturb(adapter, 5)
    tensors = adapter.tensors()
    assert detect(set(tensors)) is ALGORITHMS[algo]
    rebuilt = ALGORITHMS[algo].from_tensors(spec, tensors)
    again = rebuilt.tensors()
    assert set(again) == set(tensors)
    for k in tensors:
        assert torch.equal(again[k], tensors[k]), k
    x = randn(1, 4, 5, 5, g=gen(6))
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, y, layer.bias), adapter(x, y, layer.bias))


def test_lora_file_shapes_are_comfy_shapes():
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    t = ALGORITHMS["LoRA"].create(LayerSpec.of(layer), 3, 0.0, gen(0)).tensors()
    assert t["lora_down.weight"].shape == (3, 4, 3, 3)
    assert t["lora_up.weight"].shape == (6, 3, 1, 1)
    assert t["alpha"].dtype == torch.float32 and t["alpha"].ndim == 0


def test_default_alpha_means_scale_one_for_lora_loha():
    root = nn.Sequential(nn.Linear(8, 8))
    for algo in ("LoRA", "LoHa"):
        aset = AdapterSet.create(root, algo, rank=4, alpha=0.0, generator=gen(0))
        a = aset.adapters["0"]
        assert float(a.alpha) / a.rank == 1.0


def test_default_alpha_means_scale_one_for_lokr_when_rank_is_clamped():
    root = nn.Sequential(nn.Linear(8, 8))  # o2 = i2 = 4: rank 8 is clamped to 4
    aset = AdapterSet.create(root, "LoKr", rank=8, alpha=0.0, generator=gen(0))
    a = aset.adapters["0"]
    assert a.rank == 4
    assert float(a.alpha) / a.rank == 1.0


def test_oft_default_alpha_is_unconstrained():
    root = nn.Sequential(nn.Linear(8, 8))
    aset = AdapterSet.create(root, "OFT", rank=4, alpha=0.0, generator=gen(0))
    assert float(aset.adapters["0"].alpha) == 0.0
    assert aset.adapters["0"].blocks.shape == (2, 4, 4)


def test_lokr_rank_is_large_factor_rank():
    spec = LayerSpec.of(nn.Linear(16, 32))
    a = ALGORITHMS["LoKr"].create(spec, 2, 0.0, gen(0))
    o1o2 = a.w1.shape[0] * a.w2a.shape[0]
    i1i2 = a.w1.shape[1] * a.w2b.shape[1]
    assert (o1o2, i1i2) == (32, 16)
    assert a.w2b.shape[0] == 2 and a.rank == 2


def test_create_uses_generator_only():
    root = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3))
    a1 = AdapterSet.create(root, "LoHa", 2, 0.0, gen(7)).file_state("", torch.float32)
    mid = torch.get_rng_state()
    a2 = AdapterSet.create(root, "LoHa", 2, 0.0, gen(7)).file_state("", torch.float32)
    a3 = AdapterSet.create(root, "LoHa", 2, 0.0, gen(8)).file_state("", torch.float32)
    assert torch.equal(torch.get_rng_state(), mid)
    assert all(torch.equal(a1[k], a2[k]) for k in a1)
    assert any(not torch.equal(a1[k], a3[k]) for k in a1)


# -- 2. AdapterSet on a small model --------------------------------------------------------------------------------
class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 4, bias=False)

    def forward(self, x):
        h = self.down(F.silu(self.gn(self.conv_in(x))))  # (N, 8, 2, 2)
        h = h.flatten(2).transpose(1, 2)  # (N, 4, 8)
        return self.head(self.ln(self.proj(h)))


def small_model(seed: int = 0) -> Small:
    return init_module(Small(), seed)


def small_input() -> torch.Tensor:
    return randn(2, 3, 4, 4, g=gen(99))


LAYER_NAMES = {"conv_in", "down", "proj", "head"}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("biases", [False, True])
def test_adapter_set_file_state_and_round_trip(algo, biases):
    model = small_model()
    aset = AdapterSet.create(model, algo, rank=2, alpha=0.0, generator=gen(1), train_biases_and_norms=biases)
    assert set(aset.adapters) == LAYER_NAMES
    perturb(aset, 2, std=0.1)
    x = small_input()
    with torch.no_grad():
        plain = model(x)
        with attached(model, aset):
            out = model(x)
    assert not torch.allclose(out, plain, atol=1e-4)

    prefix = "diffusion_model."
    state = aset.file_state(prefix, torch.bfloat16)
    modules = {k[len(prefix):].split(".", 1)[0] for k in state}
    expected_modules = LAYER_NAMES | ({"gn", "ln"} if biases else set())
    assert modules == expected_modules
    for key, t in state.items():
        assert key.startswith(prefix)
        assert t.dtype == (torch.float32 if key.endswith(".alpha") else torch.bfloat16), key
        assert t.device.type == "cpu" and t.is_contiguous()
    if biases:
        assert {k for k in state if k.endswith(".diff_b")} == {f"{prefix}{n}.diff_b" for n in ("conv_in", "down", "proj")}
        assert {k for k in state if k.endswith(".diff")} == {f"{prefix}gn.diff", f"{prefix}ln.diff"}
    else:
        assert not any(k.endswith((".diff", ".diff_b")) for k in state)

    exact = aset.file_state(prefix, torch.float32)
    # the file state is a copy: changing it does not change the adapters
    next(iter(exact.values())).add_(1.0)
    exact = aset.file_state(prefix, torch.float32)
    rebuilt = AdapterSet.from_modules(model, split_keys(exact, prefix))
    assert rebuilt.algorithm is ALGORITHMS[algo]
    assert set(rebuilt.adapters) == set(aset.adapters)
    assert set(rebuilt.bias_deltas) == set(aset.bias_deltas)
    assert set(rebuilt.norm_deltas) == set(aset.norm_deltas)
    again = rebuilt.file_state(prefix, torch.float32)
    assert set(again) == set(exact)
    assert all(torch.equal(again[k], exact[k]) for k in exact)
    with torch.no_grad(), attached(model, rebuilt):
        assert torch.equal(model(x), out)


def test_bias_and_norm_deltas_act_like_merged_diffs():
    """diff_b adds to the bias, diff to the norm weight, as ComfyUI's loader merges them."""
    model = small_model()
    aset = AdapterSet.create(model, "LoRA", 2, 0.0, gen(1), patterns="conv_in,gn,ln,proj", train_biases_and_norms=True)
    assert set(aset.adapters) == {"conv_in", "proj"}
    assert set(aset.norm_deltas) == {"gn", "ln"}
    with torch.no_grad():
        for p in [*aset.bias_deltas.values(), *aset.norm_deltas.values()]:
            p.copy_(randn(*p.shape, g=gen(3), std=0.5))
    x = small_input()
    with torch.no_grad(), attached(model, aset):
        out = model(x)
    merged = small_model()
    with torch.no_grad():
        merged.conv_in.bias += aset.bias_deltas["conv_in"]
        merged.proj.bias += aset.bias_deltas["proj"]
        merged.gn.weight += aset.norm_deltas["gn"]
        merged.ln.weight += aset.norm_deltas["ln"]
        assert_close_rel(out, merged(x))


def test_module_filter_and_no_match():
    model = small_model()
    aset = AdapterSet.create(model, "LoRA", 2, 0.0, gen(0), patterns=" proj , head")
    assert set(aset.adapters) == {"proj", "head"}
    with pytest.raises(ValueError, match="module filter"):
        AdapterSet.create(model, "LoRA", 2, 0.0, gen(0), patterns="nothing_like_this")
    with pytest.raises(ValueError, match="algorithm"):
        AdapterSet.create(model, "DoRA", 2, 0.0, gen(0))


def test_trainable_parameters_are_all_fp32_and_registered():
    model = small_model()
    aset = AdapterSet.create(model, "LoKr", 2, 0.0, gen(0), train_biases_and_norms=True)
    params = list(aset.trainable())
    n_expected = 3 * 4 + 3 + 2  # w1, w2a, w2b per layer; three biases; two norms
    assert len(params) == n_expected
    assert all(p.dtype == torch.float32 for p in params)
    assert not any(p is q for p in model.parameters() for q in params)


@pytest.mark.parametrize("algo", ALGOS)
def test_from_modules_rejects_wrong_shapes_naming_the_layer(algo):
    model = small_model()
    other = nn.Module()
    other.proj = nn.Linear(8, 16)  # "proj" with other sizes than the model's (8 -> 12)
    state = AdapterSet.create(other, algo, 2, 0.0, gen(0)).file_state("", torch.float32)
    with pytest.raises(LoraFileError, match="'proj'"):
        AdapterSet.from_modules(model, split_keys(state, ""))


def test_from_modules_rejects_wrong_bias_and_norm_shapes():
    model = small_model()
    with pytest.raises(LoraFileError, match="'proj'"):
        AdapterSet.from_modules(model, {"proj": {"diff_b": torch.zeros(5)}})
    with pytest.raises(LoraFileError, match="'ln'"):
        AdapterSet.from_modules(model, {"ln": {"diff": torch.zeros(5)}})
    with pytest.raises(LoraFileError, match="'head'"):  # head has no bias
        AdapterSet.from_modules(model, {"head": {"diff_b": torch.zeros(4)}})
    with pytest.raises(LoraFileError, match="'proj'"):  # a full weight diff on a linear layer
        AdapterSet.from_modules(model, {"proj": {"diff": torch.zeros(12, 8)}})
    with pytest.raises(LoraFileError, match="'gn'"):  # a LoRA on a norm layer
        AdapterSet.from_modules(model, {"gn": {"lora_up.weight": torch.zeros(8, 1), "lora_down.weight": torch.zeros(1, 8)}})


def test_from_modules_rejects_unknown_layer_and_keys():
    model = small_model()
    state = AdapterSet.create(model, "LoRA", 2, 0.0, gen(0)).file_state("diffusion_model.", torch.float32)
    state["diffusion_model.missing.lora_up.weight"] = torch.zeros(4, 2)
    state["diffusion_model.missing.lora_down.weight"] = torch.zeros(2, 4)
    with pytest.raises(LoraFileError, match="'missing'"):
        AdapterSet.from_modules(model, split_keys(state, "diffusion_model."))
    with pytest.raises(LoraFileError, match="unrecognised key"):
        split_keys({"diffusion_model.proj.weight": torch.zeros(1)}, "diffusion_model.")
    with pytest.raises(LoraFileError, match="unrecognised key"):
        split_keys({"text_model.proj.alpha": torch.zeros(())}, "diffusion_model.")
    with pytest.raises(LoraFileError, match="mixes algorithms"):
        AdapterSet.from_modules(model, {
            "proj": {"lora_up.weight": torch.zeros(12, 1), "lora_down.weight": torch.zeros(1, 8)},
            "head": {"oft_blocks": torch.zeros(2, 2, 2)}})
    with pytest.raises(LoraFileError):
        AdapterSet.from_modules(model, {})


def test_split_keys_longest_suffix_wins():
    state = {"p.a.b.lora_up.weight": torch.zeros(1), "p.a.b.diff_b": torch.zeros(1), "p.a.b.diff": torch.zeros(1),
             "p.x.lokr_w2_a": torch.zeros(1), "p.x.lokr_w2": torch.zeros(1)}
    out = split_keys(state, "p.")
    assert set(out) == {"a.b", "x"}
    assert set(out["a.b"]) == {"lora_up.weight", "diff_b", "diff"}
    assert set(out["x"]) == {"lokr_w2_a", "lokr_w2"}


def test_lokr_inner_rank_mismatch_is_a_file_error():
    model = small_model()
    # proj: 8 -> 12. o1*o2 = 3*4 = 12, i1*i2 = 2*4 = 8, but w2a (4, 3) @ w2b (2, 4) is impossible.
    tensors = {"lokr_w1": torch.zeros(3, 2), "lokr_w2_a": torch.zeros(4, 3), "lokr_w2_b": torch.zeros(2, 4),
               "alpha": torch.tensor(2.0)}
    with pytest.raises(LoraFileError, match="'proj'"):
        aset = AdapterSet.from_modules(model, {"proj": tensors})
        with attached(model, aset):
            model(small_input())  # what happens instead: a RuntimeError from the matmul here


def test_lokr_full_w2_loads_with_scale_one():
    layer = init_module(nn.Linear(6, 8), 1)
    spec = LayerSpec.of(layer)
    o1, o2, i1, i2k = ALGORITHMS["LoKr"].factors(spec)
    g = gen(4)
    t = {"lokr_w1": randn(o1, i1, g=g), "lokr_w2": randn(o2, i2k, g=g), "alpha": torch.tensor(100.0)}
    a = ALGORITHMS["LoKr"].from_tensors(spec, t)
    x = randn(3, 6, g=g)
    # ComfyUI: a full w2 has no alpha scaling (scale 1)
    w = layer.weight.double() + torch.kron(t["lokr_w1"].double(), t["lokr_w2"].double()).reshape(8, 6)
    with torch.no_grad():
        assert_close_rel(a(x, layer(x), layer.bias), F.linear(x.double(), w, layer.bias.double()))


def test_diff_b_on_group_norm_is_added_per_channel():
    model = small_model()
    delta = torch.arange(8, dtype=torch.float32) / 8
    aset = AdapterSet.from_modules(model, {"gn": {"diff_b": delta}})
    x = randn(2, 8, 4, 4, g=gen(5))  # H = W = C/2: a per-W add would not even broadcast
    with torch.no_grad():
        expected = model.gn(x) + delta.view(1, 8, 1, 1)
        with attached(model, aset):
            got = model.gn(x)
    assert_close_rel(got, expected)


def test_diff_b_on_layer_norm_is_added_per_feature():
    model = small_model()
    delta = torch.arange(12, dtype=torch.float32) / 12
    aset = AdapterSet.from_modules(model, {"ln": {"diff_b": delta}})
    x = randn(2, 3, 12, g=gen(5))
    with torch.no_grad():
        expected = model.ln(x) + delta
        with attached(model, aset):
            got = model.ln(x)
    assert_close_rel(got, expected)


# -- 3. injection --------------------------------------------------------------------------------------------------
def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("dora", [False, True])
def test_attached_removes_hooks_on_exit_and_on_exception(dora):
    model = small_model()
    aset = AdapterSet.create(model, "LoHa", 2, 0.0, gen(1), train_biases_and_norms=True, dora=dora)
    perturb(aset, 2, std=0.1)
    x = small_input()
    with torch.no_grad():
        before = model(x)
        with attached(model, aset):
            # 4 layers (DoRA: each with an input pre-hook too) + 2 norms
            assert all_hooks(model) == len(LAYER_NAMES) * (1 + dora) + 2
            assert not torch.allclose(model(x), before, atol=1e-4)
        assert all_hooks(model) == 0
        assert torch.equal(model(x), before)

        with pytest.raises(RuntimeError, match="boom"):
            with attached(model, aset):
                model(x)
                raise RuntimeError("boom")
        assert all(not m._forward_hooks for m in model.modules())
        assert torch.equal(model(x), before)


def test_attached_removes_hooks_when_attaching_fails_halfway():
    model = small_model()
    aset = AdapterSet.create(model, "LoRA", 2, 0.0, gen(1), train_biases_and_norms=True)
    aset.norm_deltas["no_such_norm"] = nn.Parameter(torch.zeros(3))  # fails after the layer hooks are in
    with pytest.raises(AttributeError):
        with attached(model, aset):
            pass
    assert all_hooks(model) == 0


def test_attached_leaves_state_dict_untouched_and_gradients_reach_adapters_only():
    model = small_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    aset = AdapterSet.create(model, "OFT", 4, 0.0, gen(1), train_biases_and_norms=True)
    perturb(aset, 3, std=0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    with attached(model, aset):
        assert set(model.state_dict()) == set(sd)
        model(small_input()).square().mean().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aset.trainable())


# -- 7. file format ------------------------------------------------------------------------------------------------
def test_save_new_never_overwrites_and_leaves_no_temp_files(tmp_path):
    d = tmp_path / "loras" / "sub"
    t1 = {"a.alpha": torch.tensor(1.0), "a.lora_up.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    t2 = {"a.alpha": torch.tensor(2.0), "a.lora_up.weight": torch.ones(2, 3, dtype=torch.bfloat16)}
    meta1 = file_format.build_metadata(steps=12, algorithm="LoRA", rank=3, alpha=1.0, base_model="m",
                                       settings={"b": 1, "a": 2}, date="2024-01-01")
    p1 = file_format.save_new(d, "my_lora", t1, meta1)
    p2 = file_format.save_new(d, "my_lora", t2, {"x": "y"})
    assert p1.name == "my_lora_00001.safetensors"
    assert p2.name == "my_lora_00002.safetensors"
    assert sorted(f.name for f in d.iterdir()) == [p1.name, p2.name]
    with safetensors.safe_open(str(p1), "pt") as f:
        assert f.metadata() == meta1
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == set(t1) and all(torch.equal(got[k], t1[k]) for k in t1)
    got2 = safetensors.torch.load_file(str(p2))
    assert got2["a.lora_up.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got2[k], t2[k]) for k in t2)
    # an existing file with a gap below it: the first free counter is used, nothing is replaced
    (d / "my_lora_00003.safetensors").write_bytes(b"keep")
    p4 = file_format.save_new(d, "my_lora", t1, {})
    assert p4.name == "my_lora_00004.safetensors"
    assert (d / "my_lora_00003.safetensors").read_bytes() == b"keep"
    assert not [f for f in d.iterdir() if f.name.startswith(".tmp_")]


def test_save_new_removes_temp_file_when_saving_fails(tmp_path):
    with pytest.raises(Exception):
        file_format.save_new(tmp_path, "bad", {"x": "not a tensor"}, {})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_metadata_and_stored_steps():
    meta = file_format.build_metadata(steps=7, algorithm="LoKr", rank=4, alpha=2.5, base_model="sd3",
                                      settings={"z": 1}, date="d")
    assert all(isinstance(v, str) for v in meta.values())
    assert file_format.stored_steps(meta) == 7
    assert file_format.stored_steps({"ss_steps": "250"}) == 250
    assert file_format.stored_steps({"lora_trainer.steps": "3", "ss_steps": "250"}) == 3
    assert file_format.stored_steps({"lora_trainer.steps": "n/a", "ss_steps": "9"}) == 9
    assert file_format.stored_steps({}) is None
    assert file_format.stored_steps(None) is None
    assert file_format.stored_steps({"ss_steps": "-4"}) is None
    assert file_format.stored_steps({"ss_steps": "1.5"}) is None


def test_stored_steps_odd_digits_give_none():
    assert file_format.stored_steps({"ss_steps": "²"}) is None


def test_lora_weights_is_a_plain_dict_with_metadata():
    w = file_format.LoraWeights({"a.alpha": torch.tensor(1.0)}, {"k": "v"})
    assert isinstance(w, dict) and dict(w).keys() == {"a.alpha"} and w.metadata == {"k": "v"}


def test_holds_adapters_tells_a_lora_from_model_weights():
    t = torch.zeros(2, 2)
    assert holds_adapters({"diffusion_model.x.lora_up.weight": t, "diffusion_model.x.alpha": t[0, 0]})
    assert holds_adapters({"diffusion_model.x.hada_w1_a": t})
    assert holds_adapters({"diffusion_model.norm.diff": t[0]})  # a file of bias/norm offsets only
    assert not holds_adapters({"x_embedder.proj.weight": t, "x_embedder.proj.bias": t[0], "blocks.0.alpha": t[0]})


def test_first_non_finite_names_the_path_of_the_bad_tensor():
    nan, inf = float("nan"), float("inf")
    assert first_non_finite({"a": torch.ones(2), "b": [torch.ones(1), {"c": torch.tensor([1.0, nan])}]}) == "'b'[1]['c']"
    assert first_non_finite(torch.tensor([1.0, -inf])) == "."
    assert first_non_finite([torch.ones(1), torch.tensor([inf], dtype=torch.bfloat16)]) == "[1]"
    assert first_non_finite({"i": torch.arange(3), "s": "text", "o": object(), "f": torch.zeros(2, 2)}) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_save_new_refuses_non_finite_tensors_and_writes_nothing(tmp_path, bad):
    tensors = {"x.lora_up.weight": torch.ones(2, 2), "x.lora_down.weight": torch.tensor([[1.0, bad]])}
    with pytest.raises(ValueError, match=r"lora: holds NaN or infinite values \(in 'x.lora_down.weight'\); nothing"):
        file_format.save_new(tmp_path, "bad", tensors, {})
    assert list(tmp_path.iterdir()) == []
