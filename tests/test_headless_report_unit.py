"""What the headless runner prints (headless/report.py), without ComfyUI: an error is one line naming the node and the
input, with the traceback only under -v; after a cancel every rank says after which step it stopped, and only the
rank that writes files says what was saved. Also the log filter and the stop signals of headless/run.py."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from headless.report import QuietLog, Report

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parent.parent
PROMPT = {"train": {"class_type": "LoraTrainer_TrainLoRA", "inputs": {}}}
NODE_ERROR = {  # ComfyUI's execution_error message, as the executor sends it
    "node_id": "train", "node_type": "LoraTrainer_TrainLoRA", "exception_type": "builtins.ValueError",
    "exception_message": "module_filter: 'nope' matches no linear or convolution layer of this model\n",
    "traceback": ['  File "nodes/train_lora.py", line 109, in train\n    return self._train(...)\n',
                  '  File "lora/adapter_set.py", line 72, in create\n    raise ValueError(...)\n']}


def report(verbose: bool = False, rank: int | None = None) -> tuple[Report, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    r = Report(out, err, verbose=verbose, tty=False, label="" if rank is None else f"rank {rank}: ")
    r.prompt = PROMPT
    return r, out, err


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# -- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [None, 1])
def test_a_node_error_is_one_line_naming_the_input_and_no_traceback(rank):
    r, out, err = report(rank=rank)
    r.failed(NODE_ERROR)
    label = "" if rank is None else "rank 1: "
    assert lines(err) == [f"{label}error: [train] LoraTrainer_TrainLoRA failed: ValueError: module_filter: 'nope' "
                          "matches no linear or convolution layer of this model"]
    assert out.getvalue() == ""


def test_verbose_adds_the_traceback_to_a_node_error():
    r, _, err = report(verbose=True, rank=0)
    r.failed(NODE_ERROR)
    got = lines(err)
    assert got[0].startswith("rank 0: error: [train] LoraTrainer_TrainLoRA failed: ValueError: module_filter:")
    assert got[1] == "rank 0: Traceback (most recent call last):"
    assert any("adapter_set.py" in line for line in got[2:]) and all(line.startswith("rank 0: ") for line in got)


def test_a_message_with_tips_after_a_blank_line_stays_one_line():
    r, _, err = report()
    r.failed({**NODE_ERROR, "exception_type": "torch.OutOfMemoryError",
              "exception_message": "CUDA out of memory.\n\nTIPS: lower batch_size."})
    assert lines(err) == ["error: [train] LoraTrainer_TrainLoRA failed: OutOfMemoryError: CUDA out of memory. "
                          "TIPS: lower batch_size."]


def test_each_validation_error_is_one_line_with_the_input_first():
    r, _, err = report()
    errors = [  # ComfyUI 0.3.75's validation errors: out of range, wrong type, a file that is not there
        {"message": "Value 5.0 bigger than max of 1.0", "details": "learning_rate",
         "extra_info": {"input_name": "learning_rate"}},
        {"message": "Failed to convert an input value to a INT value", "details": "steps, abc, invalid literal",
         "extra_info": {"input_name": "steps"}},
        {"message": "Value not in list", "details": "existing_lora: 'gone.safetensors' not in ['[None]']",
         "extra_info": {"input_name": "existing_lora"}},
    ]
    r.validation_failed({"message": "Prompt outputs failed validation"},
                        {"train": {"errors": errors, "class_type": "LoraTrainer_TrainLoRA"}})
    assert lines(err) == [
        "error: [train] LoraTrainer_TrainLoRA: learning_rate: Value 5.0 bigger than max of 1.0",
        "error: [train] LoraTrainer_TrainLoRA: steps: Failed to convert an input value to a INT value: abc, "
        "invalid literal",
        "error: [train] LoraTrainer_TrainLoRA: existing_lora: Value not in list: 'gone.safetensors' not in ['[None]']",
    ]


def test_a_long_list_of_choices_is_cut_unless_verbose():
    files = str([f"lora_{i:04d}.safetensors" for i in range(500)])
    error = {"message": "Value not in list", "details": f"existing_lora: 'gone' not in {files}",
             "extra_info": {"input_name": "existing_lora"}}
    for verbose, longest in ((False, 500), (True, 10 ** 6)):
        r, _, err = report(verbose=verbose)
        r.validation_failed(None, {"train": {"errors": [error], "class_type": "LoraTrainer_TrainLoRA"}})
        assert len(lines(err)) == 1 and len(lines(err)[0]) < longest
        assert ("-v shows all" in err.getvalue()) is not verbose


def test_a_workflow_level_error_is_one_line():
    r, _, err = report()
    r.validation_failed({"message": "Cannot execute because node Nope does not exist.", "details": "Node ID '#3'"},
                        {})
    assert lines(err) == ["error: ComfyUI rejected the workflow: Cannot execute because node Nope does not exist.: "
                          "Node ID '#3'"]


def test_a_crash_is_one_line_and_its_traceback_only_verbose():
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: boom\n'
    r, _, err = report()
    r.crashed("ComfyUI's executor raised RuntimeError: boom", trace)
    assert lines(err) == ["error: ComfyUI's executor raised RuntimeError: boom (-v shows the traceback)"]
    r, _, err = report(verbose=True)
    r.crashed("ComfyUI's executor raised RuntimeError: boom", trace)
    assert lines(err)[1:] == trace.rstrip().splitlines()


# -- cancel ---------------------------------------------------------------------------------------------------------
INTERRUPTED = {"node_id": "train", "node_type": "LoraTrainer_TrainLoRA"}
SAVE_CLAIMS = ("loras/", "nothing saved", "no step", "none kept", "saved")


def cancel(r: Report, **data) -> None:
    r.on_message("lora_trainer.cancelled", {"node": "train", "step": 5, **data})
    r.interrupted(INTERRUPTED)


def test_rank_0_reports_the_step_and_the_file_it_kept():
    r, out, err = report(rank=0)
    cancel(r, file="cancelled_step5_00001.safetensors", writes=True)
    assert lines(out) == ["  [train] LoraTrainer_TrainLoRA cancelled after step 5: the LoRA so far is "
                          "loras/cancelled/cancelled_step5_00001.safetensors"]
    assert lines(err) == ["rank 0: interrupted in [train] LoraTrainer_TrainLoRA: stopped after step 5; the LoRA so far "
                          "is loras/cancelled/cancelled_step5_00001.safetensors"]


def test_a_rank_that_writes_no_file_reports_the_step_and_neither_claims_nor_denies_a_save():
    r, out, err = report(rank=1)
    cancel(r, file=None, writes=False)
    assert lines(err) == ["rank 1: interrupted in [train] LoraTrainer_TrainLoRA: stopped after step 5; "
                          "rank 0 writes the files"]
    assert not any(claim in err.getvalue() for claim in SAVE_CLAIMS)
    assert out.getvalue() == ""


def test_a_cancel_before_the_first_step_says_nothing_was_saved():
    r, out, err = report()
    cancel(r, step=0, file=None, writes=True)
    assert lines(err) == ["interrupted in [train] LoraTrainer_TrainLoRA: stopped after step 0; no step of this run "
                          "finished, nothing saved"]


def test_an_interrupt_outside_training_names_only_the_node():
    r, _, err = report(rank=1)
    r.interrupted({"node_id": "save", "node_type": "LoraTrainer_SaveLoRA"})
    assert lines(err) == ["rank 1: interrupted in [save] LoraTrainer_SaveLoRA"]


# -- the log --------------------------------------------------------------------------------------------------------
def record(message: str, level: int = logging.WARNING, path: str = "/x/other.py") -> logging.LogRecord:
    return logging.LogRecord("root", level, path, 1, message, None, None)


def test_the_executors_own_error_log_is_dropped_and_bare_tracebacks_only_verbose(tmp_path):
    executor = tmp_path / "execution.py"
    executor.write_text("")
    for verbose in (False, True):
        quiet = QuietLog(verbose)
        quiet.executor_file = str(executor.resolve())
        assert not quiet.filter(record("!!! Exception during processing !!! boom", logging.ERROR, str(executor)))
        assert not quiet.filter(record("Failed to validate prompt for output save:", logging.ERROR, str(executor)))
        assert quiet.filter(record("WARNING: x", logging.WARNING, str(executor)))  # not an error it repeats
        assert quiet.filter(record("Cannot import x module for custom nodes: No module named 'y'"))
        assert quiet.filter(record("Traceback (most recent call last):\n  File ...")) is verbose


# -- stop signals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signal_name, how, code", [("SIGINT", "Ctrl-C", 130), ("SIGTERM", "SIGTERM", 143)])
def test_sigint_and_sigterm_both_become_a_cancel(signal_name, how, code):
    """In a child process: headless.run changes sys.path when imported, and a signal handler is process-wide."""
    script = ("import os, signal, sys\n"
              f"sys.path.insert(0, {str(REPO)!r})\n"
              "from headless.run import StopSignals\n"
              "stop = StopSignals()\n"
              "stop.install()\n"
              "try:\n"
              f"    os.kill(os.getpid(), signal.{signal_name})\n"
              "    signal.pause()\n"
              "except KeyboardInterrupt:\n"
              "    print(stop.name, stop.exit_code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=harness.ctrl_c_reaches_child)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [how, str(code)]
