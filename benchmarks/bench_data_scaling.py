"""Issue 14's scaling benchmark: Train LoRA (at its defaults) on N = 10 … 10,000 synthetic items with captions of
realistic size (512 tokens × 4096, fp32: 8 MB each) on a tiny SD3 with a T5-wide text input, against N:
the training call's extra memory over its inputs, its set-up time, and its steady-state seconds per step; and
ComfyUI's built-in TrainLoraNode on the same N, as far as this machine's RAM lets it run.

Each figure comes from its own process (tools/data_scale.py), so every measurement starts from a clean heap.

    .venv/bin/python benchmarks/bench_data_scaling.py                      # N = 10, 100, 1000, 10000 (~15 min)
    .venv/bin/python benchmarks/bench_data_scaling.py --ns 10,100 --steps 4 --json out.json

Our node reads the data set as Load Training Data Set gives it (a memory-mapped file of the pack's format, in
.cache/data-scale/; 10,000 items are 80 GB of address space, but their padding is stored sparse, so little disk);
the built-in gets the same LATENT and CONDITIONING lists. "extra" is the kernel's exact peak RSS (VmHWM, which
counts mapped file pages too) during the call over the RSS before it, and "extra anon" its private memory (RssAnon);
on a GPU a last column gives the peak VRAM torch allocated during the call (it must not grow with N).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "data_scale.py"


def measure(n: int, node: str, steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, str(TOOL), "--n", str(n), "--source", "file", "--node", node,
                           "--steps", str(steps)], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        return {"n": n, "node": node, "error": (done.stderr.strip().splitlines() or ["killed"])[-1][-200:],
                "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['n']:>6} | {r['node']:<8} | {r.get('error', '')} |"
    if "skipped" in r:
        return f"| {r['n']:>6} | {r['node']:<8} | not run: {r['skipped']} |"
    vram = f" {r['peak_vram_mb']:>9.0f} |" if "peak_vram_mb" in r else ""
    return (f"| {r['n']:>6} | {r['node']:<8} | {r['extra_hwm_mb']:>9.0f} | {r['extra_anon_mb']:>10.0f} | "
            f"{r['setup_s']:>8.2f} | {r['s_per_step']:>7.3f} |{vram}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="10,100,1000,10000")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1: the neighbours' load "
                                                               "does not leak into the timings on a small machine)")
    parser.add_argument("--builtin", choices=("auto", "never"), default="auto",
                        help="auto: run the built-in node where its measured memory per item says it fits in RAM")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    print("|      N | node     | extra MB | extra anon | setup s | s/step |")
    print("|-------:|----------|---------:|-----------:|--------:|-------:|")
    results, per_item_mb = [], None
    for n in ns:
        ours = measure(n, "ours", args.steps, args.threads)
        results.append(ours)
        print(row(ours), flush=True)
        if args.builtin == "never":
            continue
        if per_item_mb is not None and n * per_item_mb * 1.2 > available_mb():
            builtin = {"n": n, "node": "built-in", "skipped": f"its extra memory grows {per_item_mb:.1f} MB per item "
                                                                f"(measured below), {n * per_item_mb / 1024:.0f} GB "
                                                                f"here; {available_mb() / 1024:.0f} GB available"}
        else:
            builtin = {**measure(n, "builtin", args.steps, args.threads), "node": "built-in"}
            if "error" not in builtin and n >= 100:
                first = next(r for r in results if r["node"] == "built-in" and "extra_hwm_mb" in r)
                per_item_mb = (builtin["extra_hwm_mb"] - first["extra_hwm_mb"]) / (n - first["n"])
        results.append(builtin)
        print(row(builtin), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "threads": args.threads, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
