"""Process faults through the real server (issue 10): /interrupt before the first optimizer step, in the middle of a
gradient accumulation and during Save LoRA; SIGKILL of the server during training and during a save, then a new
server on the same base directory. After each: every visible LoRA file is whole and finite, no temporary file is
offered by any loader, a cancel keeps its finished steps in loras/cancelled/, and the next prompt runs."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file

import harness
import workflows as wfs

pytestmark = pytest.mark.slow("kills and restarts its own ComfyUI servers; the fast tier has a cancel (test_train_behaviour) and a kill and resume (test_long_runs)")

TEST_NODE_PACK = Path(__file__).resolve().parent / "node_packs" / "lora_trainer_test_nodes"
FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
TEMP_PREFIX = ".tmp_"  # the pack's temporary save files (lora/file_format.py)
Messages = list[dict]


def loras_dir(server: harness.ComfyServer) -> Path:
    return server.base_dir / "models" / "loras"


def whole_lora(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors; fails on a truncated or garbled file, an empty one, or a NaN/inf weight."""
    tensors = load_file(str(path))
    assert tensors, f"{path} holds no tensors"
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"{path}: non-finite values in {bad}"
    return tensors


def steps_of(path: Path) -> int:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["lora_trainer.steps"])


def check_loras_folder(server: harness.ComfyServer, *folders: str) -> None:
    """Every file a loader could offer (in ``folders`` of the loras folder, else all of it) opens whole and finite; a
    leftover of a killed save is only ever a hidden ``.tmp_*.partial`` file (no model extension), and nothing of that
    kind is offered by any node."""
    for path in sorted(p for folder in folders or (".",) for p in (loras_dir(server) / folder).rglob("*")):
        if not path.is_file():
            continue
        if path.name.startswith(TEMP_PREFIX):
            assert path.suffix == ".partial", f"a temporary file with a model extension: {path}"
        else:
            whole_lora(path)
    info = server.object_info()
    offered = {f"{node}.{name}": options for node, spec in info.items() for name, options in combo_inputs(spec)}
    assert {"LoraLoaderModelOnly.lora_name", "LoraTrainer_TrainLoRA.existing_lora"} <= offered.keys()
    listed = [f"{where}: {o}" for where, options in offered.items() for o in options
              if isinstance(o, str) and TEMP_PREFIX in o]
    assert not listed, f"temporary files offered: {listed}"


def combo_inputs(spec: dict) -> Iterator[tuple[str, list]]:
    """The (name, options) of a node's list inputs, in both ways ComfyUI declares them."""
    for group in ("required", "optional"):
        for name, declared in spec.get("input", {}).get(group, {}).items():
            if isinstance(declared[0], list):
                yield name, declared[0]
            elif len(declared) > 1 and isinstance(declared[1], dict) and isinstance(declared[1].get("options"), list):
                yield name, declared[1]["options"]


def act_when(server: harness.ComfyServer, workflow: dict, when: Callable[[Messages], bool], act: Callable[[], None],
             timeout: float = 120) -> tuple[str, Messages, Callable[[], None]]:
    """Queues ``workflow`` and calls ``act`` as soon as ``when`` holds for the websocket messages so far (checked on
    every message). Returns the prompt id, the (still growing) messages and the listener's stopper."""
    messages: Messages = []
    arrived = threading.Condition()

    def on_message(message: dict) -> None:
        with arrived:
            messages.append(message)
            arrived.notify_all()

    stop = server.listen(on_message)
    try:
        prompt_id = server.queue(workflow)
        deadline = time.monotonic() + timeout
        with arrived:
            while not arrived.wait_for(lambda: when(messages), timeout=1.0):
                assert time.monotonic() < deadline, f"the fault point never came: {[m['type'] for m in messages]}"
                assert server.process.poll() is None, server.log_text()[-4000:]
        act()
    except BaseException:
        stop()
        raise
    return prompt_id, messages, stop


