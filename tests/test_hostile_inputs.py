"""Hostile and careless inputs through the real server (issue 10). Every case ends in ComfyUI's validation rejection,
in an execution error of a clear type (ValueError) whose message starts with the input it blames, or in a sane result;
after every case the invariants of ``hostile_checks`` hold (the server answers, nothing is written outside its base
directory, no temporary file is left, no existing file changed, no pickle ran)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness
import workflows as wfs
from tests.hostile_checks import ESCAPE_TAG, Invariants, payload_is_live, pickle_payload
from tests.tiers import fast_cases

pytestmark = pytest.mark.slow("breadth: 186 hostile cases through the server; the fast tier keeps one of each kind")

FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
SEED_MAX = 2**64 - 1
TRAIN = "train"


def combo(server, node: str, name: str) -> list[str]:
    info = server.object_info(node)[node]["input"]
    spec = {**info.get("required", {}), **info.get("optional", {})}[name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def training(data: dict | None = None, save_prefix: str | None = "hostile/out", **settings) -> dict:
    """The tiny SD3 model trained one step on ``data`` (default: 4 test images), fast settings unless overridden."""
    return wfs.train(wfs.sd3_model(), data or wfs.test_data("sd3"), save_prefix=save_prefix,
                     **{"steps": 1, **FAST, **settings})


# -- outcomes ------------------------------------------------------------------------------------------------------

def execution_error(error: harness.PromptError) -> dict:
    """ComfyUI's execution_error message (exception_type, exception_message, node_id, …) of a failed prompt."""
    messages = error.payload.get("status", {}).get("messages", [])
    found = [m[1] for m in messages if m[0] == "execution_error"]
    assert found, f"not an execution error: {error}"
    return found[0]


def expect_input_error(server: harness.ComfyServer, wf: dict, node: str, input_name: str, match: str = "") -> str:
    """The prompt fails in ``node`` with a ValueError whose message starts with ``input_name`` (not KeyError,
    IndexError, TypeError, AttributeError, torch's RuntimeError…, nor a message that leaves the user guessing)."""
    with pytest.raises(harness.PromptError) as caught:
        server.run(wf)
    error = execution_error(caught.value)
    message = error["exception_message"]
    assert (error["node_id"], error["exception_type"]) == (node, "ValueError"), \
        f"{error['exception_type']} in node {error['node_id']}: {message}"
    assert message.startswith(f"{input_name}: "), f"the message does not name {input_name}: {message}"
    assert re.search(match, message), message
    return message


def expect_rejected(server: harness.ComfyServer, wf: dict, node: str | None, input_name: str | None) -> None:
    """ComfyUI's validation refuses the prompt (nothing runs), blaming ``input_name`` of ``node`` when given."""
    with pytest.raises(harness.PromptError) as caught:
        server.queue(wf)
    payload = caught.value.payload
    if payload.get("prompt_id"):  # ComfyUI still runs the prompt's valid outputs: the invariants are checked after
        with contextlib.suppress(harness.PromptError):
            server.wait(payload["prompt_id"])
    node_errors = payload.get("node_errors") or {}
    assert node_errors, f"refused without node errors: {caught.value}"
    if node is not None:
        errors = node_errors.get(node, {}).get("errors", [])
        assert any(e.get("extra_info", {}).get("input_name") == input_name for e in errors), caught.value


def expect_trained(server: harness.ComfyServer, wf: dict, steps: int = 1) -> dict:
    """The prompt succeeds: a finite loss per step, and the LoRA saved inside the loras folder with that count."""
    entry = server.run(wf)
    losses = entry["outputs"][TRAIN]["lora_trainer_loss"]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    saved = entry["outputs"]["save"]["text"][0]
    assert f"_{steps}_steps_" in saved and inside(server.base_dir / "models" / "loras", saved).is_file()
    return entry


def slug(text: str) -> str:
    """A case id as a file name of its own (each case plants files under a name no other case uses)."""
    return re.sub(r"\W+", "_", text)


