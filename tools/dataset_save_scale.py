"""One measurement of what saving and loading a training data set costs in memory: N items of 16 x 32 x 32 latents
with distinct captions of 256 tokens x 4096, fp16 (2 MB each: N = 1,000 is a 2 GB file), saved by Save Training
Data Set into a folder, then loaded by Load Training Data Set. Used by benchmarks/bench_dataset_save.py and
tests/test_data_memory.py, one process per measurement so that each starts from a clean heap. Prints one JSON line.

    python tools/dataset_save_scale.py --n 1000 --dir /tmp/sets [--shard-gb 2.0] [--keep]

The captions are N distinct entries (each stored in the file) whose tensors are views of a pool of 16, so that the
inputs themselves fit in RAM at any N, as encoding nodes give them (one tensor per caption) they would not at 10,000.
Figures: save_anon_mb is the peak of the process's private memory (RssAnon, sampled every 2 ms) during the save over
what it was before; save_hwm_mb the kernel's exact peak RSS (VmHWM) over the RSS before; load_* the same for the load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

from data_scale import PeakMemory  # noqa: E402

TOKENS, WIDTH, POOL = 256, 4096, 16
CHANNELS, SIZE = 16, 32


def inputs(n: int) -> tuple[list, list]:
    """N single-image LATENTs and N distinct CONDITIONING entries (a list each, as ComfyUI's data-set nodes give)."""
    import torch

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, 1, TOKENS, WIDTH, generator=g).half()
    latents = [{"samples": torch.randn(1, CHANNELS, SIZE, SIZE, generator=g)} for _ in range(n)]
    positive = [[[pool[i % POOL], {"pooled_output": None}]] for i in range(n)]
    return latents, positive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True, help="the data set folder (emptied first)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    args = parser.parse_args()

    import torch
    import bench_common as bc

    bc.setup_comfyui()
    bc.load_pack()
    from importlib import import_module

    dataset = import_module("lora_trainer.nodes.dataset")
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    dataset.dataset_dir = lambda: args.dir  # the node's folder, pointed at the benchmark's
    latents, positive = inputs(args.n)
    inputs_anon = bc.status_mb("RssAnon")
    start = time.perf_counter()
    with PeakMemory() as save_peak, torch.inference_mode():
        saved = dataset.SaveTrainingDataset().save(latents, positive, ["set"], [args.shard_gb])["result"][0]
    save_s = time.perf_counter() - start
    files = sorted(p for p in args.dir.rglob("*.safetensors"))
    file_mb = sum(p.stat().st_size for p in files) / 2**20
    del latents, positive
    with PeakMemory() as load_peak:
        loaded_latents, _ = dataset.LoadTrainingDataset().load(saved)
    print(json.dumps({
        "n": args.n, "saved": saved, "files": len(files), "file_mb": round(file_mb, 1),
        "inputs_anon_mb": round(inputs_anon, 1), "save_s": round(save_s, 2),
        "save_anon_mb": round(save_peak.extra_anon_mb, 1), "save_hwm_mb": round(save_peak.extra_hwm_mb, 1),
        "load_anon_mb": round(load_peak.extra_anon_mb, 1), "load_hwm_mb": round(load_peak.extra_hwm_mb, 1),
        "loaded": len(loaded_latents)}), flush=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
