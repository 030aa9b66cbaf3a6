"""/object_info of the training node against the contract table (docs/contract.md), field by field."""
import re
from pathlib import Path
import pytest

pytestmark = pytest.mark.fast

CONTRACT = Path(__file__).resolve().parent.parent / "docs" / "contract.md"


def contract_rows(section: str) -> list[list[str]]:
    text = CONTRACT.read_text()
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    return rows[1:]  # drop the header


def test_inputs_match_the_contract(server):
    info = server.object_info("LoraTrainer_TrainLoRA")["LoraTrainer_TrainLoRA"]
    required = info["input"]["required"]
    rows = contract_rows("## Inputs")
    assert list(required) == [r[0] for r in rows]  # names and order
    assert info["input_order"]["required"] == [r[0] for r in rows]
    for name, typ, rng, default, _ in rows:
        spec = required[name]
        options = spec[1] if len(spec) > 1 else {}
        if typ == "COMBO":
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            assert isinstance(choices, list) and choices, name
            if "," in rng:
                assert choices == [c.strip() for c in rng.split(",")], name
            want_default = default.strip('"')
            if want_default == "first":
                assert options.get("default", choices[0]) == choices[0], name
            else:
                assert options.get("default", choices[0]) == want_default, name
            if name == "algorithm":
                assert choices[:4] == ["LoRA", "LoHa", "LoKr", "OFT"]
            if name == "existing_lora":
                assert choices[0] == "[None]"
            continue
        assert spec[0] == typ, name
        if typ in ("INT", "FLOAT"):
            lo, hi = (float(x) for x in re.split(r"–|-(?=\d)", rng))
            assert float(options["min"]) == lo and float(options["max"]) == hi, name
            assert float(options["default"]) == float(default), name
        if typ == "BOOLEAN":
            assert options["default"] is (default == "True"), name
        assert options.get("tooltip"), f"{name} has no tooltip"
    lr = required["learning_rate"][1]
    assert lr["step"] <= 1e-6 and lr.get("round", lr["step"]) <= 1e-6  # a learning rate needs a fine step


def test_optional_inputs_keep_documented_behaviour(server):
    info = server.object_info("LoraTrainer_TrainLoRA")["LoraTrainer_TrainLoRA"]
    optional = info["input"].get("optional", {})
    assert optional["alpha"][1]["default"] == 0.0
    assert optional["module_filter"][1]["default"] == ""
    assert optional["train_biases_and_norms"][1]["default"] is False


def test_outputs_match_the_contract(server):
    info = server.object_info("LoraTrainer_TrainLoRA")["LoraTrainer_TrainLoRA"]
    rows = contract_rows("## Outputs")
    assert info["output_name"] == [r[0] for r in rows]
    assert info["output"] == [r[1] for r in rows]


def test_types_plug_into_comfyuis_own_nodes(server):
    info = server.object_info()
    ours = info["LoraTrainer_TrainLoRA"]["output"]
    builtin = info["TrainLoraNode"]["output"]
    assert ours[1:3] == ["LORA_MODEL", "LOSS_MAP"]
    assert "LORA_MODEL" in builtin and "LOSS_MAP" in builtin
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert info["LoraTrainer_ApplyLoRA"]["input"]["optional"]["lora"][0] == "LORA_MODEL"  # or a file: lora_name
    assert info["LoraTrainer_LossGraph"]["input"]["required"]["loss"][0] == "LOSS_MAP"
