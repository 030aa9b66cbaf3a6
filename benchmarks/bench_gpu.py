"""GPU benchmark: an SDXL-size UNet and a Flux dev-size model trained by our node and by ComfyUI's built-in
TrainLoraNode.

SDXL: ComfyUI's own SDXL (comfy.supported_models.SDXL with the unet_config ComfyUI detects for SDXL checkpoints,
built as comfy.model_base.SDXL), weights in bf16, randomly initialised from a seeded generator on the GPU (no
download). Data: 2 images of 128x128 latents (1024 px), 77-token captions of width 2048 with a 1280-wide pooled
output; batch 1, rank 8, AdamW, lr 5e-4, training_dtype and lora_dtype bf16, gradient checkpointing on and off.

Flux (``--model flux``, issue 9): Flux dev's architecture at full size (benchmarks/flux_model.py: width 3072, 19 + 38
blocks) with seeded random weights written once as an fp8_e4m3fn file (--cache) and loaded as UNETLoader loads with
weight_dtype fp8_e4m3fn; 64x64 and 128x128 latents (512 and 1024 px), 512-token captions, guidance 3.5, batch 1,
rank 16, bf16, checkpointing on; ours, the built-in, and the built-in with `offloading` on where it has that input.

Every run is a fresh subprocess. Per run: a 2-step warm-up call, then the measured call. Printed: steps/s of the
training loop and of the whole node call, peak VRAM (torch.cuda.max_memory_allocated during the measured call, and
its increase over the memory allocated just before), and (SDXL) achieved TFLOP/s = (FLOPs of one forward+backward of
the model at this batch, counted by torch.utils.flop_counter.FlopCounterMode, gradients for the input only, i.e. the
model's work in LoRA training without recomputation) x steps/s. "limit" is that bare forward+backward itself.

    python3 benchmarks/bench_gpu.py                  # on a CUDA machine (about 3-4 minutes on an H100)
    python3 benchmarks/bench_gpu.py --model flux     # Flux at 512 and 1024 px (writes ~12 GB once)
    python3 benchmarks/bench_gpu.py --dry-run --model both   # anywhere: reduced models on the CPU, 1 step, in-process
"""
from __future__ import annotations

import argparse
import dataclasses
import gc as garbage
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_common as bc  # noqa: E402
import harness  # noqa: E402  (tools/, put on the path by bench_common)

MARK = "BENCH_GPU_RESULT "

# What ComfyUI's model detection returns for an SDXL base checkpoint (comfy/model_detection.py); "dtype" is added by
# set_inference_dtype. comfy.supported_models.SDXL.matches() accepts it (checked below).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The same architecture at toy size, for --dry-run on a CPU.
DRY_UNET = {**SDXL_UNET, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 0, 1, 1],
            "channel_mult": [1, 2], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
            "context_dim": 64, "num_head_channels": 16}
POOLED = 1280  # SDXL's pooled CLIP-G width (adm_in_channels 2816 = 1280 + 6 x 256)
IMAGES, TOKENS = 2, 77
RANK = {"sdxl": 8, "flux": 16}  # LoRA rank per model