def run_interrupted(server: harness.ComfyServer, workflow: dict, when: Callable[[Messages], bool],
                    then: Callable[[], None] = lambda: None) -> Messages:
    """Runs ``workflow``, POSTs /interrupt at the fault point, then calls ``then`` (e.g. lets a held save go on);
    checks the prompt ended as interrupted, not failed."""

    def interrupt() -> None:
        server.interrupt()
        then()

    prompt_id, messages, stop = act_when(server, workflow, when, interrupt)
    try:
        with pytest.raises(harness.PromptError) as err:
            server.wait(prompt_id, timeout=60)
    finally:
        stop(prompt_id)  # after the prompt's last websocket message
    kinds = [m[0] for m in err.value.payload["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, err.value
    return messages


def events(messages: Messages, kind: str) -> list[dict]:
    return [m["data"] for m in messages if m["type"] == kind]


def micro_steps_done(messages: Messages) -> int:
    """ComfyUI's progress bar of the training node ticks once per micro-step."""
    return max((p["value"] for p in events(messages, "progress") if p.get("node") == "train"), default=0)


def kept_on_cancel(server: harness.ComfyServer, messages: Messages) -> Path | None:
    """The LoRA the cancel saved, checked against the steps the run reported; None when training had not begun."""
    cancels = events(messages, "lora_trainer.cancelled")
    steps_done = len(events(messages, "lora_trainer.progress"))
    if not cancels:
        return None
    assert len(cancels) == 1 and cancels[0]["step"] == steps_done, (cancels, steps_done)
    if steps_done == 0:
        assert cancels[0]["file"] is None, "a cancel before any finished step keeps no (untrained) LoRA"
        return None
    path = loras_dir(server) / "cancelled" / cancels[0]["file"]
    whole_lora(path)
    assert steps_of(path) == steps_done
    return path


def train_and_save(server: harness.ComfyServer, prefix: str, **settings) -> Path:
    """A short training saved under ``prefix``: the "next prompt runs" check, and reference LoRAs."""
    settings = {"steps": 1, "seed": 99, **FAST, **settings}
    entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=prefix, **settings))
    path = loras_dir(server) / server.outputs(entry, "save")["text"][0]
    whole_lora(path)
    assert steps_of(path) == settings["steps"]
    return path


def no_temp_left(server: harness.ComfyServer, *folders: str) -> None:
    left = [p for f in folders for p in (loras_dir(server) / f).glob(TEMP_PREFIX + "*")]
    assert not left, f"temporary files left behind: {left}"


# -- /interrupt on the session's server ------------------------------------------------------------------------------
def test_interrupt_before_the_first_optimizer_step(server):
    # 50 micro-steps to the first optimizer step: the interrupt, sent when the node starts, lands long before it.
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="faults/early", steps=2,
                   grad_accumulation_steps=50, seed=1, **FAST)
    messages = run_interrupted(server, wf, lambda ms: any(e.get("node") == "train" for e in events(ms, "executing")))
    assert not events(messages, "lora_trainer.progress"), "an optimizer step finished after the interrupt"
    assert micro_steps_done(messages) < 50
    assert kept_on_cancel(server, messages) is None
    assert not list((loras_dir(server) / "faults").glob("early*")), "the interrupted prompt saved"
    no_temp_left(server, ".", "cancelled")
    check_loras_folder(server, "faults", "cancelled")
    train_and_save(server, "faults/after_early")


def test_interrupt_mid_accumulation_keeps_exactly_the_finished_steps(server):
    accumulation = 30
    settings = dict(grad_accumulation_steps=accumulation, seed=2, **FAST)
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="faults/mid", steps=3, **settings)
    # Interrupt 3 micro-steps into the second optimizer step: 27 micro-steps of slack before it could finish.
    messages = run_interrupted(server, wf, lambda ms: micro_steps_done(ms) >= accumulation + 3)
    assert [e["step"] for e in events(messages, "lora_trainer.progress")] == [1]
    kept = kept_on_cancel(server, messages)
    assert kept is not None, "the finished step was not kept"
    # The kept LoRA is exactly one full step: the half-accumulated gradients of step 2 were dropped, not applied.
    reference = train_and_save(server, "faults/one_step", **settings)
    kept_tensors, reference_tensors = whole_lora(kept), whole_lora(reference)
    assert kept_tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(kept_tensors[k], reference_tensors[k]) for k in kept_tensors)
    no_temp_left(server, ".", "cancelled", "faults")
    check_loras_folder(server, "faults", "cancelled")