def inside(folder: Path, relative: str) -> Path:
    path = (folder / relative).resolve()
    assert path.is_relative_to(folder.resolve()), f"{relative} is outside {folder}"
    return path


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def invariants(server, request) -> Iterator[Invariants]:
    checks = Invariants(server)
    yield checks
    problems = checks.problems()
    checks.cleanup()
    if problems and request.node.get_closest_marker("xfail"):
        pytest.xfail("; ".join(problems))  # a known bug's side effect: reported with its xfail, not as an error
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class Sources:
    """Valid files made by the nodes themselves, the raw material of the corrupt and foreign ones."""

    sd3_lora: bytes
    sd15_lora: bytes
    dataset: bytes


@pytest.fixture(scope="session")
def sources(comfy_server: harness.ComfyServer, tmp_path_factory) -> Sources:
    assert payload_is_live(tmp_path_factory.mktemp("payload_check")), "the pickle payloads run no code"
    loras = comfy_server.base_dir / "models" / "loras"
    sd3 = comfy_server.run(training(save_prefix="hostile_sources/sd3"))
    sd15 = comfy_server.run(wfs.train(wfs.sd15_model(), wfs.test_data("sd15"), save_prefix="hostile_sources/sd15",
                                      steps=1, **FAST))
    dataset = comfy_server.run({**wfs.test_data("sd3"), "save_dataset": {
        "class_type": "LoraTrainer_SaveTrainingDataset",
        "inputs": {"latents": ["data", 0], "positive": ["data", 1], "name": "hostile_sources/dataset"}}})
    return Sources(
        sd3_lora=(loras / sd3["outputs"]["save"]["text"][0]).read_bytes(),
        sd15_lora=(loras / sd15["outputs"]["save"]["text"][0]).read_bytes(),
        dataset=(comfy_server.base_dir / "output" / "training_datasets" /
                 dataset["outputs"]["save_dataset"]["text"][0]).read_bytes())


# -- safetensors surgery -------------------------------------------------------------------------------------------

def unpack_safetensors(data: bytes) -> tuple[dict, dict[str, str]]:
    import safetensors.torch

    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    return dict(safetensors.torch.load(data)), header.get("__metadata__", {})


def pack_safetensors(tensors: dict, metadata: dict[str, str]) -> bytes:
    import safetensors.torch

    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def edited(data: bytes, tensors: Callable[[dict], dict] = dict,
           metadata: Callable[[dict], dict] = dict) -> bytes:
    """A copy of a safetensors file with its tensors and / or metadata changed."""
    t, m = unpack_safetensors(data)
    return pack_safetensors(tensors(t), metadata(m))


def header_only(header: dict, payload: bytes = b"\0" * 8) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


# -- the files the nodes read: existing_lora (models/loras) and the data set (output/training_datasets) ----------

@dataclass(frozen=True)
class ReadInput:
    node: str
    input: str
    folder: str  # relative to the base directory
    workflow: Callable[[str], dict]

    def plant(self, invariants: Invariants, name: str, data: bytes | None = None, **kw) -> str:
        invariants.plant(invariants.base / self.folder / name, data, **kw)
        return name


READ_INPUTS = {
    "existing_lora": ReadInput(TRAIN, "existing_lora", "models/loras",
                               lambda name: training(save_prefix="hostile/continued", existing_lora=name)),
    "dataset": ReadInput("data", "dataset", "output/training_datasets",
                         lambda name: training(wfs.dataset_file(name), save_prefix="hostile/from_dataset")),
}
SOURCE_OF = {"existing_lora": "sd3_lora", "dataset": "dataset"}

CORRUPT: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda src: b"this is not a safetensors file at all" * 10,
    "empty": lambda src: b"",
    "truncated": lambda src: src[: len(src) // 2],
    "header length beyond the file": lambda src: struct.pack("<Q", 2**40) + src[8:],
    "header not JSON": lambda src: struct.pack("<Q", 16) + b"{not json at all" + src[24:],
    "tensor beyond the end": lambda src: header_only({"x": {"dtype": "F32", "shape": [1000],
                                                            "data_offsets": [0, 4000]}}),
    "unknown dtype": lambda src: header_only({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}),
}


