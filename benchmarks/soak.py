"""Soak benchmark (issue 10): does a real ComfyUI server running our Train LoRA node hold its memory and file handles
steady over one long training and over many prompts in a row?

One ComfyUI process (``tools/harness.py``, ``--cpu``) with this pack and the test node pack, the tiny SD3 model in a
temporary base directory (as ``tests/conftest.py`` builds it), then:

1. one prompt of ``--steps`` optimizer steps (Train LoRA + Save LoRA). On every ``--every``-th step, when the node's
   ``lora_trainer.progress`` websocket event for that step arrives, the server process's RSS (``VmRSS`` of
   ``/proc/<pid>/status``) and open file descriptors (``/proc/<pid>/fd``) are read. Check: RSS at the last step
   against RSS at the end of warm-up (10 % of the steps, rounded up to a sample) grows < 5 %.
2. ``--prompts`` prompts back to back, each a short training + Save LoRA with its own seed (so ComfyUI's cache
   re-runs the training), RSS and descriptors read after each. Checks, first prompt after ``--warmup-prompts`` to the
   last: RSS grows < 5 %, descriptors by at most +2 (sockets of the HTTP polling that the server has not closed yet),
   and every prompt really trained (its progress events were seen).

The limits are ``--rss-limit-pct`` and ``--fd-limit``. Exit status 1 when a check fails or a prompt fails.

    .venv/bin/python benchmarks/soak.py                                  # 2000 steps, 20 prompts (~1 min on 2 cores)
    .venv/bin/python benchmarks/soak.py --steps 200 --every 50 --prompts 3   # reduced (the test suite's run)
    .venv/bin/python benchmarks/soak.py --json soak.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import harness  # noqa: E402
import workflows as wfs  # noqa: E402

# The tests' node pack provides LoraTrainerTest_TinyTrainingData (seeded latents and captions for the tiny SD3).
TEST_NODE_PACK = REPO / "tests" / "node_packs" / "lora_trainer_test_nodes"
SETTINGS = {
    "fast": {"training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": False},
    "defaults": {},  # the node's documented defaults (bf16 / bf16, checkpointing on): slower on a CPU
}
RSS_LIMIT_PCT = 5.0  # RSS growth after warm-up counted as noise (allocator arenas, lazily built caches)
FD_LIMIT = 2  # descriptor growth counted as noise: sockets of finished HTTP requests the server closes late


# --------------------------------------------------------------------------------------------- the server's process
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for process {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def probe(pid: int) -> dict[str, float]:
    return {"rss_mib": rss_mib(pid), "fds": fd_count(pid)}


# -------------------------------------------------------------------------------------------------------- checks
def growth_pct(first: float, last: float) -> float:
    return 100.0 * (last - first) / first


def check(name: str, first: float | None, last: float | None, unit: str, *, max_pct: float | None = None,
          max_abs: float | None = None) -> dict[str, Any]:
    """One PASS/FAIL figure: growth first → last within ``max_pct`` percent or ``max_abs`` units. A missing sample
    fails: a soak that did not measure must not pass."""
    out: dict[str, Any] = {"name": name, "unit": unit, "first": first, "last": last, "max_pct": max_pct,
                           "max_abs": max_abs}
    if first is None or last is None:
        return {**out, "growth": None, "growth_pct": None, "passed": False, "why": "no sample"}
    growth = last - first
    pct = growth_pct(first, last)
    passed = (max_pct is None or pct < max_pct) and (max_abs is None or growth <= max_abs)
    return {**out, "growth": growth, "growth_pct": pct, "passed": passed}


def count_check(name: str, expected: int, seen: int) -> dict[str, Any]:
    """A count that must come out exactly (steps trained, files saved): otherwise the soak measured something else."""
    return {"name": name, "expected": expected, "seen": seen, "passed": seen == expected}


def warmup_step(steps: int, every: int) -> int:
    """10 % of the run, rounded up to a sampled step, at least the first sample."""
    return min(steps, max(every, math.ceil(steps * 0.1 / every) * every))


def slope_kib_per(xs: list[float], ys_mib: list[float]) -> float | None:
    """Least-squares RSS slope in KiB per x: a steady leak shows as a slope even while under the % limit."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    return statistics.linear_regression(xs, ys_mib).slope * 1024


# ------------------------------------------------------------------------------------------------------- phases
class Progress:
    """Counts our node's per-step websocket events and probes the server whenever a sampled step arrives."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sample_every = 0  # 0 = count only
        self.last_step = 0
        self.steps_seen = 0
        self.samples: list[dict[str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: dict) -> None:
        if msg.get("type") != "lora_trainer.progress":
            return
        step = msg["data"]["step"]
        with self.lock:
            self.steps_seen += 1
            if self.sample_every and (step % self.sample_every == 0 or step == self.last_step):
                self.samples.append({"step": step, **probe(self.pid)})

    def settle(self, expected: int, timeout: float = 10.0) -> None:
        """Events travel through the server's send queue after the node returns: wait until they are all in."""
        deadline = time.monotonic() + timeout
        while self.steps_seen < expected and time.monotonic() < deadline:
            time.sleep(0.05)


