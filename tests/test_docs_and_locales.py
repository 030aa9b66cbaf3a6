"""Every node of the pack has English and Russian docs served to the frontend, and translations for every input; each
doc page's tables of inputs and outputs list exactly the node's inputs and outputs."""
from __future__ import annotations

import importlib
import json
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "web" / "docs"


def our_nodes(server) -> dict:
    return {k: v for k, v in server.object_info().items() if k.startswith("LoraTrainer_")}


def fetch_text(server, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return r.read().decode()


def test_docs_in_two_languages_are_served(server):
    nodes = our_nodes(server)
    assert len(nodes) == 13
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


# -- the doc pages' tables against the node classes -----------------------------------------------------------------
@dataclass(frozen=True)
class Language:
    inputs: str  # the heading of the inputs section
    outputs: str
    optional_mark: str  # after an optional input's name
    list_mark: str  # after the type of an output that is a list


LANGUAGES = {"en": Language("Inputs", "Outputs", "(optional)", "(list)"),
             "ru": Language("Входные параметры", "Выходные данные", "(необязательный)", "(список)")}
# A table row that describes one input or output: | `name` [(optional)] | TYPE [(list)] | ...
ROW = re.compile(r"^\| `(?P<name>[^`]+)`(?: (?P<optional>\S+))? \| (?P<type>[^|]*?) \|")


@dataclass(frozen=True)
class Port:
    """One input or output as the node declares it, or as a doc page's table row describes it."""
    name: str
    type: str
    optional: bool = False  # inputs
    is_list: bool = False  # outputs


def page(node_id: str, lang: str) -> Path:
    return DOCS / f"{node_id}.md" if lang == "en" else DOCS / node_id / f"{lang}.md"


class PageError(Exception):
    """A doc page not in the form the check reads (a missing section, a row that is not a `name` | TYPE row)."""


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading."""
    parts = re.split(rf"^## {re.escape(heading)}\s*$", text, maxsplit=1, flags=re.M)
    if len(parts) != 2:
        raise PageError(f"no '## {heading}' section")
    return re.split(r"^## ", parts[1], maxsplit=1, flags=re.M)[0]


def described(text: str, lang: Language, heading: str) -> list[Port]:
    """The ports a section's table describes, in order. Every line of the table below its header must be such a row:
    a row in another form is an error here, not a row the check skips. The type is ComfyUI's name for it (COMBO for a
    list of choices), written as the node declares it."""
    table = [line for line in section(text, heading).splitlines() if line.startswith("|")]
    ports = []
    for line in table[2:]:  # the header and the |---| line
        row = ROW.match(line)
        if not row or row["optional"] not in (None, lang.optional_mark):
            raise PageError(f"'## {heading}': not a | `name` [{lang.optional_mark}] | TYPE [{lang.list_mark}] | "
                            f"row: {line[:80]}")
        kind = row["type"].strip()
        ports.append(Port(row["name"], kind.removesuffix(" " + lang.list_mark), row["optional"] is not None,
                          kind.endswith(" " + lang.list_mark)))
    return ports


def declared_inputs(cls) -> list[Port]:
    spec = cls.INPUT_TYPES()
    return [Port(name, "COMBO" if isinstance(options[0], list) else options[0], group == "optional")
            for group in ("required", "optional") for name, options in (spec.get(group) or {}).items()]


def declared_outputs(cls) -> list[Port]:
    types = tuple(cls.RETURN_TYPES)
    names = tuple(getattr(cls, "RETURN_NAMES", None) or types)  # ComfyUI shows the type where there is no name
    lists = tuple(getattr(cls, "OUTPUT_IS_LIST", None) or (False,) * len(types))
    return [Port(name, kind, is_list=bool(is_list)) for name, kind, is_list in zip(names, types, lists)]


@pytest.fixture(scope="module")
def node_classes() -> dict:
    """The pack's registry, imported in-process as ComfyUI imports it (no server)."""
    return importlib.import_module(f"{harness.load_pack().__name__}.nodes.registry").NODE_CLASS_MAPPINGS


def says(field: str, value: object) -> str:
    if field == "type":
        return f"type {value}"
    if field == "optional":
        return "optional" if value else "required"
    return "a list" if value else "not a list"


def mismatches(what: str, documented: list[Port], declared: list[Port]) -> list[str]:
    """What a page gets wrong about the node's inputs (or outputs), one line each; empty when it matches."""
    on_page, on_node = {p.name: p for p in documented}, {p.name: p for p in declared}
    found = [f"{what} `{name}` is not on the page" for name in on_node if name not in on_page]
    found += [f"the page describes {what} `{name}`, which the node does not have" for name in on_page
              if name not in on_node]
    for name in [n for n in on_node if n in on_page]:
        for field in ("type", "optional", "is_list"):
            on, off = getattr(on_page[name], field), getattr(on_node[name], field)
            if on != off:
                found.append(f"{what} `{name}`: page: {says(field, on)}; node: {says(field, off)}")
    common = [n for n in on_node if n in on_page]
    if [n for n in on_page if n in on_node] != common:
        found.append(f"{what}s not in the node's order: {', '.join(common)}")
    if len(documented) != len(on_page):
        found.append(f"a {what} is described twice")
    return found


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_each_doc_page_describes_exactly_the_nodes_inputs_and_outputs(node_classes, lang):
    """Names, order, optional or not, type (a list of choices is COMBO) and, for outputs, whether it is a list."""
    assert node_classes, "the registry is empty"
    words, problems = LANGUAGES[lang], []
    for node_id, cls in sorted(node_classes.items()):
        path = page(node_id, lang)
        text = path.read_text(encoding="utf-8")
        try:
            found = (mismatches("input", described(text, words, words.inputs), declared_inputs(cls))
                     + mismatches("output", described(text, words, words.outputs), declared_outputs(cls)))
        except PageError as e:
            found = [str(e)]
        problems += [f"{path.relative_to(REPO)}: {m}" for m in found]
    assert not problems, "\n".join(problems)