# -- a server of this file's own, whose saves a test can hold, and that the tests may kill ---------------------------
class FaultyServer:
    """ComfyUI servers on one base directory, one at a time, whose saves a test can hold in progress (the test node
    pack's ``held_save``): a test interrupts or kills the current one and starts the next on the same files."""

    def __init__(self, base: Path):
        self.base = base
        self.saves = base / "held_saves"
        self.saves.mkdir()
        self.server = self._start()

    def _start(self) -> harness.ComfyServer:
        env = {"LORA_TRAINER_TEST_HOLD_SAVES": str(self.saves)}
        return harness.ComfyServer(self.base, extra_node_packs=(TEST_NODE_PACK,), env=env).start()

    @contextlib.contextmanager
    def holding_saves(self) -> Iterator[None]:
        (self.saves / "in_save").unlink(missing_ok=True)
        (self.saves / "hold").touch()
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        (self.saves / "hold").unlink(missing_ok=True)

    def in_save(self, _messages: Messages = ()) -> bool:
        return (self.saves / "in_save").exists()

    def held_file(self) -> Path:
        """The temporary file of the save that was held."""
        return Path((self.saves / "in_save").read_text())

    def kill(self) -> None:
        os.kill(self.server.process.pid, signal.SIGKILL)
        self.server.process.wait(30)

    def restart(self) -> harness.ComfyServer:
        self.server.stop()
        self.server = self._start()
        return self.server


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory) -> Iterator[FaultyServer]:
    base = tmp_path_factory.mktemp("faulty_base")
    harness.put_comfyui_on_path()
    import tiny_models

    tiny_models.write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3.safetensors")
    servers = FaultyServer(base)
    yield servers
    servers.server.stop()


@pytest.fixture
def faulty(faulty_server: FaultyServer, request) -> FaultyServer:
    # Every server of the base directory logs to the same file: a failing test gets the part of its own run.
    request.node._comfy_log = (faulty_server.server, len(faulty_server.server.log_text()))
    return faulty_server


def test_interrupt_during_save_lets_the_save_finish(faulty):
    server = faulty.server
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="faults/interrupted_save", steps=2, seed=3,
                   **FAST)
    # ComfyUI acts on an interrupt before the next node: one after the save makes the prompt end as interrupted.
    wf["after"] = {"class_type": "PreviewAny", "inputs": {"source": ["save", 0]}}
    with faulty.holding_saves():
        messages = run_interrupted(server, wf, faulty.in_save, then=faulty.release)
    assert [e["node_id"] for e in events(messages, "execution_interrupted")] == ["after"]
    assert not events(messages, "lora_trainer.cancelled")  # training had finished
    saved = list((loras_dir(server) / "faults").glob("interrupted_save_2_steps_*.safetensors"))
    assert len(saved) == 1 and steps_of(saved[0]) == 2, saved
    assert not faulty.held_file().exists()
    no_temp_left(server, "faults")
    check_loras_folder(server)
    train_and_save(server, "faults/after_interrupted_save")


def test_kill_during_training_then_restart(faulty):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="faults/killed_training", steps=100000, seed=4,
                   **FAST)
    _, _, stop = act_when(faulty.server, wf, lambda ms: len(events(ms, "lora_trainer.progress")) >= 2, faulty.kill)
    stop()
    server = faulty.restart()
    check_loras_folder(server)
    assert not list(loras_dir(server).rglob("killed_training*"))
    train_and_save(server, "faults/after_killed_training")
    check_loras_folder(server)


def test_kill_during_save_then_restart(faulty):
    wf = wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="faults/killed_save", steps=2, seed=5, **FAST)
    with faulty.holding_saves():
        _, _, stop = act_when(faulty.server, wf, faulty.in_save, faulty.kill)
        stop()
    assert faulty.held_file().exists(), "the kill should leave the temporary file behind"
    server = faulty.restart()
    check_loras_folder(server)  # the leftover is hidden: no loader offers it
    assert not list(loras_dir(server).rglob("killed_save*"))
    # The killed save never claimed its name: the next save of the same LoRA gets it.
    again = train_and_save(server, "faults/killed_save", steps=2, seed=5)
    assert again.name == "killed_save_2_steps_00001.safetensors"
    check_loras_folder(server)
