"""Data-parallel training (training/distributed.py) through torchrun itself: 2 CPU processes over gloo with batch B
give the LoRA (and loss history) of one process with batch 2B, same seed. No ComfyUI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.distributed import Ranks  # noqa: E402
from tests.tiers import fast_cases  # noqa: E402

pytestmark = pytest.mark.slow("each case starts torchrun with 2 ranks (~17 s); one case is fast")

WORKER = Path(__file__).resolve().parent / "workers" / "distributed_toy.py"


def run(out: Path, procs: int, batch: int, steps: int = 6, accumulation: int = 1) -> dict[str, torch.Tensor]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(WORKER), str(out), str(batch), str(steps), str(accumulation)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return safetensors.torch.load_file(str(out))


@pytest.mark.parametrize("batch, accumulation", fast_cases([(1, 1), (2, 2)], (2, 2)))
def test_two_ranks_of_batch_b_train_what_one_process_of_batch_2b_trains(tmp_path, batch, accumulation):
    one = run(tmp_path / "one.safetensors", 1, 2 * batch, accumulation=accumulation)
    two = run(tmp_path / "two.safetensors", 2, batch, accumulation=accumulation)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # and the ranks really shared the work: one process of batch B alone trains something else
    alone = run(tmp_path / "alone.safetensors", 1, batch, accumulation=accumulation)
    assert any(not torch.allclose(alone[k], one[k], rtol=1e-4, atol=1e-5) for k in one if k != "losses")


@pytest.mark.fast
@pytest.mark.parametrize("rows, world", [(4, 2), (3, 2), (1, 2), (5, 3), (7, 1)])
def test_every_row_of_a_global_batch_goes_to_exactly_one_rank(rows, world):
    parts = [list(range(rows))[Ranks(r, world).share(rows)] for r in range(world)]
    assert sum(parts, []) == list(range(rows))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