@pytest.mark.parametrize("corruption", fast_cases(list(CORRUPT), "truncated"))
@pytest.mark.parametrize("target", READ_INPUTS)
def test_a_corrupt_file_is_a_clear_error(server, invariants, sources, target, corruption):
    read = READ_INPUTS[target]
    data = CORRUPT[corruption](getattr(sources, SOURCE_OF[target]))
    name = read.plant(invariants, f"corrupt_{slug(corruption)}.safetensors", data)
    expect_input_error(server, read.workflow(name), read.node, read.input,
                       rf"'{name}' is not a readable safetensors file")


@pytest.mark.parametrize("extension", fast_cases([".safetensors", ".ckpt", ".pt", ".pth"], ".ckpt"))
@pytest.mark.parametrize("target", READ_INPUTS)
def test_a_pickle_payload_never_runs(server, invariants, target, extension):
    """A pickle that creates a file when unpickled: a listed one (.safetensors) is refused as unreadable, the others
    are not offered and are refused by name; the invariants check that the marker file never appears."""
    read = READ_INPUTS[target]
    name = read.plant(invariants, f"payload_{target}{extension}", pickle_payload(invariants.marker, extension))
    if extension == ".safetensors":
        expect_input_error(server, read.workflow(name), read.node, read.input, "is not a readable safetensors file")
    else:
        expect_rejected(server, read.workflow(name), read.node, read.input)


@pytest.mark.parametrize("target", READ_INPUTS)
def test_a_folder_named_like_a_file_is_not_read(server, invariants, target):
    read = READ_INPUTS[target]
    name = read.plant(invariants, "a_folder.safetensors")  # an empty folder
    expect_rejected(server, read.workflow(name), read.node, read.input)  # folders are never listed


@pytest.mark.parametrize("name", ["../diffusion_models/tiny_sd3.safetensors", "/etc/passwd", "..", "",
                                  "C:\\Windows\\win.ini"])
@pytest.mark.parametrize("target", READ_INPUTS)
def test_a_name_outside_the_folder_is_refused(server, target, name):
    read = READ_INPUTS[target]
    expect_rejected(server, read.workflow(name), read.node, read.input)


@pytest.mark.fast
def test_a_data_set_linked_out_of_its_folder_is_not_read(server, invariants, sources):
    """A symlink in training_datasets to a file elsewhere (here a LoRA) is listed, but never read."""
    lora = next((invariants.base / "models" / "loras" / "hostile_sources").glob("sd3_*.safetensors"))
    read = READ_INPUTS["dataset"]
    name = read.plant(invariants, "linked_out.safetensors", link_to=lora)
    expect_input_error(server, read.workflow(name), read.node, read.input, f"'{name}' is not in ")


def test_a_model_checkpoint_as_existing_lora_is_named_as_such(server):
    loras = server.base_dir / "models" / "loras"
    shutil.copy(server.base_dir / "models" / "diffusion_models" / "tiny_sd3.safetensors", loras / "full_model.safetensors")
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="hostile/full", steps=1,
                   existing_lora="full_model.safetensors", **FAST)
    with pytest.raises(harness.PromptError, match=r"existing_lora: 'full_model.safetensors' is not a LoRA file "
                                                   r"\(it holds full model weights"):
        server.run(wf)
    assert server.get("/system_stats")  # the server still answers


