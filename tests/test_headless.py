"""The headless runner (headless/run.py) as a user runs it: a real subprocess on the ComfyUI under test, with the
session server's base directory (its models and its custom_nodes/, where the pack and the test node pack are
installed as the harness installs them)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import harness
import workflows as wfs
import pytest

pytestmark = pytest.mark.fast

RUN = harness.REPO / "headless" / "run.py"
FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False}
# The harness's device arguments for the server, so both sides compute alike (fp32 text encoders on the CPU).
DEVICE_ARGS = [] if os.environ.get("COMFYUI_DEVICE") == "gpu" else ["--cpu", "--fp32-text-enc"]
STEP = re.compile(r"^\s+\[train\] step\s+(\d+)/(\d+) \[[#.]+\] loss (\S+)", re.M)
SAVED = re.compile(r"\[save\] LoraTrainer_SaveLoRA: text: (\S+)")


def small_training(prefix: str, **settings) -> dict:
    return wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=2, size=8), save_prefix=prefix,
                     **{"steps": 2, **FAST, **settings})


def command(workflow_file: Path, base_dir: Path, *extra: str, as_module: bool = False) -> list[str]:
    runner = ["-m", "headless.run"] if as_module else [str(RUN)]
    return [sys.executable, *runner, str(workflow_file), "--comfyui", str(harness.comfyui_dir()),
            "--base-directory", str(base_dir), *extra, "--", *DEVICE_ARGS]


def run_headless(tmp_path: Path, base_dir: Path, workflow: dict, *extra: str, as_module: bool = False,
                 envelope: bool = False) -> subprocess.CompletedProcess:
    wf_file = tmp_path / "workflow_api.json"
    wf_file.write_text(json.dumps({"prompt": workflow} if envelope else workflow))
    # As a module it runs from the pack's folder (python -m headless.run); as a file from anywhere.
    cwd = harness.REPO if as_module else tmp_path
    return subprocess.run(command(wf_file, base_dir, *extra, as_module=as_module), cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def lora_digest(path: Path) -> str:
    """sha256 over the tensors (sorted keys, raw bytes): the file's metadata holds a date, so files never match."""
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(str(tensors[key].dtype).encode())
        h.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_headless_lora_is_bit_identical_to_the_servers(server, tmp_path):
    wf = small_training("headless/same_server", steps=3, seed=11)
    entry = server.run(wf)
    from_server = server.base_dir / "models" / "loras" / entry["outputs"]["save"]["text"][0]

    proc = run_headless(tmp_path, server.base_dir, wf, "--set", "save.prefix=headless/same_headless")
    assert proc.returncode == 0, explain(proc)
    saved = SAVED.search(proc.stdout)
    assert saved, explain(proc)
    from_headless = server.base_dir / "models" / "loras" / saved.group(1)
    assert from_headless.name.startswith("same_headless_3_steps") and from_headless.is_file()
    assert lora_digest(from_headless) == lora_digest(from_server)
    # One progress line per optimizer step, with the loss the server's UI output holds.
    steps = STEP.findall(proc.stdout)
    assert [(int(s), int(n)) for s, n, _ in steps] == [(1, 3), (2, 3), (3, 3)], explain(proc)
    assert [loss for *_, loss in steps] == [f"{x:.6f}" for x in entry["outputs"]["train"]["lora_trainer_loss"]]
    assert "done in" in proc.stdout


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_validation_errors_exit_2_one_line_each_naming_the_input(server, tmp_path):
    # Out of range, the wrong type, a file that is not there: ComfyUI refuses the workflow; each error is one line.
    proc = run_headless(tmp_path, server.base_dir, small_training("headless/invalid"),
                        "--set", "train.learning_rate=5", "--set", "train.steps=\"many\"",
                        "--set", "train.existing_lora=no_such_lora.safetensors")
    assert proc.returncode == 2, explain(proc)
    errors = error_lines(proc)
    assert len(errors) == 3, explain(proc)
    head = "error: [train] LoraTrainer_TrainLoRA: "
    assert f"{head}learning_rate: Value 5.0 bigger than max of 1.0" in errors, explain(proc)
    assert f"{head}steps: Failed to convert an input value to a INT value: many, invalid literal for int() with " \
           "base 10: 'many'" in errors, explain(proc)
    # the choices follow: the list itself, or "(list of length N)" once it is long (other tests' files in loras/)
    assert any(e.startswith(f"{head}existing_lora: Value not in list: 'no_such_lora.safetensors' not in ")
               for e in errors), explain(proc)
    assert "Traceback" not in proc.stderr and "Failed to validate prompt" not in proc.stderr, explain(proc)
    assert not STEP.search(proc.stdout), "nothing may run when validation fails"

    missing = tmp_path / "no_such_workflow.json"
    proc = subprocess.run(command(missing, server.base_dir), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.splitlines() == [f"error: cannot read {missing}: No such file or directory"], explain(proc)


def failing_run(server, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return run_headless(tmp_path, server.base_dir, small_training("headless/failing"),
                        "--set", "train.module_filter=no_such_layer", *extra)


MODULE_FILTER_ERROR = re.compile(r"^error: \[train\] LoraTrainer_TrainLoRA failed: ValueError: module_filter: "
                                 r"'no_such_layer' matches no .*$")


def test_node_error_exits_1_one_line_naming_the_node_and_the_input(server, tmp_path):
    proc = failing_run(server, tmp_path)
    assert proc.returncode == 1, explain(proc)
    assert len(error_lines(proc)) == 1 and MODULE_FILTER_ERROR.match(error_lines(proc)[0]), explain(proc)
    # ComfyUI's executor logs the exception with its traceback; the runner prints it once, the traceback under -v.
    assert "Traceback" not in proc.stderr and "!!! Exception" not in proc.stderr, explain(proc)
    assert "[save] LoraTrainer_SaveLoRA:" not in proc.stdout


@pytest.mark.slow("a second headless run of the failing workflow (~25 s); the report's -v is unit-tested in the fast "
                  "tier")
def test_verbose_adds_the_traceback_to_the_node_error(server, tmp_path):
    proc = failing_run(server, tmp_path, "-v")
    assert proc.returncode == 1, explain(proc)
    assert len(error_lines(proc)) == 1 and MODULE_FILTER_ERROR.match(error_lines(proc)[0]), explain(proc)
    after = proc.stderr.split(error_lines(proc)[0], 1)[1]
    assert after.lstrip("\n").startswith("Traceback (most recent call last):") and "adapter_set.py" in after, \
        explain(proc)
    assert "!!! Exception" not in proc.stderr, explain(proc)  # once: the runner's, not also the executor's log


def test_set_overrides_change_the_run_and_a_bad_one_is_an_error(server, tmp_path):
    # Also: run as a module from the pack's folder, and the workflow in a POST /prompt envelope.
    proc = run_headless(tmp_path, server.base_dir, small_training("headless/overridden"),
                        "--set", "train.steps=3", "--set", "save.prefix=headless/overridden3",
                        as_module=True, envelope=True)
    assert proc.returncode == 0, explain(proc)
    assert len(STEP.findall(proc.stdout)) == 3, explain(proc)
    assert SAVED.search(proc.stdout).group(1).startswith("headless/overridden3_3_steps"), explain(proc)

    typo = run_headless(tmp_path, server.base_dir, small_training("headless/typo"), "--set", "train.stepz=3")
    assert typo.returncode == 2, explain(typo)
    assert "--set train.stepz=3: node 'train' (LoraTrainer_TrainLoRA) has no input 'stepz'" in typo.stderr
    assert "steps" in typo.stderr  # the inputs it does have are listed

    unknown = run_headless(tmp_path, server.base_dir, small_training("headless/typo"), "--set", "trian.steps=3")
    assert unknown.returncode == 2, explain(unknown)
    assert "--set trian.steps=3: the workflow has no node 'trian'" in unknown.stderr


def test_ctrl_c_cancels_cleanly_keeping_the_finished_steps(server, tmp_path):
    wf_file = tmp_path / "long.json"
    wf_file.write_text(json.dumps(small_training("headless/long", steps=100000)))
    proc = subprocess.Popen(command(wf_file, server.base_dir), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=harness.ctrl_c_reaches_child)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\[train\] step\s+2/100000", line):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen) + out
    assert proc.returncode == 130, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    kept = re.search(r"cancelled after step (\d+): the LoRA so far is loras/(cancelled/\S+)", out)
    assert kept and int(kept.group(1)) >= 2, out[-3000:]
    assert (server.base_dir / "models" / "loras" / kept.group(2)).is_file()
    assert (f"interrupted in [train] LoraTrainer_TrainLoRA: stopped after step {kept.group(1)}; the LoRA so far is "
            f"loras/{kept.group(2)}") in err, err[-3000:]