def sdxl_patcher(unet_config: dict, device, dtype, seed: int = 0, disable_dynamic: bool = False):
    """comfy.model_base.SDXL with seeded random weights, wrapped in a ModelPatcher as a loader would.
    (``disable_dynamic``: newer ComfyUI passes it when it rebuilds a patcher; this one is never dynamic.)"""
    import torch
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    with torch.inference_mode():  # as ComfyUI's loaders run
        model = comfy.model_base.SDXL(config, device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        for _, p in sorted(model.diffusion_model.state_dict(keep_vars=True).items(), key=lambda kv: kv[0]):
            if p.is_floating_point():
                std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02
                p.copy_((torch.randn(p.shape, generator=gen, device=device) * std).to(p.dtype))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    if hasattr(patcher, "cached_patcher_init"):  # newer ComfyUI: how to rebuild this patcher
        patcher.cached_patcher_init = (sdxl_patcher, (unet_config, device, dtype, seed))
    return patcher


def data(size: int, context_dim: int, seed: int = 1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(IMAGES, 4, size, size, generator=gen)
    conditioning = [[torch.randn(1, TOKENS, context_dim, generator=gen), {"pooled_output": torch.randn(1, POOLED, generator=gen)}]
                    for _ in range(IMAGES)]
    return latents, conditioning


def step_flops(model, latents, conditioning) -> float:
    """FLOPs of one forward + backward (gradients for x_t only) of the bare model at batch 1."""
    import torch
    import comfy.model_management
    from torch.utils.flop_counter import FlopCounterMode

    br = bc.bridge()
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False), br.trainable_model(model) as clone:
        x0 = clone.model.process_latent_in(latents[:1].to(device))
        conds = br.SampleConditioning(clone, conditioning[:1], [tuple(x0.shape[1:])], device)
        table = clone.model.model_sampling.sigmas
        sigma = table[len(table) // 2].reshape(1).detach().clone().to(device)  # a normal tensor, not an inference one
        x_t = (x0 + sigma * torch.randn_like(x0)).requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            clone.model.apply_model(x_t, sigma, **conds.batch([0])).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One model at one latent size. ``cache``: the folder for the Flux weights file."""
    model: str  # "sdxl" or "flux"
    size: int  # latent side (128 = 1024 px)
    reduced: bool = False
    cache: str = ""

    @property
    def label(self) -> str:
        name = {"sdxl": "SDXL UNet", "flux": "Flux dev (fp8 base)"}[self.model]
        return f"{'reduced ' if self.reduced else ''}{name}, latent {self.size}x{self.size}"


def build_case(case: Case, device, dtype):
    """(MODEL patcher, latents, conditioning) of a case."""
    if case.model == "flux":
        import family_models
        import flux_model

        fam, _, path = flux_model.prepare(case.size, case.reduced, Path(case.cache), device)
        return (flux_model.load(path), family_models.latents(fam, IMAGES, seed=1),
                family_models.conditioning(fam, IMAGES, seed=2))
    unet = DRY_UNET if case.reduced else SDXL_UNET
    if not case.reduced:
        import comfy.supported_models

        assert comfy.supported_models.SDXL.matches(unet), "SDXL_UNET is not what ComfyUI detects as SDXL"
    return (sdxl_patcher(unet, device, dtype), *data(case.size, unet["context_dim"]))


def builtin_has_offloading() -> bool:
    """Whether this ComfyUI's TrainLoraNode has the `offloading` input (0.33 has, 0.3.75 has not), read from its
    source so that the orchestrator needs no ComfyUI import."""
    import harness

    return '"offloading"' in (harness.comfyui_dir() / "comfy_extras" / "nodes_train.py").read_text()


# ---------------------------------------------------------------------------------------------------------- worker
def worker(node: str, gc: bool, steps: int, case: Case, cpu: bool) -> dict:
    """One run: build the model, a 2-step warm-up call, then the measured call (or, for 'bare', the FLOP count and
    the bare forward+backward loop). Nodes: ours, builtin, builtin-offload (the built-in with `offloading` on)."""
    bc.setup_comfyui()
    import torch
    import comfy.model_management as mm

    bc.load_pack()
    timer = bc.LoopTimer()
    timer.patch_ours()
    timer.patch_builtin()
    cuda = torch.cuda.is_available() and not cpu
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 on the GPU; the CPU dry run in fp32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls = (steps,) if cpu else (min(2, steps), steps)  # warm-up, then measured (the CPU dry run: measured only)
    model, latents, conditioning = build_case(case, device, dtype)
    out = {"node": node, "gc": gc, "steps": steps, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "case": case.label, "latent": f"{case.size}x{case.size}", "batch": 1, "rank": RANK[case.model],
           "params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
           "dtype": str(model.model_dtype()), "comfyui": harness.comfyui_version()}
    settings = dict(bc.FIXED, batch_size=1, gradient_checkpointing=gc, rank=RANK[case.model],
                    training_dtype="bf16" if cuda else "fp32", lora_dtype="bf16" if cuda else "fp32")
    if node == "builtin-offload":
        settings["offloading"] = True

    def prepare():
        garbage.collect()
        mm.soft_empty_cache()
        mm.load_models_gpu([model])  # the base model resident on the device, as after sampling with it
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if cuda else 0

    if node == "bare":
        out["flops_per_step"] = step_flops(model, latents, conditioning)
        for n in calls:
            before = prepare()
            start = time.perf_counter()
            loop_s = bc.bare_steps(model, latents, conditioning, 1, n)
            sync()
            out["call_s"], out["loop_s"] = time.perf_counter() - start, loop_s
    else:
        run = bc.run_ours if node == "ours" else bc.run_builtin
        for n in calls:
            result = None
            before = prepare()
            start = time.perf_counter()
            result = run(model, latents, conditioning, dict(settings, steps=n))
            sync()
            out["call_s"], out["loop_s"] = time.perf_counter() - start, timer.seconds
            losses = result[2]["loss"]
            out["train_loss_first_last"] = [losses[0], losses[-1]]
            del result
            mm.unload_all_models()  # drop the trained model before the next call
    out["vram_before_gb"] = before / 2**30
    out["peak_vram_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    out["vram_increase_gb"] = out["peak_vram_gb"] - out["vram_before_gb"] if cuda else None
    out["loop_steps_per_s"] = steps / out["loop_s"]
    out["call_steps_per_s"] = steps / out["call_s"]
    return out


# ---------------------------------------------------------------------------------------------------- orchestrator
def spawn(node: str, gc: bool, steps: int, timeout: int, case: Case) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", node, "--gc", str(int(gc)), "--steps", str(steps),
           "--model", case.model, "--size", str(case.size), "--cache", case.cache]
    if case.reduced:
        cmd.append("--reduced")
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        res = {"node": node, "gc": gc, "error": f"timed out after {timeout}s"}
    else:
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        res = json.loads(lines[-1][len(MARK):]) if done.returncode == 0 and lines else \
            {"node": node, "gc": gc, "error": f"exit {done.returncode}:\n{(done.stderr or done.stdout)[-2500:]}"}
    res["process_s"] = time.perf_counter() - started
    report(res)
    return res


def report(res: dict) -> None:
    status = res.get("error", "").splitlines()[0] if "error" in res else f"{res['loop_steps_per_s']:.3f} steps/s"
    took = f" ({res['process_s']:.0f} s)" if "process_s" in res else ""
    print(f"   {res['node']:15} checkpointing {'on ' if res['gc'] else 'off'}: {status}{took}", flush=True)


def row(r: dict, flops: float | None) -> str:
    ckpt = "on" if r["gc"] else "off"
    if "error" in r:
        return f"{r['node']:15} {ckpt:>4} | FAILED: {r['error'].splitlines()[0]}"
    tflops = flops * r["loop_steps_per_s"] / 1e12 if flops else None
    r["tflops"] = tflops
    peak = f"{r['peak_vram_gb']:.2f}" if r.get("peak_vram_gb") is not None else "—"
    inc = f"+{r['vram_increase_gb']:.2f}" if r.get("vram_increase_gb") is not None else "—"
    call = f"{r['call_steps_per_s']:12.3f}" if r["node"] != "limit" else " " * 12
    return (f"{r['node']:15} {ckpt:>4} | {r['loop_steps_per_s']:12.3f} {call} | {peak:>13} {inc:>15} | "
            f"{(f'{tflops:.3g}' if tflops is not None else '—'):>7}")


def table(runs: list[dict], bare: dict | None) -> list[str]:
    flops = bare.get("flops_per_step") if bare else None
    lines = [f"{'node':15} {'ckpt':>4} | {'steps/s loop':>12} {'steps/s call':>12} | {'peak VRAM GiB':>13} "
             f"{'(+ over before)':>15} | {'TFLOP/s':>7}"]
    lines.append("-" * len(lines[0]))
    lines += [row(r, flops) for r in runs]
    if bare is not None:
        lines.append(row(dict(bare, node="limit"), flops))
    return lines


def summary(case: Case, runs: list[dict], bare: dict | None, gcs: list[bool]) -> dict:
    """Prints a case's table and ratios; returns its JSON record."""
    head = next((r for r in [*runs, bare or {}] if r and "error" not in r), {})
    print(f"\n{case.label}: {head.get('params', 0) / 1e9:.3g} B parameters, {head.get('dtype')}, batch 1, rank "
          f"{RANK[case.model]}, {head.get('steps')} measured steps, device {head.get('device')}, "
          f"ComfyUI {head.get('comfyui')}")
    print("\n".join(table(runs, bare)))
    flops = bare.get("flops_per_step") if bare else None
    if flops:
        print(f"model FLOPs per step (forward + input-gradient backward, no recomputation): {flops / 1e12:.4g} TFLOP")
    by = {(r["node"], r["gc"]): r for r in runs if "error" not in r}
    for gc in gcs:
        o, t = by.get(("ours", gc)), by.get(("builtin", gc))
        if o and t:
            print(f"checkpointing {'on ' if gc else 'off'}: ours/built-in steps/s (loop) "
                  f"{o['loop_steps_per_s'] / t['loop_steps_per_s']:.2f}x")
    return {"case": dataclasses.asdict(case), "runs": runs, "bare": bare, "flops_per_step": flops}


def cases(model: str, reduced: bool, cache: str, dry: bool) -> list[Case]:
    """SDXL first (a timeout then still leaves its figures), then Flux at 512 px and 1024 px."""
    out = []
    if model in ("sdxl", "both"):
        out.append(Case("sdxl", 16 if reduced else 128, reduced))
    if model in ("flux", "both"):
        out += [Case("flux", s, reduced, cache) for s in ((8,) if dry else (4, 8) if reduced else (64, 128))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "builtin", "builtin-offload", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--gc", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=["sdxl", "flux", "both"], default="sdxl")
    p.add_argument("--cache", default=str(bc.REPO / ".cache" / "bench_models"),
                   help="folder for the Flux weights file, written once (about 12 GB; .cache/bench_models)")
    p.add_argument("--dry-run", action="store_true", help="reduced models on the CPU, 1 step, in one process")
    p.add_argument("--reduced", action="store_true",
                   help="the reduced models and small latents, one process per run (a quick check of the full path)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run (10)")
    p.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    p.add_argument("--timeout", type=int, default=150, help="seconds before one run is given up")
    p.add_argument("--budget", type=int, default=400, help="seconds for all runs; runs that would start later are skipped")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.worker:
        case = Case(args.model, args.size, args.reduced, args.cache)
        print(MARK + json.dumps(worker(args.worker, bool(args.gc), args.steps, case, False)), flush=True)
        return

    os.environ.setdefault("TQDM_DISABLE", "1")
    started = time.perf_counter()
    deadline = started + args.budget
    gcs = {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]
    gcs = gcs[:1] if args.dry_run else gcs
    offload = builtin_has_offloading()
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available() and not args.reduced:
            sys.exit("bench_gpu.py: no CUDA device (use --dry-run or --reduced on a CPU machine)")

    def run(node: str, gc: bool, case: Case) -> dict:
        if args.dry_run:  # in this process: one import of ComfyUI, each node once, 1 step
            res = worker(node, gc, 1, case, True)
            report(res)
            return res
        left = deadline - time.perf_counter()
        if left < 30:
            res = {"node": node, "gc": gc, "error": f"skipped: the {args.budget} s budget is spent"}
            report(res)
            return res
        return spawn(node, gc, args.steps, int(min(args.timeout, left)), case)

    records = []
    for case in cases(args.model, args.reduced or args.dry_run, args.cache, args.dry_run):
        print(f"{case.label}:", flush=True)
        if case.model == "flux":  # the weights file first, outside any run's timeout
            import torch
            import flux_model

            bc.setup_comfyui()
            device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
            _, width, _ = flux_model.prepare(case.size, case.reduced, Path(case.cache), device)
            nodes = ["ours", "builtin"] + (["builtin-offload"] if offload else [])
            if not offload:
                print("   builtin-offload: skipped: this ComfyUI's TrainLoraNode has no `offloading` input")
            if args.dry_run and width > 128:  # 0.3.75 fixes Flux's width: depth 1 at 3072 takes 25 s a CPU call
                nodes = nodes[:1]
                print(f"   built-in: skipped in the dry run: this ComfyUI detects Flux at width {width} only (its "
                      "call is the SDXL dry run's)")
            runs = [run(node, True, case) for node in nodes]  # checkpointing on (the default of both nodes)
            records.append(summary(case, runs, None, [True]))
            continue
        # Most important first: both nodes at the first checkpointing setting, then the limit (and FLOPs), the rest.
        runs = [run(node, gcs[0], case) for node in ("ours", "builtin")]
        bare = run("bare", False, case)
        runs += [run(node, gc, case) for gc in gcs[1:] for node in ("ours", "builtin")]
        records.append(summary(case, runs, bare, gcs))
    total = time.perf_counter() - started
    print(f"{total:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"cases": records, "total_s": total}, indent=2, default=str))
    failed = any("error" in r for rec in records for r in [*rec["runs"], rec["bare"] or {}])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