def _first_key(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _renamed(suffixes: dict[str, str], keep: bool = False) -> Callable[[dict], dict]:
    """The first layer's tensors under other key suffixes, instead of (or, with ``keep``, besides) their own; as
    copies, since safetensors refuses to save two names for one tensor."""
    def edit(tensors: dict) -> dict:
        layer = _first_key(tensors, "lora_up.weight")[: -len("lora_up.weight")]
        out = {**tensors, **{layer + new: tensors[layer + old].clone() for old, new in suffixes.items()}}
        return out if keep else {k: v for k, v in out.items() if k not in {layer + old for old in suffixes}}
    return edit


def _replace_first(suffix: str, value: Callable) -> Callable[[dict], dict]:
    return lambda t: {**t, _first_key(t, suffix): value(t[_first_key(t, suffix)])}


# existing_lora files that are valid safetensors but no usable LoRA for this model: (sources attribute, edit).
FOREIGN_LORAS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "a LoRA of another architecture (SD1.5)": ("sd15_lora", lambda src: src),
    "ranks of up and down differ": ("sd3_lora", lambda src: edited(src, tensors=_replace_first(
        "lora_up.weight", lambda up: up[:, :-1]))),
    "a layer shape of another model": ("sd3_lora", lambda src: edited(src, tensors=_replace_first(
        "lora_down.weight", lambda down: down.repeat(1, 2)))),
    "mixed algorithms": ("sd3_lora", lambda src: edited(src, tensors=_renamed(
        {"lora_up.weight": "hada_w1_a", "lora_down.weight": "hada_w1_b"}))),
    "two algorithms in one layer": ("sd3_lora", lambda src: edited(src, tensors=_renamed(
        {"lora_up.weight": "hada_w1_a"}, keep=True))),
    "an unrecognised key": ("sd3_lora", lambda src: edited(src, tensors=_renamed({"alpha": "something_else"},
                                                                                 keep=True))),
    "no tensors": ("sd3_lora", lambda src: edited(src, tensors=lambda t: {})),
    "a scalar lora_down": ("sd3_lora", lambda src: edited(src, tensors=_replace_first(
        "lora_down.weight", lambda down: down.flatten()[0].clone()))),
    "an alpha of three values": ("sd3_lora", lambda src: edited(src, tensors=_replace_first(
        "alpha", lambda alpha: alpha.reshape(1).repeat(3)))),
}


@pytest.mark.parametrize("case", fast_cases(list(FOREIGN_LORAS), "a LoRA of another architecture (SD1.5)"))
def test_a_lora_that_does_not_fit_the_model_is_a_clear_error(server, invariants, sources, case):
    source, edit = FOREIGN_LORAS[case]
    read = READ_INPUTS["existing_lora"]
    name = read.plant(invariants, f"foreign_{slug(case)}.safetensors",
                      edit(getattr(sources, source)))
    expect_input_error(server, read.workflow(name), read.node, read.input, re.escape(f"'{name}'"))


@pytest.mark.parametrize("steps", ["abc", "-3", "1e9", "٣"])
def test_an_unreadable_step_count_counts_as_zero(server, invariants, sources, steps):
    """Metadata is whatever a file says: a step count that is no plain decimal is ignored (0 previous steps)."""
    data = edited(sources.sd3_lora, metadata=lambda m: {**m, "lora_trainer.steps": steps, "ss_steps": steps})
    name = READ_INPUTS["existing_lora"].plant(invariants, f"steps_{steps.encode().hex()}.safetensors", data)
    expect_trained(server, READ_INPUTS["existing_lora"].workflow(name))


