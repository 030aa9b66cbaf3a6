"""A worker for tests/test_distributed_unit.py, run by torchrun (or alone): trains the toy problem of
test_training_unit.py with loop.train over the default process group, and rank 0 writes the adapter weights."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import test_training_unit as toy  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import loop  # noqa: E402
from training.distributed import Ranks  # noqa: E402


def main(out: str, batch_size: int, steps: int, accumulation: int) -> None:
    if "WORLD_SIZE" in __import__("os").environ:
        torch.distributed.init_process_group("gloo")
    ranks = Ranks.current()
    net, aset, groups, sched, denoise = toy.toy_problem(0)
    settings = loop.Settings(steps=steps, batch_size=batch_size, grad_accumulation_steps=accumulation,
                             learning_rate=0.05, optimizer="AdamW")
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched, settings, toy.gen(0), ranks=ranks)
    if ranks.main:
        import safetensors.torch

        tensors = {name: p.detach().contiguous() for name, p in aset.named_parameters()}
        tensors["losses"] = torch.tensor(result.losses)
        safetensors.torch.save_file(tensors, out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together (see headless/ranks.py leave)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    sys.stdout.flush()
    __import__("os")._exit(0)  # no interpreter teardown: gloo's threads can abort it (see headless/ranks.py exit_now)
