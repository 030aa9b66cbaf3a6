"""Data-parallel scaling on the CPU (gloo): the training loop with a LoRA on an MLP (width and depth chosen so a step
is compute-bound, not overhead), run by torchrun with 1 and with N processes of the same per-rank batch.

    .venv/bin/python benchmarks/bench_distributed.py                 # 1 vs 2 processes, batch 4 per rank, 30 steps
    .venv/bin/python benchmarks/bench_distributed.py --procs 1,2 --batch 8 --width 768 --steps 40

Printed per process count: seconds per optimizer step, samples per second (global batch / step time), the speed-up
in samples/s over one process, and the share of the step spent in the gradient all-reduce (timed around
``Ranks.sum_gradients_and``, the one collective per step). Each process runs 1 torch thread, so N processes use N
cores: on a machine with fewer free cores than processes the figures measure the neighbours."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class _Eps:
    """x_t = x0 + σ·ε, x̂0 = x_t − σ·out (what training.objectives needs of a schedule)."""

    sigmas = torch.tensor((0.5, 1.0, 2.0, 4.0))

    @staticmethod
    def _b(sigma, like):
        return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like)

    def noisy(self, sigma, noise, x0):
        return x0 + self._b(sigma, x0) * noise

    def output_scale(self, sigma, like):
        return -self._b(sigma, like)


def worker(args: argparse.Namespace) -> None:
    from lora.adapter_set import AdapterSet
    from lora.injection import attached
    from training import data, loop
    from training.distributed import Ranks

    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    ranks = Ranks.current()
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.depth)]).requires_grad_(False)
    adapters = AdapterSet.create(net, "LoRA", 8, 0.0, gen)
    samples = [torch.randn(args.tokens, args.width, generator=gen) for _ in range(64)]
    schedule = _Eps()

    def denoise(x_t, sigma, ids):
        return x_t - schedule._b(sigma, x_t) * net(x_t)

    communication = [0.0]
    original = Ranks.sum_gradients_and

    def timed(self, grads, loss, stop=False):
        start = time.perf_counter()
        try:
            return original(self, grads, loss, stop)
        finally:
            communication[0] += time.perf_counter() - start

    Ranks.sum_gradients_and = timed
    settings = loop.Settings(steps=args.steps, batch_size=args.batch, learning_rate=1e-4)
    with attached(net, adapters):
        loop.train(adapters.trainable(), data.group_by_shape(samples), denoise, schedule,
                   loop.Settings(steps=2, batch_size=args.batch), torch.Generator().manual_seed(1), ranks=ranks)  # warm-up
        communication[0] = 0.0
        start = time.perf_counter()
        loop.train(adapters.trainable(), data.group_by_shape(samples), denoise, schedule, settings, gen, ranks=ranks)
        elapsed = time.perf_counter() - start
    if ranks.main:
        Path(args.out).write_text(json.dumps({"elapsed": elapsed, "communication": communication[0],
                                              "world": ranks.world}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together (see headless/ranks.py leave)
        torch.distributed.destroy_process_group()


def launch(procs: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   __file__, "--worker", "--out", str(out), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--width", str(args.width), "--depth", str(args.depth), "--tokens", str(args.tokens)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--batch", type=int, default=4, help="rows per rank per micro-batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="rows of one sample (its 'sequence length')")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"MLP {args.depth} x {args.width}, {args.tokens} tokens per sample, LoRA rank 8, batch {args.batch} per rank, "
          f"{args.steps} steps, 1 thread per process, gloo")
    print(f"{'procs':>5} {'s/step':>8} {'samples/s':>10} {'speed-up':>9} {'all-reduce':>11}")
    base = None
    for procs in (int(p) for p in args.procs.split(",")):
        r = launch(procs, args)
        per_step = r["elapsed"] / args.steps
        throughput = args.batch * procs / per_step
        base = base or throughput
        print(f"{procs:>5} {per_step:>8.4f} {throughput:>10.1f} {throughput / base:>8.2f}x "
              f"{100 * r['communication'] / r['elapsed']:>10.1f}%")


if __name__ == "__main__":
    main()
