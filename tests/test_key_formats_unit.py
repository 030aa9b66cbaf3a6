"""lora/key_formats.py: namings converted both ways, on a key map shaped like ComfyUI's (no server)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora import consumers  # noqa: E402
from lora.adapter_set import LoraFileError  # noqa: E402
from lora.key_formats import ModelNaming, holds_adapters, split_key  # noqa: E402

pytestmark = pytest.mark.fast

P = "diffusion_model."
# A UNet-like layer with two kohya names (native and diffusers path), a fused qkv whose diffusers names are slices, a
# plain layer, and a norm: the forms ComfyUI's model_lora_keys_unet produces.
NAMES = {
    f"{P}blocks.0.attn.qkv": f"{P}blocks.0.attn.qkv.weight",
    "lora_unet_blocks_0_attn_qkv": f"{P}blocks.0.attn.qkv.weight",
    "transformer.blocks.0.to_q": (f"{P}blocks.0.attn.qkv.weight", (0, 0, 4)),
    "transformer.blocks.0.to_k": (f"{P}blocks.0.attn.qkv.weight", (0, 4, 4)),
    "transformer.blocks.0.to_v": (f"{P}blocks.0.attn.qkv.weight", (0, 8, 4)),
    f"{P}input_blocks.1.1.proj_in": f"{P}input_blocks.1.1.proj_in.weight",
    "lora_unet_input_blocks_1_1_proj_in": f"{P}input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": f"{P}input_blocks.1.1.proj_in.weight",
    "unet.down_blocks.0.attentions.0.proj_in": f"{P}input_blocks.1.1.proj_in.weight",
    "unet.down_blocks.0.attentions.0.proj_in_alias": f"{P}input_blocks.1.1.proj_in.weight",  # no diffusers module
    f"{P}norm": f"{P}norm.weight",
    f"{P}blocks.0.mlp": f"{P}blocks.0.mlp.weight",
    f"{P}final.mod": f"{P}final.mod.weight",
    "lora_unet_final_mod": f"{P}final.mod.weight",
    "transformer.norm_out.linear": (f"{P}final.mod.weight", None, lambda w: torch.cat(w.chunk(2)[::-1])),
    "lora_unet_norm": f"{P}norm.weight",
}
SHAPES = {f"{P}blocks.0.attn.qkv.weight": (12, 5), f"{P}input_blocks.1.1.proj_in.weight": (6, 5),
          f"{P}norm.weight": (5,),
          f"{P}blocks.0.mlp.weight": (3, 5), f"{P}final.mod.weight": (4, 5)}
NAMING = ModelNaming(NAMES, SHAPES, "TestDiT")  # kohya: the layers' own paths
NAMING_SD = ModelNaming(NAMES, SHAPES, "TestSD")  # kohya: diffusers' UNet paths, as sd-scripts names SD 1.x
# The module layout of the two test families' "diffusers" class (lora/diffusers_layouts.json holds diffusers' own).
LAYOUT = frozenset({"blocks.#.to_q", "blocks.#.to_k", "blocks.#.to_v", "down_blocks.#.attentions.#.proj_in",
                    "norm_out.linear"})


@pytest.fixture(autouse=True)
def test_families(monkeypatch):
    """Two families as lora/consumers.py lists real ones: each has a kohya trainer and a diffusers class."""
    monkeypatch.setitem(consumers.KOHYA, "TestDiT", consumers.Kohya("test trainer"))
    monkeypatch.setitem(consumers.KOHYA, "TestSD", consumers.Kohya("test trainer", diffusers_paths=True))
    for family in ("TestDiT", "TestSD"):
        monkeypatch.setitem(consumers.DIFFUSERS, family, consumers.Diffusers("TestModel", "TestPipeline"))
    monkeypatch.setattr(consumers, "diffusers_layout", lambda model_class: LAYOUT)


def lora(gen: torch.Generator, rank: int = 3, alpha: float = 1.5) -> dict[str, torch.Tensor]:
    out = {}
    for layer, (rows, cols) in (("blocks.0.attn.qkv", (12, 5)), ("input_blocks.1.1.proj_in", (6, 5)),
                                ("final.mod", (4, 5))):
        out[f"{P}{layer}.lora_down.weight"] = torch.randn(rank, cols, generator=gen)
        out[f"{P}{layer}.lora_up.weight"] = torch.randn(rows, rank, generator=gen)
        out[f"{P}{layer}.alpha"] = torch.tensor(alpha)
    return out


def deltas(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, down in canonical.items():
        if key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            alpha = canonical.get(f"{module}.alpha", torch.tensor(float(down.shape[0])))
            out[module] = canonical[f"{module}.lora_up.weight"] @ down * (float(alpha) / down.shape[0])
    return out


@pytest.mark.parametrize("fmt", ["comfyui", "kohya", "diffusers"])
def test_every_format_round_trips_to_the_same_weight_deltas(fmt):
    state = lora(torch.Generator().manual_seed(0))
    saved = NAMING.convert(state, fmt)
    back = NAMING.canonical(saved)
    want, got = deltas(state), deltas(back)
    assert want.keys() == got.keys()
    for module in want:
        torch.testing.assert_close(got[module], want[module])


def test_kohya_names_are_the_familys_trainers_and_keep_alpha():
    state = lora(torch.Generator().manual_seed(0))
    saved = NAMING.convert(state, "kohya")
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in saved
    assert "lora_unet_input_blocks_1_1_proj_in.alpha" in saved
    assert "lora_unet_blocks_0_attn_qkv.lora_up.weight" in saved
    assert not any(k.startswith("lora_unet_down_blocks") for k in saved)
    proj_in = {k: v for k, v in state.items() if ".proj_in." in k}
    sd = NAMING_SD.convert(proj_in, "kohya")  # SD 1.x: sd-scripts names layers by diffusers' UNet paths
    assert set(sd) == {f"lora_unet_down_blocks_0_attentions_0_proj_in.{s}" for s in ("lora_down.weight",
                                                                                      "lora_up.weight", "alpha")}
    with pytest.raises(LoraFileError, match="no kohya name that its consumer reads for the layer 'blocks.0.attn.qkv'"):
        NAMING_SD.convert(state, "kohya")  # a layer without a diffusers path has no sd-scripts name


def test_diffusers_names_are_modules_of_the_diffusers_class_never_an_alias():
    saved = NAMING.convert(lora(torch.Generator().manual_seed(0)), "diffusers")
    assert "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight" in saved
    assert not any("proj_in_alias" in k for k in saved)


def test_the_save_time_check_finds_names_the_consumer_does_not_use():
    state = lora(torch.Generator().manual_seed(0))
    for naming, fmt in ((NAMING, "kohya"), (NAMING, "diffusers"), (NAMING_SD, "diffusers")):
        assert naming.not_canonical(naming.convert(state, fmt), fmt) == []
    t = torch.ones(2, 5)
    alias = {"unet.down_blocks.0.attentions.0.proj_in_alias.lora.down.weight": t}
    assert NAMING.not_canonical(alias, "diffusers") == ["unet.down_blocks.0.attentions.0.proj_in_alias"]
    sd_path = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t}
    assert NAMING.not_canonical(sd_path, "kohya") == ["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert NAMING_SD.not_canonical(sd_path, "kohya") == []


def test_a_format_no_tool_reads_is_an_error_naming_the_family_and_its_formats(monkeypatch):
    monkeypatch.delitem(consumers.DIFFUSERS, "TestDiT")
    with pytest.raises(LoraFileError, match="no tool reads diffusers LoRA files of TestDiT models .*saves as: "
                                            "comfyui, kohya$"):
        NAMING.convert(lora(torch.Generator().manual_seed(0)), "diffusers")


def test_diffusers_splits_a_fused_weight_into_its_named_slices_and_folds_alpha():
    state = lora(torch.Generator().manual_seed(0), rank=3, alpha=1.5)
    saved = NAMING.convert(state, "diffusers")
    assert not any(k.endswith(".alpha") for k in saved)
    up = state[f"{P}blocks.0.attn.qkv.lora_up.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(saved[f"transformer.blocks.0.{name}.lora_B.weight"], up[4 * i:4 * i + 4] * 0.5)
        torch.testing.assert_close(saved[f"transformer.blocks.0.{name}.lora_A.weight"],
                                   state[f"{P}blocks.0.attn.qkv.lora_down.weight"])


def test_slices_with_different_ranks_merge_into_one_exact_lora():
    gen = torch.Generator().manual_seed(1)
    file = {}
    for i, (name, rank) in enumerate((("to_q", 2), ("to_k", 3), ("to_v", 1))):
        file[f"transformer.blocks.0.{name}.lora_A.weight"] = torch.randn(rank, 5, generator=gen)
        file[f"transformer.blocks.0.{name}.lora_B.weight"] = torch.randn(4, rank, generator=gen)
    merged = NAMING.canonical(file)
    assert merged[f"{P}blocks.0.attn.qkv.lora_down.weight"].shape == (6, 5)
    want = torch.cat([file[f"transformer.blocks.0.{n}.lora_B.weight"] @ file[f"transformer.blocks.0.{n}.lora_A.weight"]
                      for n in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(deltas(merged)[f"{P}blocks.0.attn.qkv"], want)


def test_a_missing_slice_leaves_its_rows_unchanged():
    gen = torch.Generator().manual_seed(2)
    file = {"transformer.blocks.0.to_k.lora_A.weight": torch.randn(2, 5, generator=gen),
            "transformer.blocks.0.to_k.lora_B.weight": torch.randn(4, 2, generator=gen)}
    delta = deltas(NAMING.canonical(file))[f"{P}blocks.0.attn.qkv"]
    assert delta[:4].abs().max() == 0 and delta[8:].abs().max() == 0 and delta[4:8].abs().max() > 0


@pytest.mark.parametrize("key, want", [
    ("lora_unet_x_y.lora_down.weight", ("lora_unet_x_y", "lora_down.weight")),
    ("transformer.a.to_q.lora_A.weight", ("transformer.a.to_q", "lora_down.weight")),
    ("a.to_q.lora_B.default.weight", ("a.to_q", "lora_up.weight")),
    ("unet.a.processor.to_q_lora.up.weight", ("unet.a.processor.to_q", "lora_up.weight")),
    ("unet.a.conv1.lora.down.weight", ("unet.a.conv1", "lora_down.weight")),
    ("blocks.0.attn.lora_B", ("blocks.0.attn", "lora_up.weight")),
    ("lora_unet_x.hada_w1_a", ("lora_unet_x", "hada_w1_a")),
    ("lora_unet_x.alpha", ("lora_unet_x", "alpha")),
    ("x_embedder.proj.weight", None),
])
def test_split_key_reads_every_naming(key, want):
    assert split_key(key) == want


def test_holds_adapters_knows_foreign_factor_names():
    t = torch.zeros(2, 2)
    assert holds_adapters({"transformer.a.to_q.lora_A.weight": t})
    assert not holds_adapters({"transformer.a.to_q.weight": t, "blocks.0.alpha": t})


def test_lyCORIS_algorithms_dora_and_diffs_refuse_diffusers_but_keep_kohya():
    t = torch.ones(2, 5)
    state = {f"{P}input_blocks.1.1.proj_in.hada_w1_a": t, f"{P}input_blocks.1.1.proj_in.hada_w1_b": t,
             f"{P}input_blocks.1.1.proj_in.hada_w2_a": t, f"{P}input_blocks.1.1.proj_in.hada_w2_b": t,
             f"{P}norm.diff": torch.ones(5)}
    with pytest.raises(LoraFileError, match="diffusers format holds plain LoRA factors only.*hada_w1_a"):
        NAMING.convert(state, "diffusers")
    kohya = NAMING.convert(state, "kohya")
    assert "lora_unet_input_blocks_1_1_proj_in.hada_w2_b" in kohya and "lora_unet_norm.diff" in kohya


def test_a_layer_without_a_name_in_the_format_is_an_error_naming_it():
    mlp = {f"{P}blocks.0.mlp.lora_down.weight": torch.ones(2, 5), f"{P}blocks.0.mlp.lora_up.weight": torch.ones(3, 2)}
    with pytest.raises(LoraFileError, match="no diffusers name that its consumer reads for the layer 'blocks.0.mlp'"):
        NAMING.convert(mlp, "diffusers")
    with pytest.raises(LoraFileError, match="no tool reads kohya LoRA files of this model"):
        ModelNaming({f"{P}norm": f"{P}norm.weight"}, SHAPES).convert({f"{P}norm.diff": torch.ones(5)}, "kohya")


def test_unknown_layers_and_duplicate_namings_are_errors():
    t = torch.ones(2, 5)
    with pytest.raises(LoraFileError, match="'lora_unet_nothing' is not a layer of this model"):
        NAMING.canonical({"lora_unet_nothing.lora_down.weight": t})
    with pytest.raises(LoraFileError, match="both name the layer"):
        NAMING.canonical({"lora_unet_norm.diff": torch.ones(5), f"{P}norm.diff": torch.ones(5)})


def test_a_layer_stored_with_swapped_halves_gets_its_up_rows_swapped_in_diffusers():
    state = lora(torch.Generator().manual_seed(3), rank=2, alpha=2.0)
    saved = NAMING.convert(state, "diffusers")
    up = state[f"{P}final.mod.lora_up.weight"]
    torch.testing.assert_close(saved["transformer.norm_out.linear.lora_B.weight"], torch.cat([up[2:], up[:2]]))
    assert "lora_unet_final_mod.lora_up.weight" in NAMING.convert(state, "kohya")  # kohya: the layer's own order


def test_step_counts_of_every_trainer_are_read():
    from lora.file_format import stored_steps

    assert stored_steps({"lora_trainer.steps": "7", "ss_steps": "3"}) == 7
    assert stored_steps({"ss_steps": "300"}) == 300
    assert stored_steps({"training_info": '{"step": 1250, "epoch": 3}'}) == 1250
    assert stored_steps({"training_info": "not json"}) is None
    assert stored_steps({"format": "pt"}) is None