def _manifest(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    return lambda src: edited(src, metadata=lambda m: {**m, "manifest": json.dumps(edit(json.loads(m["manifest"])))})


# data set files that are valid safetensors but no data set of this pack: edit of the valid data set.
FOREIGN_DATASETS: dict[str, Callable[[bytes], bytes]] = {
    "no manifest": lambda src: edited(src, metadata=lambda m: {}),
    "manifest not JSON": lambda src: edited(src, metadata=lambda m: {"manifest": "{oops"}),
    "manifest a JSON list": _manifest(lambda m: [m]),
    "another format": _manifest(lambda m: {**m, "format": "someone_else/2"}),
    "more captions than tensors": _manifest(lambda m: {**m, "captions": m["captions"] * 2}),
    "captions not a list": _manifest(lambda m: {**m, "captions": 7}),
    "caption values not a mapping": _manifest(lambda m: {**m, "captions": [{**c, "values": 5} for c in m["captions"]]}),
}


@pytest.mark.parametrize("case", FOREIGN_DATASETS)
def test_a_file_that_is_no_data_set_is_a_clear_error(server, invariants, sources, case):
    read = READ_INPUTS["dataset"]
    name = read.plant(invariants, f"foreign_{slug(case)}.safetensors", FOREIGN_DATASETS[case](sources.dataset))
    expect_input_error(server, read.workflow(name), read.node, read.input,
                       re.escape(f"'{name}' is not a training data set file of this pack"))


def test_a_lora_file_as_data_set_is_a_clear_error(server, invariants, sources):
    read = READ_INPUTS["dataset"]
    name = read.plant(invariants, "a_lora.safetensors", sources.sd3_lora)
    expect_input_error(server, read.workflow(name), read.node, read.input, "is not a training data set file")


def _no_images(src: bytes) -> bytes:
    return edited(src, tensors=lambda t: {}, metadata=lambda m: {"manifest": json.dumps(
        {**json.loads(m["manifest"]), "count": 0, "captions": []})})


@pytest.mark.parametrize("case, edit, match", [
    ("flat latents", lambda src: edited(src, tensors=lambda t: {
        k: v.flatten() if k.startswith("latent.") else v for k, v in t.items()}),
     r"item 0 has shape \(1, \d+\); expected 4-D images"),
    ("no images", _no_images, "the data set is empty"),
])
def test_a_data_set_with_unusable_latents_is_blamed_on_latents(server, invariants, sources, case, edit, match):
    """A well-formed data set file whose contents cannot be trained on: the training node names its latents."""
    read = READ_INPUTS["dataset"]
    name = read.plant(invariants, f"contents_{slug(case)}.safetensors", edit(sources.dataset))
    expect_input_error(server, read.workflow(name), TRAIN, "latents", match)


# -- the names the nodes write under: Save LoRA prefix, Loss Graph filename_prefix, Save Training Data Set name ----

@dataclass(frozen=True)
class NameInput:
    node: str
    input: str
    folder: str  # relative to the base directory
    workflow: Callable[[str], dict]
    written: Callable[[dict], str]  # the node's UI output → the file it wrote, relative to ``folder``


NAME_INPUTS = {
    "Save LoRA prefix": NameInput("save", "prefix", "models/loras", lambda name: training(save_prefix=name),
                                  lambda out: out["text"][0]),
    "Loss Graph filename_prefix": NameInput(
        "graph", "filename_prefix", "output", lambda name: {**training(save_prefix=None), "graph": {
            "class_type": "LoraTrainer_LossGraph", "inputs": {"loss": [TRAIN, 2], "filename_prefix": name}}},
        lambda out: f"{out['images'][0]['subfolder']}/{out['images'][0]['filename']}"),
    "Save Training Data Set name": NameInput(
        "save_dataset", "name", "output/training_datasets", lambda name: {**wfs.test_data("sd3"), "save_dataset": {
            "class_type": "LoraTrainer_SaveTrainingDataset",
            "inputs": {"latents": ["data", 0], "positive": ["data", 1], "name": name}}},
        lambda out: out["text"][0]),
}
ESCAPING = "must be a relative name inside"
BAD_NAMES = {  # id: (name, what the error says after "<input>: ")
    "dot-dot": ("..", ESCAPING),
    "relative escape": (f"../../../{ESCAPE_TAG}", ESCAPING),
    "dot-dot inside": (f"a/../../../../{ESCAPE_TAG}", ESCAPING),
    "absolute": (f"/tmp/{ESCAPE_TAG}/x", ESCAPING),
    "backslash escape": (f"..\\..\\..\\{ESCAPE_TAG}", ESCAPING),
    "empty": ("", ESCAPING),
    "blank": ("   ", ESCAPING),
    "only slashes": ("///", ESCAPING),
    "only a dot": (".", ESCAPING),
    "through a symlink out": ("link_out/x", "leaves"),
    "long unicode": ("日" * 100, "is 300 bytes long"),
    "NUL byte": ("a\x00b", "contains a control character"),
    "path too long": ("d/" * 2100 + "x", r"bytes in all; at most 4096"),
    "temporary file prefix": (".tmp_x", "reserved for temporary files"),
}
GOOD_NAMES = {  # id: (name, the relative folder and stem it is saved under)
    "windows reserved": ("CON", "CON"),
    "windows reserved folder": ("NUL/aux.txt", "NUL/aux.txt"),
    "unicode": ("日本語/ラベル ü", "日本語/ラベル ü"),
    "trailing slash": ("sub/", "sub"),
    "dot parts": ("./a/./b", "a/b"),
    "backslashes inside": ("win\\style", "win/style"),
    "tilde and variables": ("~/$HOME", "~/$HOME"),
    "longest stem": ("s" * 200, "s" * 200),
}


def _params(table: dict) -> list:
    """pytest params with the table's keys as ids; an entry may be a pytest.param carrying marks (a known bug)."""
    out = []
    for key, entry in table.items():
        values, marks = (entry.values, entry.marks) if hasattr(entry, "marks") else (entry, ())
        out.append(pytest.param(*values, id=key, marks=marks))
    return out


@pytest.mark.parametrize("name, match", _params(BAD_NAMES))
@pytest.mark.parametrize("target", NAME_INPUTS)
def test_an_escaping_or_absurd_name_is_a_clear_error(server, invariants, target, name, match):
    write = NAME_INPUTS[target]
    if name.startswith("link_out/"):  # a symlink inside the folder that points outside it (dangling: nothing there)
        invariants.plant(invariants.base / write.folder / "link_out", link_to=Path("/tmp") / ESCAPE_TAG)
    expect_input_error(server, write.workflow(name), write.node, write.input, match)


@pytest.mark.parametrize("name, saved_as", _params(GOOD_NAMES))
@pytest.mark.parametrize("target", NAME_INPUTS)
def test_an_odd_but_harmless_name_is_saved_inside_the_folder(server, target, name, saved_as):
    write = NAME_INPUTS[target]
    entry = server.run(write.workflow(name))
    written = write.written(entry["outputs"][write.node]).lstrip("/")
    path = inside(server.base_dir / write.folder, written)
    assert path.is_file() and written.startswith(f"{saved_as}_"), written


@pytest.mark.parametrize("field, node", [("prefix", "save"), ("filename_prefix", "graph")])
def test_an_absurdly_long_name_is_a_clear_error(server, field, node):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), steps=1, loss_graph="graphs/long", **FAST)
    wf[node]["inputs"][field] = "a" * 300
    with pytest.raises(harness.PromptError, match=rf"{field}: 'a{{40}}\.\.\.' is 300 bytes long"):
        server.run(wf)
    assert not list((server.base_dir / "models" / "loras").glob(".tmp_*"))


