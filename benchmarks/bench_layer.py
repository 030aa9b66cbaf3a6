"""The floor of a LoRA adapter's cost on one linear layer, on this machine: what any unmerged adapter pays.

For layer widths d (d→d and d→4d, as in a transformer block) and token counts T it times, fp32 on the CPU:
  - bare: y = x·Wᵀ + b, forward + backward with gradients for x only (what the benchmark calls "the limit");
  - lora: the same plus our LoRA adapter (rank 8, scale 1) attached to an ordinary nn.Linear the way the node does
    it, gradients for x and the adapter;
  - ops: the adapter's own matrix products alone (2 forward, 4 backward, no autograd), i.e. the arithmetic and
    memory passes that cannot be skipped;
and prints the overhead of lora and of ops over bare. A rank-8 product reads a whole T×d activation (as the base
product does) but does 8/d of its arithmetic, so at small d the adapter costs memory passes, not FLOPs.

    .venv/bin/python benchmarks/bench_layer.py            # d = 128, 256, 512; T = 256, 1024 (~1 min)
    .venv/bin/python benchmarks/bench_layer.py --widths 64,1024 --tokens 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora.adapter_set import AdapterSet  # noqa: E402
from lora.injection import attached  # noqa: E402

RANK = 8


def best_of(fn, repeats: int = 5, min_s: float = 0.2) -> float:
    """Seconds per call: the best of ``repeats`` timed loops of at least ``min_s`` each."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= min_s:
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def layer_times(d_in: int, d_out: int, tokens: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(d_in, d_out).requires_grad_(False)
    root = nn.Sequential(layer)
    adapters = AdapterSet.create(root, "LoRA", RANK, 0.0, gen)
    with torch.no_grad():  # a trained adapter, not the zero "up" of a fresh one
        for p in adapters.parameters():
            p.normal_(0, 0.02, generator=gen)
    x = torch.randn(1, tokens, d_in, generator=gen).requires_grad_(True)
    grad = torch.randn(1, tokens, d_out, generator=gen)  # a dense upstream gradient, as a real loss gives

    def step():
        root(x).backward(grad)

    x2, g = x.detach().reshape(tokens, d_in), grad.reshape(tokens, d_out)
    down, up = torch.randn(RANK, d_in, generator=gen), torch.randn(d_out, RANK, generator=gen)

    def ops():
        h = x2 @ down.t()
        torch.addmm(g, h, up.t())
        gh = g @ up
        h.t() @ g
        gh.t() @ x2
        gh @ down

    t_bare = best_of(step)
    with attached(root, adapters):
        t_lora = best_of(step)
    return t_bare, t_lora, best_of(ops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="128,256,512")
    p.add_argument("--tokens", default="256,1024")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1, as bench_train.py)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    head = f"{'d_in→d_out':>11} {'T':>5} | {'bare µs':>8} {'lora µs':>8} {'ops µs':>7} | {'lora ovh':>8} {'ops ovh':>7}"
    print(f"LoRA rank {RANK} on one linear layer, fp32, {torch.get_num_threads()} thread(s); forward + backward; "
          f"best of 5\n{head}\n{'-' * len(head)}")
    for d in map(int, args.widths.split(",")):
        for d_in, d_out in ((d, d), (d, 4 * d)):
            for tokens in map(int, args.tokens.split(",")):
                bare, lora, ops = layer_times(d_in, d_out, tokens)
                print(f"{f'{d_in}→{d_out}':>11} {tokens:5d} | {bare * 1e6:8.1f} {lora * 1e6:8.1f} {ops * 1e6:7.1f} | "
                      f"{100 * (lora / bare - 1):+7.0f}% {100 * ops / bare:+6.0f}%", flush=True)


if __name__ == "__main__":
    main()
