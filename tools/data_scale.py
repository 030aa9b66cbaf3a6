"""One measurement of how Train LoRA scales with its data set: a tiny SD3 (MMDiT) whose text width is a real T5's
(4096), N synthetic items with captions of realistic size (512 tokens x 4096, fp32: 8 MB each), and the training call's
memory and time. Used by tests/test_data_memory.py and benchmarks/bench_data_scaling.py, one process per measurement
so that each starts from a clean heap. Prints one JSON line.

    python tools/data_scale.py --n 400 [--source memory|file] [--node ours|builtin] [--steps 6] [--latent-size 32]
    python tools/data_scale.py --n 40 --source file --load-only      (what loading the data set file costs)

--source memory: the inputs are ordinary tensors built in this process (as encoding nodes give them).
--source file:   a data set file of the pack's format (written once into --cache, then reused), loaded by Load
                 Training Data Set's reader: memory-mapped. Caption padding (all but the first 16 tokens) is zeros,
                 stored as holes of a sparse file, so 10,000 items need 80 GB of address space but little disk.

Figures: extra_anon_mb is the peak of the process's private memory (RssAnon, sampled every 2 ms) during the training
call over what it was before; extra_hwm_mb is the same from the kernel's exact peak (VmHWM, reset before the call),
which also counts file pages a memory-mapped data set brings in (the OS drops those under pressure); setup_s is the
call's time before its first step; s_per_step is the mean of the steps after the first; on a GPU, peak_vram_mb is
torch's peak of allocated device memory during the call.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import reset_peak_rss, status_mb  # noqa: E402

TOKENS, WIDTH, POOLED = 512, 4096, 64
WRITTEN_TOKENS = 16  # tokens of each caption with values; the rest is padding (zeros)
CHANNELS = 16


# ----------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak RssAnon (sampled) and VmHWM (exact, reset on entry) over a block, in MB above their values on entry."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s

    def __enter__(self) -> "PeakMemory":
        if not reset_peak_rss():  # VmHWM := current RSS
            raise OSError("cannot reset the peak RSS (/proc/self/clear_refs)")
        self.anon0, self.rss0 = status_mb("RssAnon"), status_mb("VmRSS")
        self.peak_anon, self._stop = self.anon0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, status_mb("RssAnon"))
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, status_mb("RssAnon"))
        self.extra_anon_mb = self.peak_anon - self.anon0
        self.extra_hwm_mb = status_mb("VmHWM") - self.rss0


# ------------------------------------------------------------------------------------------------------- data
def caption_head(i: int, seed: int = 0):
    import torch

    return torch.randn(1, WRITTEN_TOKENS, WIDTH, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))


def latent(i: int, size: int, seed: int = 0):
    import torch

    return torch.randn(CHANNELS, size, size, generator=torch.Generator().manual_seed(seed * 1_000_033 + i + 7))


def memory_inputs(n: int, size: int) -> tuple[list, list]:
    """N single-image LATENTs and N conditionings, each its own tensors, as ComfyUI's data-set nodes give them."""
    import torch

    latents, positive = [], []
    for i in range(n):
        cross = torch.zeros(1, TOKENS, WIDTH)
        cross[:, :WRITTEN_TOKENS] = caption_head(i)
        latents.append({"samples": latent(i, size).unsqueeze(0)})
        positive.append([[cross, {"pooled_output": cross[0, :WRITTEN_TOKENS].mean(0, keepdim=True)[:, :POOLED]}]])
    return latents, positive


def write_dataset_file(path: Path, n: int, size: int) -> Path:
    """A data set file of the pack's format (training/dataset_file.py) written item by item, padding as holes."""
    import numpy as np

    manifest = {"format": "lora_trainer.dataset/2", "count": n,
                "captions": [{"tensors": ["pooled_output"], "values": {}} for _ in range(n)]}
    entries, offset = {}, 0
    for i in range(n):
        for key, shape in ((f"latent.{i}", [CHANNELS, size, size]), (f"cond.{i}.cross_attn", [1, TOKENS, WIDTH]),
                           (f"cond.{i}.pooled_output", [1, POOLED])):
            nbytes = 4 * int(np.prod(shape))
            entries[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    header = json.dumps({"__metadata__": {"manifest": json.dumps(manifest)}, **entries}).encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    part = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for i in range(n):
            head = caption_head(i)
            for key, value in ((f"latent.{i}", latent(i, size)), (f"cond.{i}.cross_attn", head),
                               (f"cond.{i}.pooled_output", head[0].mean(0, keepdim=True)[:, :POOLED])):
                f.seek(start + entries[key]["data_offsets"][0])
                f.write(value.contiguous().numpy().tobytes())  # a caption's padding after its head stays a hole
        f.truncate(start + offset)
    part.rename(path)
    return path


def file_inputs(n: int, size: int, cache: Path) -> tuple[list, list]:
    """The data set through Load Training Data Set's own reader (memory-mapped)."""
    from importlib import import_module

    path = cache / f"scale_{n}_{size}.safetensors"
    if not path.is_file():
        write_dataset_file(path, n, size)
    dataset = import_module("lora_trainer.nodes.dataset")
    dataset.dataset_dir = lambda: cache  # the node's folder, pointed at the benchmark's cache
    return dataset.LoadTrainingDataset().load(path.name)


# ------------------------------------------------------------------------------------------------------ model
def tiny_t5_width_sd3(tmp: Path):
    import torch
    import comfy.sd
    import tiny_models

    path = tiny_models.write_model(tmp / "tiny_sd3_t5.safetensors",
                                   lambda s: tiny_models.tiny_sd3_state_dict(s, 2, context_dim=WIDTH, pooled_dim=POOLED))
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))