@pytest.mark.fast
def test_leftovers_of_a_killed_save_are_never_listed_and_are_cleaned_up(server):
    """A save killed half-way leaves a temporary file: never offered by any loader, removed by a later save."""
    loras = server.base_dir / "models" / "loras"
    (loras / "killed").mkdir(exist_ok=True)
    old_style = loras / "killed" / ".tmp_oldstyle.safetensors"  # what earlier versions left behind
    new_style = loras / "killed" / ".tmp_newstyle.partial"
    for leftover in (old_style, new_style):
        leftover.write_bytes(b"")
        hours_ago = time.time() - 2 * 3600
        os.utime(leftover, (hours_ago, hours_ago))
    for node, name in (("LoraTrainer_TrainLoRA", "existing_lora"), ("LoraLoaderModelOnly", "lora_name")):
        listed = combo(server, node, name)
        assert not any("newstyle" in f for f in listed), f"{node} lists a temporary file: {listed}"
    assert not any("oldstyle" in f for f in combo(server, "LoraTrainer_TrainLoRA", "existing_lora"))
    server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="killed/next", steps=1, **FAST))
    assert not old_style.exists() and not new_style.exists(), "stale temporary files are removed by the next save"
    assert [p.name for p in (loras / "killed").iterdir()] == ["next_1_steps_00001.safetensors"]


