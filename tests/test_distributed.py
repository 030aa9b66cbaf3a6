"""The headless runner under torchrun (CPU, gloo, 2 processes) on the session server's base directory: the same
workflow trains the LoRA of one process with twice the batch, only rank 0 writes, a failing rank stops the job with
its error and no file, and Ctrl-C or SIGTERM stops every rank keeping what was trained once, each rank saying what
it knows."""
from __future__ import annotations

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

pytestmark = pytest.mark.slow("torchrun starts 2 ranks of the headless runner, each loading ComfyUI, per test (~20-35 s each); the fast tier has the torchrun unit test")

RUN = harness.REPO / "headless" / "run.py"
# SGD: its update is linear in the gradient, so the comparison sees the gradients' agreement (float rounding of
# different batch splits, ~1e-7). Adam divides by √v: on entries whose gradient is ~0 it turns such rounding into
# steps of ±lr, so two splits of one batch differ by ~1e-3 after a few steps whatever the parallelism.
FAST = {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False, "learning_rate": 0.01,
        "optimizer": "SGD"}
SAVED = re.compile(r"\[save\] LoraTrainer_SaveLoRA: text: (\S+)")


def job(tmp_path: Path, base_dir: Path, workflow: dict, procs: int) -> list[str]:
    wf_file = tmp_path / f"workflow_{procs}.json"
    wf_file.write_text(json.dumps(workflow))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return [*launcher, str(RUN), str(wf_file), "--comfyui", str(harness.comfyui_dir()), "--base-directory",
            str(base_dir), "--", "--cpu", "--fp32-text-enc"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(tmp_path: Path, base_dir: Path, workflow: dict, procs: int) -> subprocess.CompletedProcess:
    return subprocess.run(job(tmp_path, base_dir, workflow, procs), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=env())


def training(prefix: str, batch_size: int, **settings) -> dict:
    return wfs.train(wfs.sd3_model(), wfs.test_data("sd3", count=4, size=8), save_prefix=prefix,
                     batch_size=batch_size, **{"steps": 3, "seed": 5, **FAST, **settings})


def saved(base_dir: Path, proc: subprocess.CompletedProcess) -> dict[str, torch.Tensor]:
    names = SAVED.findall(proc.stdout)
    assert len(names) == 1, f"one save report (rank 0's)\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return load_file(str(base_dir / "models" / "loras" / names[0]))


def test_two_ranks_of_batch_b_give_the_lora_of_one_process_of_batch_2b(server, tmp_path):
    base = server.base_dir
    one = run(tmp_path, base, training("ddp/one", batch_size=2), procs=1)
    assert one.returncode == 0, one.stderr[-4000:]
    two = run(tmp_path, base, training("ddp/two", batch_size=1), procs=2)
    assert two.returncode == 0, two.stderr[-6000:]
    a, b = saved(base, one), saved(base, two)
    assert a.keys() == b.keys()
    worst = max(float((b[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    print(f"largest relative difference, 2 ranks x batch 1 vs 1 process x batch 2: {worst:.3g}")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(list((base / "models" / "loras" / "ddp").glob("two_*.safetensors"))) == 1  # rank 0 wrote, once
    assert "[train] step" in two.stdout and two.stdout.count("[train] step    3/3") <= 1


def test_a_failing_rank_stops_the_job_with_its_error_and_leaves_no_file(server, tmp_path):
    wf = training("ddp/failing", batch_size=1, steps=50)
    wf["fail"] = {"class_type": "LoraTrainerTest_FailOnRank", "inputs": {"model": ["model", 0], "rank": 1}}
    wf["train"]["inputs"]["model"] = ["fail", 0]
    proc = run(tmp_path, server.base_dir, wf, procs=2)  # rank 0 waits in the first all-reduce until torchrun stops it
    assert proc.returncode != 0
    assert "rank 1: error: [fail] LoraTrainerTest_FailOnRank failed: RuntimeError: injected failure on rank 1" \
        in proc.stderr, proc.stderr[-4000:]
    # One line, labelled; the executor's own log of it (with the node's traceback) is left out without -v.
    assert len([line for line in proc.stderr.splitlines() if line.startswith("rank 1: error:")]) == 1
    assert "!!! Exception during processing" not in proc.stderr and "fail_on_rank.py" not in proc.stderr
    loras = server.base_dir / "models" / "loras"
    assert not list((loras / "ddp").glob("failing_*")) and not list(loras.rglob(".tmp_*"))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stop_ends_every_rank_at_one_step_and_each_rank_says_what_it_knows(server, tmp_path, stop):
    """Ctrl-C, or SIGTERM (a job scheduler's stop): torchrun passes it on to every rank, each cancels the training at
    the same step; rank 0 keeps the LoRA once and names it, rank 1 names the step and leaves the file to rank 0."""
    proc = subprocess.Popen(job(tmp_path, server.base_dir, training("ddp/long", batch_size=1, steps=100000), 2),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    before = set((server.base_dir / "models" / "loras" / "cancelled").glob("*.safetensors"))
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"\[train\] step\s+2/100000", line):
                os.killpg(proc.pid, stop)  # Ctrl-C in a terminal signals every process of the job; torchrun's group
                break
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(seen) + out
    explain = f"{out[-3000:]}\n{err[-3000:]}"
    assert proc.returncode != 0, explain
    kept = set((server.base_dir / "models" / "loras" / "cancelled").glob("*.safetensors")) - before
    assert len(kept) == 1, f"{kept}\n{explain}"
    name = kept.pop().name
    rank0 = re.search(r"^rank 0: interrupted in \[train\] LoraTrainer_TrainLoRA: stopped after step (\d+); the LoRA so "
                      r"far is loras/cancelled/(\S+)$", err, re.M)
    assert rank0 and int(rank0.group(1)) >= 2 and rank0.group(2) == name, explain
    rank1 = [line for line in err.splitlines() if line.startswith("rank 1: ")]
    assert f"rank 1: interrupted in [train] LoraTrainer_TrainLoRA: stopped after step {rank0.group(1)}; rank 0 " \
           "writes the files" in rank1, explain
    assert not any(claim in line for line in rank1 for claim in ("loras/", "nothing saved", "no step", "none kept")), \
        explain
    how = "Ctrl-C" if stop == signal.SIGINT else "SIGTERM"
    assert f"rank 1: interrupting ({how} again to quit at once) ..." in rank1, explain