def long_run(server: harness.ComfyServer, progress: Progress, steps: int, every: int, settings: dict,
             rss_limit_pct: float) -> dict:
    progress.sample_every, progress.last_step, progress.steps_seen = every, steps, 0
    before = probe(server.process.pid)
    start = time.monotonic()
    entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix="soak/long", steps=steps,
                                 seed=1, **settings), timeout=max(600.0, steps * 2.0))
    seconds = time.monotonic() - start
    progress.settle(steps)
    progress.sample_every = 0
    samples = list(progress.samples)
    by_step = {s["step"]: s for s in samples}
    warm = warmup_step(steps, every)
    after = [s for s in samples if s["step"] >= warm]
    return {
        "steps": steps, "every": every, "warmup_step": warm, "seconds": seconds, "steps_seen": progress.steps_seen,
        "saved": server.outputs(entry, "save").get("text", [None])[0], "before": before,
        "after_prompt": probe(server.process.pid), "samples": samples,
        "slope_kib_per_step": slope_kib_per([s["step"] for s in after], [s["rss_mib"] for s in after]),
        "checks": [
            check(f"RSS step {warm} -> {steps}", by_step.get(warm, {}).get("rss_mib"),
                  by_step.get(steps, {}).get("rss_mib"), "MiB", max_pct=rss_limit_pct),
            count_check("progress events", steps, progress.steps_seen),
        ],
    }


def many_prompts(server: harness.ComfyServer, progress: Progress, prompts: int, prompt_steps: int,
                 warmup_prompts: int, settings: dict, rss_limit_pct: float, fd_limit: int) -> dict:
    progress.steps_seen = 0
    samples = []
    for i in range(1, prompts + 1):
        start = time.monotonic()
        # A new seed per prompt: ComfyUI's cache would otherwise answer the training node without running it.
        entry = server.run(wfs.train(wfs.sd3_model(), wfs.test_data("sd3"), save_prefix=f"soak/prompt{i:03d}",
                                     steps=prompt_steps, seed=100 + i, **settings))
        progress.settle(i * prompt_steps)
        samples.append({"prompt": i, "seconds": time.monotonic() - start, "steps_seen": progress.steps_seen,
                        "saved": server.outputs(entry, "save").get("text", [None])[0], **probe(server.process.pid)})
    # Warm-up leaves at least two prompts to compare (with three, one is warm-up).
    warm = min(warmup_prompts, max(prompts - 2, 0))
    first, last = (samples[warm], samples[-1]) if samples else ({}, {})
    counted = samples[warm:]
    return {
        "prompts": prompts, "prompt_steps": prompt_steps, "warmup_prompts": warm, "samples": samples,
        "slope_kib_per_prompt": slope_kib_per([s["prompt"] for s in counted], [s["rss_mib"] for s in counted]),
        "checks": [
            check(f"RSS prompt {warm + 1} -> {prompts}", first.get("rss_mib"), last.get("rss_mib"), "MiB",
                  max_pct=rss_limit_pct),
            check(f"open fds prompt {warm + 1} -> {prompts}", first.get("fds"), last.get("fds"), "fds",
                  max_abs=fd_limit),
            count_check("progress events", prompts * prompt_steps, progress.steps_seen),
            count_check("distinct LoRA files saved", prompts, len({s["saved"] for s in samples if s["saved"]})),
        ],
    }


# -------------------------------------------------------------------------------------------------------- report
def print_check(c: dict) -> None:
    verdict = "PASS" if c["passed"] else "FAIL"
    if "expected" in c:
        print(f"  {c['name']}: {c['seen']} of {c['expected']}: {verdict}")
        return
    if c["growth"] is None:
        print(f"  {c['name']}: FAIL ({c['why']})")
        return
    limit = f"< {c['max_pct']:g} %" if c["max_pct"] is not None else f"<= {c['max_abs']:+g}"
    spec = ".1f" if c["unit"] == "MiB" else "g"
    print(f"  {c['name']}: {c['first']:{spec}} -> {c['last']:{spec}} {c['unit']} ({c['growth']:+{spec}}, "
          f"{c['growth_pct']:+.2f} %), "
          f"limit {limit}: {verdict}")


def print_long(r: dict) -> None:
    per_step_ms = r["seconds"] / r["steps"] * 1000
    print(f"\n1. one prompt, {r['steps']} steps ({r['seconds']:.0f} s, {per_step_ms:.1f} ms/step); "
          f"server RSS {r['before']['rss_mib']:.1f} MiB before the prompt")
    print(f"{'step':>6} | {'RSS MiB':>9} | {'fds':>4}")
    print("-" * 26)
    for s in r["samples"]:
        mark = "  <- end of warm-up" if s["step"] == r["warmup_step"] else ""
        print(f"{s['step']:6d} | {s['rss_mib']:9.1f} | {s['fds']:4d}{mark}")
    print(f"after the prompt: RSS {r['after_prompt']['rss_mib']:.1f} MiB, {r['after_prompt']['fds']} fds; "
          f"RSS slope after warm-up {fmt_slope(r['slope_kib_per_step'])} KiB/step")
    for c in r["checks"]:
        print_check(c)