# -- settings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    pytest.param({"batch_size": 10000}, id="batch larger than the data set"),
    # one 2x2 image: each of the 1024 micro-batches is as cheap as a forward and backward get
    pytest.param({"grad_accumulation_steps": 1024, "data": {"count": 1, "size": 2}},
                 id="1024 micro-batches for one step"),
    *[pytest.param({"rank": 128, "algorithm": algo}, id=f"rank 128 {algo} on 64-wide layers")
      for algo in ("LoRA", "LoHa", "LoKr", "OFT")],
    pytest.param({"alpha": 1024.0}, id="alpha at its maximum"),
    pytest.param({"alpha": 0.01}, id="tiny alpha"),
    pytest.param({"seed": SEED_MAX}, id="seed at its maximum"),
    pytest.param({"learning_rate": 1.0, "optimizer": "SGD"}, id="learning rate 1"),
    pytest.param({"module_filter": " , ,, "}, id="module_filter of only commas"),
    pytest.param({"train_biases_and_norms": True, "module_filter": "final_layer"}, id="biases of one layer"),
])
def test_an_extreme_but_valid_setting_trains(server, settings):
    settings = dict(settings)
    expect_trained(server, training(wfs.test_data("sd3", **settings.pop("data", {})), **settings))


@pytest.mark.parametrize("size", [pytest.param((2, 2), id="2x2 latents"), pytest.param((3, 5), id="odd 3x5 latents")])
def test_tiny_and_odd_latents_train(server, size):
    data = wfs.test_data("sd3")
    data["data"]["inputs"].update(height=size[0], width=size[1])
    expect_trained(server, training(data))


@pytest.mark.parametrize("module_filter", ["no_such_layer", ".*", "joint_blocks.99."])
def test_a_module_filter_that_matches_nothing_is_a_clear_error(server, module_filter):
    expect_input_error(server, training(module_filter=module_filter), TRAIN, "module_filter",
                       re.escape(f"'{module_filter}'"))


@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("input_name, value", [
    ("steps", 0), ("steps", "many"), ("steps", None), ("rank", 0), ("rank", 129), ("batch_size", 0),
    ("grad_accumulation_steps", 1025), ("learning_rate", 0.0), ("learning_rate", 2.0), ("seed", -1),
    ("seed", SEED_MAX + 1), ("alpha", -1.0), ("alpha", 2000.0), ("optimizer", "Adafactor"), ("algorithm", "DoRA"),
    ("training_dtype", "fp16"), ("loss_function", "mse"), ("existing_lora", 5),
])
def test_a_setting_out_of_its_range_is_rejected(server, input_name, value):
    wf = training()
    wf[TRAIN]["inputs"][input_name] = value
    expect_rejected(server, wf, TRAIN, input_name)


# -- wiring --------------------------------------------------------------------------------------------------------

@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("node, input_name, link", [
    (TRAIN, "latents", ["data", 1]), (TRAIN, "model", ["data", 0]), (TRAIN, "positive", ["model", 0]),
    ("save", "lora", [TRAIN, 0]), ("save", "steps", [TRAIN, 2]), ("graph", "loss", [TRAIN, 1]),
    (TRAIN, "latents", ["data", 0, 1]),
])
def test_a_wrongly_typed_link_is_rejected(server, node, input_name, link):
    wf = training(loss_graph="hostile/graph")
    wf[node]["inputs"][input_name] = link
    expect_rejected(server, wf, node, input_name)