# ------------------------------------------------------------------------------------------------------- runs
def measure(node: str, model, latents: list, positive: list, steps: int) -> dict:
    import torch
    import bench_common as bc

    settings = {**(bc.ours_defaults() if node == "ours" else bc.builtin_defaults()), "steps": steps, "seed": 0}
    step_times: list[float] = []
    if node == "ours":
        events = __import__("importlib").import_module("lora_trainer.nodes.events")
        original = events.send
        events.send = lambda e, d: (step_times.append(time.perf_counter()) if e == "progress" else None,
                                    original(e, d))[1]
    else:
        import comfy_extras.nodes_train as nt

        class TimedBar(nt.ProgressBar):  # the built-in's progress bar moves once per step
            def update(self, value):
                step_times.append(time.perf_counter())
                return super().update(value)

        nt.ProgressBar = TimedBar
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakMemory() as peak:
        with torch.inference_mode():
            if node == "ours":
                from lora_trainer.nodes.train_lora import TrainLoRA

                TrainLoRA().train(model=[model], latents=latents, positive=positive,
                                  **{k: [v] for k, v in settings.items()})
            else:
                from comfy_extras.nodes_train import TrainLoraNode

                TrainLoraNode.execute(model=[model], latents=latents, positive=positive,
                                      **{k: [v] for k, v in settings.items()})
    total = time.perf_counter() - start
    per_step = (step_times[-1] - step_times[0]) / (len(step_times) - 1) if len(step_times) > 1 else float("nan")
    first_step = step_times[0] - per_step if step_times else float("nan")  # the first step's own start
    return {"extra_anon_mb": round(peak.extra_anon_mb, 1), "extra_hwm_mb": round(peak.extra_hwm_mb, 1),
            "setup_s": round(first_step - start, 3), "s_per_step": round(per_step, 4), "total_s": round(total, 2),
            "steps_seen": len(step_times),
            **({"peak_vram_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--source", choices=("memory", "file"), default="memory")
    parser.add_argument("--node", choices=("ours", "builtin"), default="ours")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "data-scale")
    parser.add_argument("--load-only", action="store_true",
                        help="with --source file: only load the data set, and report what loading took")
    args = parser.parse_args()

    import tempfile
    import bench_common as bc

    bc.setup_comfyui()
    bc.load_pack()
    tmp = Path(tempfile.mkdtemp())
    model = tiny_t5_width_sd3(tmp)
    if args.load_only:
        path = args.cache / f"scale_{args.n}_{args.latent_size}.safetensors"
        if not path.is_file():
            write_dataset_file(path, args.n, args.latent_size)
        with PeakMemory() as peak:
            latents, positive = file_inputs(args.n, args.latent_size, args.cache)
        print(json.dumps({"n": len(latents), "captions": len(positive), "file_mb": round(path.stat().st_size / 2**20, 1),
                          "load_hwm_mb": round(peak.extra_hwm_mb, 1), "load_anon_mb": round(peak.extra_anon_mb, 1)}))
        return
    t0 = time.perf_counter()
    if args.source == "memory":
        latents, positive = memory_inputs(args.n, args.latent_size)
    else:
        latents, positive = file_inputs(args.n, args.latent_size, args.cache)
    inputs_s = time.perf_counter() - t0
    result = {"n": args.n, "source": args.source, "node": args.node, "inputs_s": round(inputs_s, 2),
              "inputs_anon_mb": round(status_mb("RssAnon"), 1), **measure(args.node, model, latents, positive,
                                                                            args.steps)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