def print_prompts(r: dict) -> None:
    print(f"\n2. {r['prompts']} prompts back to back, {r['prompt_steps']} steps + Save LoRA each "
          f"(first {r['warmup_prompts']} = warm-up)")
    print(f"{'prompt':>6} | {'RSS MiB':>9} | {'fds':>4} | {'s':>5}")
    print("-" * 34)
    for s in r["samples"]:
        mark = "  (warm-up)" if s["prompt"] <= r["warmup_prompts"] else ""
        print(f"{s['prompt']:6d} | {s['rss_mib']:9.1f} | {s['fds']:4d} | {s['seconds']:5.1f}{mark}")
    print(f"RSS slope after warm-up {fmt_slope(r['slope_kib_per_prompt'])} KiB/prompt")
    for c in r["checks"]:
        print_check(c)


def fmt_slope(value: float | None) -> str:
    return "—" if value is None else f"{value:+.1f}"


def environment(threads: int) -> dict:
    import torch

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "python": platform.python_version(),
            "torch": torch.__version__, "comfyui": harness.comfyui_version(), "cpu_cores": os.cpu_count(),
            "server_threads": threads or "torch default", "git_head": head.strip(),
            "load_average_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps of the long prompt (2000)")
    p.add_argument("--every", type=int, default=100, help="sample the server every N steps (100)")
    p.add_argument("--prompts", type=int, default=20, help="back-to-back prompts (20)")
    p.add_argument("--prompt-steps", type=int, default=20, help="optimizer steps of each back-to-back prompt (20)")
    p.add_argument("--warmup-prompts", type=int, default=2, help="prompts not counted in the growth (2)")
    p.add_argument("--settings", choices=sorted(SETTINGS), default="fast",
                   help="fast: fp32 / fp32, no checkpointing (default); defaults: the node's own defaults")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server (1; 0 = torch's default): a shared CPU stays usable")
    p.add_argument("--rss-limit-pct", type=float, default=RSS_LIMIT_PCT,
                   help=f"RSS growth after warm-up that fails a check, in %% ({RSS_LIMIT_PCT:g})")
    p.add_argument("--fd-limit", type=int, default=FD_LIMIT,
                   help=f"growth of open descriptors over the prompts that fails the check (more than {FD_LIMIT})")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    if args.steps < 1 or args.every < 1 or args.prompts < 1 or args.prompt_steps < 1:
        p.error("--steps, --every, --prompts and --prompt-steps must be positive")

    if args.threads > 0:  # the server inherits this process's environment
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    settings = SETTINGS[args.settings]
    results: dict[str, Any] = {"environment": environment(args.threads), "settings_name": args.settings,
                               "settings": {**wfs.TRAIN_DEFAULTS, **settings}}
    env = results["environment"]
    shown = ", ".join(f"{k} {results['settings'][k]}" for k in ("training_dtype", "lora_dtype",
                                                                  "gradient_checkpointing", "rank", "batch_size"))
    print(f"soak: ComfyUI {env['comfyui']}, torch {env['torch']}, Python {env['python']}, "
          f"{env['cpu_cores']} CPU cores, server torch threads {env['server_threads']}; tiny SD3, 4 images of 8x8 "
          f"latents; settings '{args.settings}' ({shown})", flush=True)
    failed = True
    with tempfile.TemporaryDirectory(prefix="lora_soak_") as tmp:
        base = Path(tmp)
        harness.put_comfyui_on_path()
        import tiny_models

        tiny_models.write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3.safetensors")
        with harness.ComfyServer(base, extra_node_packs=(TEST_NODE_PACK,)) as server:
            progress = Progress(server.process.pid)
            stop = server.listen(progress)
            try:
                results["long_run"] = long_run(server, progress, args.steps, args.every, settings,
                                               args.rss_limit_pct)
                print_long(results["long_run"])
                results["prompts"] = many_prompts(server, progress, args.prompts, args.prompt_steps,
                                                  args.warmup_prompts, settings, args.rss_limit_pct,
                                                  args.fd_limit)
                print_prompts(results["prompts"])
                failed = not all(c["passed"] for phase in ("long_run", "prompts") for c in results[phase]["checks"])
            except (harness.PromptError, RuntimeError, TimeoutError) as e:
                results["error"] = str(e)
                print(f"\nFAILED: {e}\n--- server log ---\n{server.log_text()[-5000:]}", file=sys.stderr)
            finally:
                stop()
    env["load_average_end"] = os.getloadavg()
    print(f"\nload average at start {env['load_average_start'][0]:.2f}, at end {env['load_average_end'][0]:.2f}; "
          f"git {env['git_head']}")
    print(f"soak: {'FAIL' if failed else 'PASS'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
