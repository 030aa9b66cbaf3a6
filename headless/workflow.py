"""Reading an API-format workflow file and applying ``--set node_id.input=value`` overrides. No ComfyUI imports."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Prompt = dict[str, dict[str, Any]]  # node id -> {"class_type": ..., "inputs": {...}}


class WorkflowError(ValueError):
    """The file or an override is unusable; the message says which and why (the CLI exits 2)."""


def load(path: Path) -> Prompt:
    """The prompt in ``path``: an API-format workflow ("Export (API)"), bare or in a ``{"prompt": {...}}`` envelope
    (the body of ComfyUI's POST /prompt)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise WorkflowError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"{path} is not JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        # The graph the frontend saves (File > Save) is not what the executor runs.
        raise WorkflowError(f"{path} is a UI workflow (nodes + links); save it with File > Export (API) instead")
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{path}: expected a JSON object of node id -> {{class_type, inputs}}")
    for node_id, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"{path}: node {node_id!r} has no class_type")
        if not isinstance(node.setdefault("inputs", {}), dict):
            raise WorkflowError(f"{path}: node {node_id!r}: inputs must be an object")
    return data


@dataclass(frozen=True)
class Override:
    node_id: str
    input: str
    value: Any
    text: str  # as given on the command line, for error messages


def parse_override(text: str) -> Override:
    """``node_id.input=value``; the value is JSON when it parses as JSON (numbers, true, lists, quoted strings), else
    the text itself (so ``--set data.captions=one per image`` needs no quotes)."""
    key, sep, raw = text.partition("=")
    # Input names never contain a dot; node ids might (they are free-form strings), so split at the last one.
    node_id, dot, name = key.rpartition(".")
    if not sep or not dot or not node_id or not name:
        raise WorkflowError(f"--set {text}: expected node_id.input=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return Override(node_id, name, value, text)


def check_nodes(prompt: Prompt, overrides: list[Override]) -> None:
    """An override naming a node the workflow lacks is an error (checked before ComfyUI is loaded: it is quick)."""
    for o in overrides:
        if o.node_id not in prompt:
            raise WorkflowError(f"--set {o.text}: the workflow has no node {o.node_id!r} "
                                f"(its nodes: {', '.join(sorted(prompt))})")


def apply_overrides(prompt: Prompt, overrides: list[Override],
                    declared_inputs: Callable[[str], set[str] | None]) -> Prompt:
    """A copy of ``prompt`` with the overrides applied. An input may be overridden when the workflow sets it or the
    node's class declares it (``declared_inputs(class_type)``, None when the class is unknown); anything else is an
    error naming the override, so a typo never runs silently with the old value."""
    check_nodes(prompt, overrides)
    out = {node_id: {**node, "inputs": dict(node["inputs"])} for node_id, node in prompt.items()}
    for o in overrides:
        node = out[o.node_id]
        known = set(node["inputs"]) | (declared_inputs(node["class_type"]) or set())
        if o.input not in known:
            raise WorkflowError(f"--set {o.text}: node {o.node_id!r} ({node['class_type']}) has no input {o.input!r} "
                                f"(its inputs: {', '.join(sorted(known)) or 'none'})")
        node["inputs"][o.input] = o.value
    return out
