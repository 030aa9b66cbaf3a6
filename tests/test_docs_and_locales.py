"""Every node of the pack has English and Russian docs served to the frontend, and translations for every input."""
import json
import urllib.request
from pathlib import Path
import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent


def our_nodes(server) -> dict:
    return {k: v for k, v in server.object_info().items() if k.startswith("LoraTrainer_")}


def fetch_text(server, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return r.read().decode()


def test_docs_in_two_languages_are_served(server):
    nodes = our_nodes(server)
    assert len(nodes) == 8
    for node_id, info in nodes.items():
        en = fetch_text(server, f"/extensions/lora_trainer/docs/{node_id}.md")
        ru = fetch_text(server, f"/extensions/lora_trainer/docs/{node_id}/ru.md")
        inputs = [*info["input"]["required"], *info["input"].get("optional", {})]
        for name in inputs:
            assert f"`{name}`" in en and f"`{name}`" in ru, (node_id, name)
        assert any("а" <= ch <= "я" for ch in ru), node_id


def test_locales_cover_every_input_and_output(server):
    i18n = server.get("/i18n")
    for lang in ("en", "ru"):
        defs = i18n[lang]["nodeDefs"]
        for node_id, info in our_nodes(server).items():
            tr = defs[node_id]
            assert tr["display_name"], (lang, node_id)
            for name in [*info["input"]["required"], *info["input"].get("optional", {})]:
                assert tr["inputs"][name]["tooltip"], (lang, node_id, name)
            for i in range(len(info["output"])):
                assert str(i) in tr["outputs"], (lang, node_id, i)
    en = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text())
    for node_id, info in our_nodes(server).items():
        assert en[node_id]["display_name"] == info["display_name"]
