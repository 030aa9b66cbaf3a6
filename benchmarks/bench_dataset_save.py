"""Issue 25's benchmark: what Save Training Data Set and Load Training Data Set cost in memory against the data
set's size, N = 10 … 10,000 items of 16 x 32 x 32 latents with distinct 256 x 4096 fp16 captions (2 MB an item).

Each row is its own process (tools/dataset_save_scale.py), so every measurement starts from a clean heap. The save
must stay flat in N (within ~1.5x the largest item); N = 10,000 (a 20 GB set, written in 2 GB shards) runs when the
disk has room for it.

    .venv/bin/python benchmarks/bench_dataset_save.py                  # N = 10, 100, 1000, 10000 if the disk allows
    .venv/bin/python benchmarks/bench_dataset_save.py --ns 10,100,1000 --dir /tmp/sets
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "dataset_save_scale.py"
ITEM_MB = (16 * 32 * 32 * 4 + 256 * 4096 * 2) / 2**20  # one latent (fp32 in the file) and one caption


def measure(n: int, folder: Path, shard_gb: float) -> dict:
    done = subprocess.run([sys.executable, str(TOOL), "--n", str(n), "--dir", str(folder), "--shard-gb",
                           str(shard_gb)], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"n": n, "error": (done.stderr.strip().splitlines() or ["killed"])[-1][-200:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="10,100,1000,10000")
    parser.add_argument("--dir", type=Path, default=REPO / ".cache" / "dataset-save-bench")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    print(f"item: {ITEM_MB:.2f} MB (latent + caption); extra = peak over the process's memory before the call")
    print("|      N | file MB | files | save s | save extra anon MB | save extra RSS MB | load extra anon MB "
          "| load extra RSS MB |")
    print("|-------:|--------:|------:|-------:|-------------------:|------------------:|-------------------:"
          "|------------------:|")
    for n in (int(x) for x in args.ns.split(",")):
        args.dir.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(args.dir).free / 2**20
        if n * ITEM_MB * 1.1 > free_mb:
            print(f"| {n:>6} | skipped: the set needs {n * ITEM_MB:,.0f} MB of disk, {free_mb:,.0f} MB free |")
            continue
        r = measure(n, args.dir / f"n{n}", args.shard_gb)
        rows.append(r)
        if "error" in r:
            print(f"| {n:>6} | error: {r['error']} |")
            continue
        print(f"| {n:>6} | {r['file_mb']:>7.0f} | {r['files']:>5} | {r['save_s']:>6.1f} | {r['save_anon_mb']:>18.1f} "
              f"| {r['save_hwm_mb']:>17.1f} | {r['load_anon_mb']:>18.1f} | {r['load_hwm_mb']:>17.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
