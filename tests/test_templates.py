"""The templates in example_workflows/: listed by ComfyUI, and their API copies run (demo) or validate (real world)."""
import json
from pathlib import Path

import demo
import pytest

pytestmark = pytest.mark.fast

TEMPLATES = Path(__file__).resolve().parent.parent / "example_workflows"
NAMES = sorted(p.stem for p in TEMPLATES.glob("*.json"))


def test_templates_are_in_comfyuis_template_list(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed["lora_trainer"]) == NAMES == ["lora_trainer_demo_tiny_model", "lora_trainer_real_world"]
    for name in NAMES:
        ui = server.get(f"/api/workflow_templates/lora_trainer/{name}.json")
        api = json.loads((TEMPLATES / "api" / f"{name}.json").read_text())
        assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())


def test_real_world_template_uses_existing_nodes(server):
    info = server.object_info()
    api = json.loads((TEMPLATES / "api" / "lora_trainer_real_world.json").read_text())
    for node in api.values():
        assert node["class_type"] in info
        assert set(node["inputs"]) <= set(info[node["class_type"]]["input"]["required"]) | set(
            info[node["class_type"]]["input"].get("optional", {}))


def test_demo_template_trains(server):
    dataset = demo.write_dataset(server.base_dir)
    api = json.loads((TEMPLATES / "api" / "lora_trainer_demo_tiny_model.json").read_text())
    api["data"]["inputs"]["dataset"] = dataset
    entry = server.run(api)
    assert entry["outputs"]["save"]["text"][0].startswith("demo/demo_lora_40_steps")
    assert len(entry["outputs"]["train"]["lora_trainer_loss"]) == 40
