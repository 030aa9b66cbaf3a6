"""Our Train LoRA node against ComfyUI's built-in TrainLoraNode, on the same tiny models from the same ComfyUI tree.

Both nodes are imported in-process (as ComfyUI loads them) and called on the CPU with the same data, seed and
settings (20 steps, rank 8, fp32, LoRA, AdamW, lr 5e-4; batch 1 and 4; gradient checkpointing on and off) on the tiny
SD3 MMDiT (32x32 latents) and the tiny SD1.5 UNet (16x16 latents). Every run is a fresh subprocess, so its peak RSS
is its own (after an uncounted 2-step call of the same node); runs alternate ours / built-in in pairs after a
warm-up pair. Per configuration it prints seconds per optimizer step (node call time / steps, and the training loop
alone), the median ratio ours/built-in, peak RSS, the native-objective eval loss before/after, and "the limit": the same model's bare forward+backward at that batch (no
adapter, gradients for the input only) with our overhead over it (checkpointing off).

    .venv/bin/python benchmarks/bench_train.py                   # all 8 configurations, 3 pairs each
    .venv/bin/python benchmarks/bench_train.py --quick           # 1 pair of batch 1 / no checkpointing (CI smoke)
    .venv/bin/python benchmarks/bench_train.py --defaults        # each node at its own defaults, 100 steps, SD3
    .venv/bin/python benchmarks/bench_train.py --only sd3 --pairs 5 --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_common as bc  # noqa: E402

MARK = "BENCH_RESULT "
QUICK_GRID = [(1, False)]


# ---------------------------------------------------------------------------------------------------------- worker
def worker(args) -> dict:
    """One run in this (fresh) process: build, eval before, train (timed, peak RSS), eval after."""
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    bc.setup_comfyui()
    import torch

    bc.load_pack()
    timer = bc.LoopTimer()
    timer.patch_ours()
    timer.patch_builtin()
    out: dict = {"node": args.node, "model": args.model, "batch": args.batch, "gc": bool(args.gc),
                 "steps": args.steps, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        model, latents, conditioning = bc.build(args.model, Path(tmp))
        if args.node == "bare":
            settings = {}
        elif args.defaults_of:  # each node at its own documented defaults; only the step count (and seed) is set
            settings = dict(bc.ours_defaults() if args.node == "ours" else bc.builtin_defaults(), steps=args.steps,
                            seed=args.seed)
        else:
            settings = dict(bc.FIXED, steps=args.steps, batch_size=args.batch, gradient_checkpointing=bool(args.gc))
        out["settings"] = settings
        out["eval_before"] = bc.eval_loss(model, latents, conditioning) if args.node != "bare" else None
        run = bc.run_ours if args.node == "ours" else bc.run_builtin
        if args.warmup_steps:  # one-time costs of a process (lazy imports, kernel caches) are not training costs
            warm_start = time.perf_counter()
            if args.node == "bare":
                bc.bare_steps(model, latents, conditioning, args.batch, args.warmup_steps)
            else:
                run(model, latents, conditioning, dict(settings, steps=args.warmup_steps))
            out["warmup_s"] = time.perf_counter() - warm_start
        out["rss_before_mb"] = bc.rss_mb()
        out["maxrss_setup_mb"] = bc.maxrss_mb()  # peak of model building, the first eval and the warm-up call
        out["peak_reset"] = bc.reset_peak_rss()
        start = time.perf_counter()
        if args.node == "bare":
            out["loop_s"] = bc.bare_steps(model, latents, conditioning, args.batch, args.steps)
            result = None
        else:
            result = run(model, latents, conditioning, settings)
            out["loop_s"] = timer.seconds
        out["call_s"] = time.perf_counter() - start
        out["peak_rss_mb"] = bc.maxrss_mb()
        out["rss_increase_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
        out["sec_per_step"] = out["call_s"] / args.steps
        out["loop_sec_per_step"] = out["loop_s"] / args.steps
        if result is not None:
            losses = result[2]["loss"]
            out["train_loss_first_last"] = [losses[0], losses[-1]] if losses else None
            out["steps_out"] = result[3]
            out["eval_after"] = bc.eval_loss(result[0], latents, conditioning)
    return out


# ---------------------------------------------------------------------------------------------------- orchestrator
class Runner:
    def __init__(self, args):
        self.args = args
        self.runs: list[dict] = []

    def spawn(self, node: str, model: str, batch: int, gc: bool, steps: int, defaults_of: bool = False,
              seed: int = 0) -> dict:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--node", node, "--model", model,
               "--batch", str(batch), "--gc", str(int(gc)), "--steps", str(steps), "--threads", str(self.args.threads),
               "--seed", str(seed), "--warmup-steps", str(self.args.warmup_steps)]
        if defaults_of:
            cmd.append("--defaults-of")
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        if self.args.threads > 0:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.args.threads)
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            res = {"node": node, "error": f"timed out after {self.args.timeout}s"}
        else:
            lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
            if done.returncode != 0 or not lines:
                tail = (done.stderr or done.stdout)[-2500:]
                res = {"node": node, "error": f"exit {done.returncode}:\n{tail}"}
            else:
                res = json.loads(lines[-1][len(MARK):])
        res["process_s"] = time.perf_counter() - started
        if "error" in res:
            print(f"   !! {node} {model} batch {batch} ckpt {gc}: {res['error'].splitlines()[0]}", flush=True)
        self.runs.append(dict(res, model=model, batch=batch, gc=gc))
        return res


def ok(runs: list[dict]) -> list[dict]:
    return [r for r in runs if "error" not in r]


def med(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in ok(runs) if r.get(key) is not None]
    return statistics.median(values) if values else None


def bench_config(runner: Runner, model: str, batch: int, gc: bool, pairs: int, steps: int, warmup: bool) -> dict:
    print(f"-- {model} batch {batch} checkpointing {'on' if gc else 'off'}: "
          f"{'warm-up pair + ' if warmup else ''}{pairs} pair(s){' + limit' if not gc else ''}", flush=True)
    if warmup:  # file caches, lazily compiled kernels, page cache of the venv: not counted
        runner.spawn("ours", model, batch, gc, steps)
        runner.spawn("builtin", model, batch, gc, steps)
    ours, theirs, bare = [], [], []
    for _ in range(pairs):
        ours.append(runner.spawn("ours", model, batch, gc, steps))
        theirs.append(runner.spawn("builtin", model, batch, gc, steps))
        if not gc:
            bare.append(runner.spawn("bare", model, batch, False, steps))
    row = {"model": model, "batch": batch, "gc": gc, "steps": steps, "pairs": pairs,
           "errors": {n: r["error"] for n, runs in (("ours", ours), ("builtin", theirs), ("bare", bare))
                      for r in runs if "error" in r}}
    for name, runs in (("ours", ours), ("builtin", theirs)):
        row[f"{name}_s"] = med(runs, "sec_per_step")
        row[f"{name}_loop_s"] = med(runs, "loop_sec_per_step")
        row[f"{name}_peak_mb"] = med(runs, "peak_rss_mb")
        row[f"{name}_rss_up_mb"] = med(runs, "rss_increase_mb")
        row[f"{name}_eval_before"] = med(runs, "eval_before")
        row[f"{name}_eval_after"] = med(runs, "eval_after")
        row[f"{name}_all_s"] = [r.get("sec_per_step") for r in runs]
    ratios = [o["sec_per_step"] / t["sec_per_step"] for o, t in zip(ours, theirs) if "error" not in o and "error" not in t]
    row["ratio"] = statistics.median(ratios) if ratios else None
    loop_ratios = [o["loop_sec_per_step"] / t["loop_sec_per_step"] for o, t in zip(ours, theirs)
                   if "error" not in o and "error" not in t]
    row["loop_ratio"] = statistics.median(loop_ratios) if loop_ratios else None
    if bare:
        row["bare_s"] = med(bare, "loop_sec_per_step")
        row["bare_peak_mb"] = med(bare, "peak_rss_mb")
        if row["bare_s"] and row["ours_s"]:
            row["overhead_pct"] = 100 * (row["ours_s"] / row["bare_s"] - 1)
            row["loop_overhead_pct"] = 100 * (row["ours_loop_s"] / row["bare_s"] - 1)
    return row


def fmt(value, spec: str, width: int) -> str:
    return f"{value:{spec}}".rjust(width) if value is not None else "—".rjust(width)


def table_head(title: str, head: str) -> None:
    print(f"\n{title}")
    print(head)
    print("-" * len(head))


def print_tables(rows: list[dict]) -> None:
    table_head("Speed (seconds per optimizer step; median over pairs; 'call' = node call / steps, 'loop' = training "
               "loop alone; ratio = median of per-pair ours/built-in)",
               f"{'model':8} {'batch':>5} {'ckpt':>4} | {'ours call':>9} {'built-in':>9} {'ratio':>6} | "
               f"{'ours loop':>9} {'built-in':>9} {'ratio':>6} | {'limit':>8} {'ovh call':>8} {'ovh loop':>8}")
    for r in rows:
        print(f"{r['model']:8} {r['batch']:5d} {'on' if r['gc'] else 'off':>4} | "
              f"{fmt(r['ours_s'], '.4f', 9)} {fmt(r['builtin_s'], '.4f', 9)} {fmt(r['ratio'], '.3f', 6)} | "
              f"{fmt(r['ours_loop_s'], '.4f', 9)} {fmt(r['builtin_loop_s'], '.4f', 9)} {fmt(r['loop_ratio'], '.3f', 6)} | "
              f"{fmt(r.get('bare_s'), '.4f', 8)} {fmt(r.get('overhead_pct'), '+.0f', 7)}{'%' if r.get('overhead_pct') is not None else ' '}"
              f" {fmt(r.get('loop_overhead_pct'), '+.0f', 7)}{'%' if r.get('loop_overhead_pct') is not None else ' '}")
    table_head("Memory (peak RSS of the run's process during the node call, MB; +Δ = over the RSS just before it) "
               "and native-objective eval loss (8 fixed sigmas, seeded noise) before → after",
               f"{'model':8} {'batch':>5} {'ckpt':>4} | {'ours peak (+Δ)':>16} {'built-in peak (+Δ)':>18} | "
               f"{'eval ours':>19} {'eval built-in':>19}")
    for r in rows:
        def mem(p):
            return (f"{r[p + '_peak_mb']:.0f} (+{r[p + '_rss_up_mb']:.0f})" if r[p + "_peak_mb"] is not None else "—")

        def ev(p):
            b, a = r[p + "_eval_before"], r[p + "_eval_after"]
            return f"{b:.4f} → {a:.4f}" if b is not None and a is not None else "—"

        print(f"{r['model']:8} {r['batch']:5d} {'on' if r['gc'] else 'off':>4} | {mem('ours'):>16} {mem('builtin'):>18} | "
              f"{ev('ours'):>19} {ev('builtin'):>19}")
    failed = [(r, n, e) for r in rows for n, e in r["errors"].items()]
    for r, n, e in failed:
        print(f"\nFAILED: {n} on {r['model']} batch {r['batch']} ckpt {r['gc']}:\n{e}")


def bench_defaults(runner: Runner, steps: int, seeds: list[int]) -> dict:
    """Each node at its own defaults on the tiny SD3, once per seed (the seed is the one setting both nodes share
    that changes the outcome): eval-loss reduction per seed and the ratio ours/built-in."""
    print(f"-- defaults: each node at its own defaults, {steps} steps, sd3, seeds {seeds}", flush=True)
    rows = []
    for seed in seeds:
        row: dict = {"seed": seed}
        for name in ("ours", "builtin"):
            r = runner.spawn(name, "sd3", 1, True, steps, defaults_of=True, seed=seed)
            row[name] = r
            row[f"{name}_reduction"] = r["eval_before"] - r["eval_after"] if "error" not in r else None
        o, t = row["ours_reduction"], row["builtin_reduction"]
        row["ratio"] = (o / t if t else float("inf")) if o is not None and t is not None else None
        rows.append(row)
    print(f"\nDefaults (each node's own defaults, sd3, {steps} steps; eval = native-objective MSE, 8 fixed sigmas)")
    head = (f"{'seed':>4} {'node':9} | {'eval before':>11} {'eval after':>10} {'reduction':>10} | {'s/step':>7} | "
            f"{'ratio':>5} | settings")
    print(head)
    print("-" * len(head))
    for row in rows:
        for name, label in (("ours", "ours"), ("builtin", "built-in")):
            r = row[name]
            if "error" in r:
                print(f"{row['seed']:4d} {label:9} | FAILED: {r['error']}")
                continue
            s = r["settings"]
            brief = ", ".join(f"{k}={s[k]}" for k in ("training_dtype", "lora_dtype", "gradient_checkpointing", "rank",
                                                       "alpha", "learning_rate", "batch_size") if k in s)
            ratio = fmt(row["ratio"], ".2f", 5) if name == "ours" else " " * 5
            print(f"{row['seed']:4d} {label:9} | {r['eval_before']:11.4f} {r['eval_after']:10.4f} "
                  f"{row[name + '_reduction']:10.4f} | {r['sec_per_step']:7.4f} | {ratio} | {brief}")
    ratios = [row["ratio"] for row in rows if row["ratio"] is not None]
    summary = {"steps": steps, "seeds": seeds, "rows": rows, "ratios": ratios,
               "median_ratio": statistics.median(ratios) if ratios else None,
               "errors": [row[n]["error"] for row in rows for n in ("ours", "builtin") if "error" in row[n]]}
    print(f"eval-loss reduction ratio ours/built-in: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}); median {fmt(summary['median_ratio'], '.2f', 0)}")
    return summary


def environment(args) -> dict:
    import harness  # noqa: F401  (tools/ is on sys.path through bench_common)

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=bc.REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch_threads_per_run": args.threads,
            "load_average_start": os.getloadavg(), "comfyui": str(harness.comfyui_dir()),
            "git_head": git("rev-parse", "--short", "HEAD"), "git_dirty": git("status", "--porcelain").splitlines()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--node", choices=["ours", "builtin", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=bc.MODELS, default="sd3", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--defaults-of", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help="optimizer steps per run (20; --defaults: 100)")
    p.add_argument("--pairs", type=int, help="measured ours/built-in pairs per configuration (3)")
    p.add_argument("--only", choices=bc.MODELS, help="one model only (sd3-wide: width 512, not in the default grid)")
    p.add_argument("--batches", default="1,4", help="batch sizes of the grid (1,4)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="both", help="checkpointing settings")
    p.add_argument("--defaults", action="store_true", help="each node at its own defaults, 100 steps, SD3: eval loss")
    p.add_argument("--seeds", default="0", help="--defaults: comma-separated seeds, one run of each node per seed (0)")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="steps of an uncounted call of the same node in each run's process before the measured one (2)")
    p.add_argument("--quick", action="store_true", help="CI smoke: 1 pair, no warm-up, batch 1 / checkpointing off")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (1; 0 = torch's default). On a shared machine more than one "
                        "thread per run makes timings swing by orders of magnitude.")
    p.add_argument("--timeout", type=int, default=900, help="seconds before one run is given up")
    p.add_argument("--json", type=Path, help="also write all results (and every single run) here")
    args = p.parse_args()
    if args.worker:
        args.steps = args.steps or 20
        print(MARK + json.dumps(worker(args)), flush=True)
        return

    runner = Runner(args)
    results: dict = {"environment": environment(args), "configs": []}
    started = time.perf_counter()
    if args.defaults:
        steps = args.steps or (20 if args.quick else 100)
        results["defaults"] = bench_defaults(runner, steps, [int(x) for x in args.seeds.split(",")])
    else:
        models = [args.only] if args.only else ["sd3", "sd15"]
        ckpt = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
        grid = QUICK_GRID if args.quick else [(b, gc) for gc in ckpt for b in map(int, args.batches.split(","))]
        pairs = 1 if args.quick else (args.pairs or 3)
        steps = args.steps or 20
        for model in models:
            for batch, gc in grid:
                results["configs"].append(bench_config(runner, model, batch, gc, pairs, steps, warmup=not args.quick))
        print_tables(results["configs"])
    results["environment"]["load_average_end"] = os.getloadavg()
    results["environment"]["total_s"] = time.perf_counter() - started
    results["runs"] = runner.runs
    env = results["environment"]
    print(f"\n{env['machine']}, {args.threads or 'default'} torch thread(s) per run, load average at start "
          f"{env['load_average_start'][0]:.2f}, at end {env['load_average_end'][0]:.2f}; {env['total_s']:.0f} s in all; "
          f"ComfyUI {env['comfyui']}; git {env['git_head']}{' (+ uncommitted changes)' if env['git_dirty'] else ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    failed = any(r.get("errors") for r in results["configs"]) or \
        bool(results.get("defaults") and results["defaults"]["errors"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
