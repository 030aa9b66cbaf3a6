"""Our Train LoRA node against ComfyUI's built-in TrainLoraNode, on the same tiny models from the same ComfyUI tree.

Every run is a fresh subprocess (so its peak RSS is its own); runs alternate ours / built-in in pairs after a warm-up
pair. Printed per configuration: seconds per optimizer step, peak RSS during training, native-objective eval loss
before/after, the median ratio ours/built-in, and "the limit": the same model's bare forward+backward (no adapter,
gradients only for the input) and our overhead over it.

    .venv/bin/python benchmarks/bench_train.py              # all configurations, 3 pairs each
    .venv/bin/python benchmarks/bench_train.py --defaults   # each node at its own defaults, 100 steps
    .venv/bin/python benchmarks/bench_train.py --quick      # 1 pair of a few configurations (CI smoke)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

COUNT = 4  # images in the data set
SIZES = {"sd3": 32, "sd15": 16}  # latent height = width


# ---------------------------------------------------------------------------------------------------------- worker
def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM (peak RSS) to the current RSS


def load_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_trainer", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_trainer"] = module
    spec.loader.exec_module(module)
    return module


def build(model_name: str, tmp: Path):
    import torch
    import tiny_models

    size = SIZES[model_name]
    with torch.inference_mode():  # as ComfyUI's node execution does
        if model_name == "sd3":
            import comfy.sd

            path = tiny_models.write_tiny_sd3(tmp / "tiny_sd3.safetensors")
            model = comfy.sd.load_diffusion_model(str(path))
            channels, dim, extra = tiny_models.SD3_LATENT_CHANNELS, tiny_models.SD3_CONTEXT_DIM, True
        else:
            model = tiny_models.tiny_sd15_patcher(0)
            channels, dim, extra = tiny_models.SD15_LATENT_CHANNELS, tiny_models.SD15_CONTEXT_DIM, False
    latents = tiny_models.smooth_latents(COUNT, channels, size, size, seed=3)
    emb = tiny_models.caption_embeddings(COUNT, 8, dim, seed=4)
    captions = [[emb[i : i + 1], {"pooled_output": emb[i].mean(0, keepdim=True)} if extra else {}]
                for i in range(COUNT)]
    return model, latents, captions


def settings(args) -> dict:
    if args.defaults_of:  # each node's own documented defaults, only the step count is ours
        return {"steps": args.steps}
    return {"steps": args.steps, "batch_size": args.batch, "rank": 8, "learning_rate": 5e-4, "optimizer": "AdamW",
            "training_dtype": "fp32", "lora_dtype": "fp32", "gradient_checkpointing": bool(args.gc)}


def run_ours(model, latents, captions, s: dict):
    import torch
    from lora_trainer.nodes.train_lora import TrainLoRA

    opts = {"batch_size": 1, "grad_accumulation_steps": 1, "learning_rate": 5e-4, "rank": 8, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16", "algorithm": "LoRA",
            "gradient_checkpointing": True, "existing_lora": "[None]", **s}
    with torch.inference_mode():
        out = TrainLoRA().train(model=[model], latents=[{"samples": latents}], positive=[captions],
                                **{k: [v] for k, v in opts.items()})
    return out["result"][0]


def run_builtin(model, latents, captions, s: dict):
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    opts = {"batch_size": 1, "grad_accumulation_steps": 1, "learning_rate": 5e-4, "rank": 8, "optimizer": "AdamW",
            "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16", "algorithm": "LoRA",
            "gradient_checkpointing": True, "existing_lora": "[None]", **s}
    # A list of single-image latents: the built-in node crashes on one batch (UnboundLocalError 'multi_res').
    singles = [{"samples": latents[i : i + 1]} for i in range(len(latents))]
    with torch.inference_mode():
        out = TrainLoraNode.execute(model=[model], latents=singles, positive=[[c] for c in captions],
                                    **{k: [v] for k, v in opts.items()})
    result = getattr(out, "result", None) or getattr(out, "args")
    return result[0]


def run_bare(model, latents, captions, s: dict):
    """The limit: forward + backward of the model alone, gradients for the input only."""
    import torch
    import comfy.model_management
    from lora_trainer.nodes import comfy_bridge

    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(0)
    with comfy_bridge.trainable_model(model) as clone:
        x0 = [clone.model.process_latent_in(x.unsqueeze(0).to(device))[0] for x in latents]
        conds = comfy_bridge.SampleConditioning(clone, captions, x0, device)
        schedule = comfy_bridge.ComfySchedule(clone.model.model_sampling, device)
        batch = s["batch_size"]
        for step in range(s["steps"]):
            ids = [(step * batch + j) % len(x0) for j in range(batch)]
            x = torch.stack([x0[i] for i in ids])
            sigma = schedule.sigmas[torch.randint(0, len(schedule.sigmas), (batch,), generator=gen)]
            x_t = schedule.noisy(sigma, torch.randn(x.shape, generator=gen), x).requires_grad_(True)
            denoised = clone.model.apply_model(x_t, sigma, **conds.batch(ids))
            ((denoised - x) / schedule.output_scale(sigma, x)).pow(2).mean().backward()
    return None


def worker(args) -> None:
    import harness

    harness.put_comfyui_on_path()
    import torch
    import eval_loss

    torch.manual_seed(0)
    load_pack()
    with tempfile.TemporaryDirectory() as tmp:
        model, latents, captions = build(args.model, Path(tmp))
        before = eval_loss.eval_loss(model, latents, captions) if args.node != "bare" else float("nan")
        run = {"ours": run_ours, "builtin": run_builtin, "bare": run_bare}[args.node]
        s = settings(args)
        rss_before = rss_mb("VmRSS")
        reset_peak_rss()
        start = time.perf_counter()
        trained = run(model, latents, captions, s)
        seconds = time.perf_counter() - start
        peak = rss_mb("VmHWM")
        after = eval_loss.eval_loss(trained, latents, captions) if trained is not None else float("nan")
    print(json.dumps({"sec_per_step": seconds / args.steps, "peak_rss_mb": peak, "rss_increase_mb": peak - rss_before,
                      "eval_before": before, "eval_after": after}))


# ---------------------------------------------------------------------------------------------------- orchestrator
def spawn(node: str, model: str, batch: int, gc: int, steps: int, defaults_of: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--node", node, "--model", model, "--batch", str(batch),
           "--gc", str(gc), "--steps", str(steps)] + (["--defaults-of"] if defaults_of else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        raise RuntimeError(f"{node} {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_config(model: str, batch: int, gc: int, pairs: int, steps: int) -> dict:
    spawn("ours", model, batch, gc, steps)  # warm-up pair (file caches, lazy imports)
    spawn("builtin", model, batch, gc, steps)
    ours, theirs = [], []
    for _ in range(pairs):
        ours.append(spawn("ours", model, batch, gc, steps))
        theirs.append(spawn("builtin", model, batch, gc, steps))
    bare = [spawn("bare", model, batch, 0, steps) for _ in range(pairs)] if not gc else []
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    row = {
        "model": model, "batch": batch, "gc": bool(gc),
        "ours_s": med(ours, "sec_per_step"), "builtin_s": med(theirs, "sec_per_step"),
        "ratio": statistics.median(o["sec_per_step"] / t["sec_per_step"] for o, t in zip(ours, theirs)),
        "ours_peak_mb": med(ours, "peak_rss_mb"), "builtin_peak_mb": med(theirs, "peak_rss_mb"),
        "ours_rss_up_mb": med(ours, "rss_increase_mb"), "builtin_rss_up_mb": med(theirs, "rss_increase_mb"),
        "ours_eval": (ours[0]["eval_before"], med(ours, "eval_after")),
        "builtin_eval": (theirs[0]["eval_before"], med(theirs, "eval_after")),
    }
    if bare:
        row["bare_s"] = med(bare, "sec_per_step")
        row["overhead_pct"] = 100 * (row["ours_s"] / row["bare_s"] - 1)
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':5} {'batch':>5} {'ckpt':>5} | {'ours s/step':>11} {'built-in':>9} {'ratio':>6} | "
            f"{'peak RSS ours':>13} {'built-in':>9} | {'eval ours before→after':>23} {'built-in before→after':>23} | "
            f"{'bare s/step':>11} {'overhead':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        bare = f"{r['bare_s']:11.4f} {r['overhead_pct']:7.1f}%" if "bare_s" in r else f"{'':11} {'':8}"
        print(f"{r['model']:5} {r['batch']:5d} {str(r['gc']):>5} | {r['ours_s']:11.4f} {r['builtin_s']:9.4f} "
              f"{r['ratio']:6.3f} | {r['ours_peak_mb']:10.0f} MB {r['builtin_peak_mb']:6.0f} MB | "
              f"{r['ours_eval'][0]:10.4f} → {r['ours_eval'][1]:8.4f} {r['builtin_eval'][0]:10.4f} → "
              f"{r['builtin_eval'][1]:8.4f} | {bare}")


def bench_defaults(steps: int, pairs: int) -> dict:
    ours = [spawn("ours", "sd3", 1, 1, steps, defaults_of=True) for _ in range(pairs)]
    theirs = [spawn("builtin", "sd3", 1, 1, steps, defaults_of=True) for _ in range(pairs)]
    red = lambda r: r["eval_before"] - r["eval_after"]  # noqa: E731
    row = {"ours_reduction": statistics.median(map(red, ours)), "builtin_reduction": statistics.median(map(red, theirs)),
           "ours_eval": [ours[0]["eval_before"], statistics.median(r["eval_after"] for r in ours)],
           "builtin_eval": [theirs[0]["eval_before"], statistics.median(r["eval_after"] for r in theirs)]}
    row["ratio"] = row["ours_reduction"] / row["builtin_reduction"] if row["builtin_reduction"] else float("inf")
    print(f"defaults, sd3, {steps} steps: eval-loss reduction ours {row['ours_reduction']:.4f} "
          f"({row['ours_eval'][0]:.4f} → {row['ours_eval'][1]:.4f}), built-in {row['builtin_reduction']:.4f} "
          f"({row['builtin_eval'][0]:.4f} → {row['builtin_eval'][1]:.4f}), ratio ours/built-in {row['ratio']:.2f}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--node", choices=["ours", "builtin", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=["sd3", "sd15"], default="sd3", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--gc", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--defaults-of", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--only", choices=["sd3", "sd15"])
    p.add_argument("--defaults", action="store_true", help="each node at its defaults for 100 steps (eval loss)")
    p.add_argument("--quick", action="store_true", help="1 pair, batch 1, no checkpointing (smoke test)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "configs": []}
    if args.defaults:
        results["defaults"] = bench_defaults(100 if not args.quick else 10, 1 if args.quick else args.pairs)
    else:
        models = [args.only] if args.only else ["sd3", "sd15"]
        grid = [(1, 0)] if args.quick else [(1, 0), (4, 0), (1, 1), (4, 1)]
        pairs = 1 if args.quick else args.pairs
        for model in models:
            for batch, gc in grid:
                results["configs"].append(bench_config(model, batch, gc, pairs, args.steps))
                print(f"... {model} batch {batch} ckpt {bool(gc)} done", flush=True)
        print_table(results["configs"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