def applied(**apply_inputs) -> dict:
    """The trained LoRA applied to the model by Apply LoRA, whose output a test node compares with the bare model's
    (an output node: ComfyUI validates only what leads to one)."""
    wf = training(save_prefix=None)
    wf["apply"] = {"class_type": "LoraTrainer_ApplyLoRA",
                   "inputs": {"model": ["model", 0], "lora": [TRAIN, 1], "strength": 1.0, **apply_inputs}}
    wf["compare"] = {"class_type": "LoraTrainerTest_CompareModels", "inputs": {
        "model_a": ["model", 0], "model_b": ["apply", 0], "latents": ["data", 0], "positive": ["data", 1],
        "nonce": 0, "points": 1}}
    return wf


@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("input_name, value", [
    ("strength", 1000.0), ("strength", -101.0), ("strength", "strong"), ("lora", [TRAIN, 0]), ("model", ["data", 0]),
])
def test_apply_lora_refuses_a_bad_strength_or_link(server, input_name, value):
    expect_rejected(server, applied(**{input_name: value}), "apply", input_name)


@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("link", [["nowhere", 0], ["data", 7]], ids=["missing node", "missing output"])
def test_a_dangling_link_is_rejected(server, link):
    wf = training()
    wf[TRAIN]["inputs"]["latents"] = link
    expect_rejected(server, wf, None, None)


@pytest.mark.parametrize("node, input_name, value, saved_as", [
    ("save", "prefix", 12345, "12345_1_steps_"),
    ("save", "prefix", {"__value__": "wrapped/x"}, "wrapped/x_1_steps_"),
    (TRAIN, "steps", 1.9, "hostile/float_steps_1_steps_"),
], ids=["number as prefix", "wrapped value as prefix", "float as steps"])
def test_a_value_comfyui_converts_is_used_as_converted(server, node, input_name, value, saved_as):
    wf = training(save_prefix="hostile/float_steps")  # a prefix of its own: a cached Save LoRA would report nothing
    wf[node]["inputs"][input_name] = value
    saved = server.run(wf)["outputs"]["save"]["text"][0]
    assert saved.startswith(saved_as), saved


# -- data ----------------------------------------------------------------------------------------------------------

@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("data_inputs, input_name, match", [
    ({"corrupt": "empty"}, "latents", "the data set is empty"),
    ({"captions": "none"}, "positive", "no conditioning given"),
    ({"corrupt": "no pooled output"}, "positive", "conditioning 0 does not fit this model"),
], ids=["no images", "no captions", "SD3 captions without pooled output"])
def test_unusable_training_data_is_blamed_on_its_input(server, data_inputs, input_name, match):
    data = wfs.test_data("sd3")
    data["data"]["inputs"].update(data_inputs)
    expect_input_error(server, training(data), TRAIN, input_name, match)


def test_fewer_captions_than_images_is_a_clear_error(server):
    wf = training()
    wf["captions"] = {**wfs.test_data("sd3", count=3)["data"]}
    wf[TRAIN]["inputs"]["positive"] = ["captions", 1]
    expect_input_error(server, wf, TRAIN, "positive", "3 conditionings for 4 latent images")


@pytest.mark.fast  # validation or an error before any step: cheap
@pytest.mark.parametrize("family, message", [
    ("sd15", r"latents: image 0 has 4 channels \(shape \(4, 8, 8\)\); this SD3 model takes latents of its own VAE "
             r"\(16 channels"),
    ("wan", r"latents: item 0 has shape \(4, 16, 3, 8, 8\); this SD3 model takes 4-D images"),
])
def test_latents_that_do_not_fit_the_model_are_blamed_on_latents(server, family, message):
    """Checked against the model's latent format before any forward (they used to surface as a conditioning misfit
    or an IndexError from inside the model)."""
    wf = wfs.train(wfs.sd3_model(), wfs.test_data(family), save_prefix="hostile/latents", steps=1, **FAST)
    wf["sd3_captions"] = wfs.test_data("sd3")["data"]
    wf["train"]["inputs"]["positive"] = ["sd3_captions", 1]
    with pytest.raises(harness.PromptError, match=message):
        server.run(wf)
