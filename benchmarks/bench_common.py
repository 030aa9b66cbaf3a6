"""Shared by the benchmarks: load ComfyUI and the pack in-process, build the tiny models and data, call our node and
ComfyUI's built-in TrainLoraNode the way ComfyUI's executor does, the bare forward+backward "limit", and the
native-objective eval loss.

Nothing here edits the pack or ComfyUI; the only thing it wraps (for timing) is the built-in TrainSampler.sample and
our pack's progress-event function, both in this process only.
"""
from __future__ import annotations

import importlib.util
import math
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

PACK = "lora_trainer"
COUNT = 4  # images in the data set
TOKENS = 8  # caption length
LATENT_SIZE = {"sd3": 32, "sd3-wide": 32, "sd15": 16}  # latent height = width
# MMDiT depth (its width is 64 x depth): "sd3" is the test suite's model (width 128); "sd3-wide" (width 512) shows
# how the adapter overhead shrinks once layers are wide enough that matmuls, not memory passes, dominate.
SD3_DEPTH = {"sd3": 2, "sd3-wide": 8}
MODELS = ("sd3", "sd15", "sd3-wide")

# The fixed settings of the comparison (both nodes get exactly these).
FIXED = {"grad_accumulation_steps": 1, "learning_rate": 5e-4, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
         "existing_lora": "[None]"}


# ------------------------------------------------------------------------------------------------------ set-up
def setup_comfyui() -> Path:
    """``import comfy`` works and ComfyUI runs on the CPU unless a GPU is there (tools/harness.py)."""
    import harness

    return harness.put_comfyui_on_path()


def load_pack():
    import harness

    return harness.load_pack()


def bridge():
    load_pack()
    return importlib.import_module(PACK + ".nodes.comfy_bridge")


# --------------------------------------------------------------------------------------------------- memory
def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile, …) in MiB; NaN where
    there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return status_mb("VmRSS")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM, and with it ru_maxrss) to the current RSS, so the
    peak read after training is the training's own. Returns False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ models, data
def build(model_name: str, tmp: Path, size: int | None = None, count: int = COUNT):
    """(MODEL patcher, latents (count, C, H, W), conditioning list with one entry per image)."""
    import torch
    import tiny_models

    size = size or LATENT_SIZE[model_name]
    with torch.inference_mode():  # as ComfyUI's node execution does
        if model_name in SD3_DEPTH:
            import comfy.sd

            path = tiny_models.write_tiny_sd3(tmp / "tiny_sd3.safetensors", depth=SD3_DEPTH[model_name])
            model = comfy.sd.load_diffusion_model(str(path))
            channels, dim = tiny_models.SD3_LATENT_CHANNELS, tiny_models.SD3_CONTEXT_DIM
        elif model_name == "sd15":
            model = tiny_models.tiny_sd15_patcher(0)
            channels, dim = tiny_models.SD15_LATENT_CHANNELS, tiny_models.SD15_CONTEXT_DIM
        else:
            raise ValueError(model_name)
    latents = tiny_models.smooth_latents(count, channels, size, size, seed=3)
    emb = tiny_models.caption_embeddings(count, TOKENS, dim, seed=4)
    conditioning = []
    for i in range(count):
        extra = {"pooled_output": emb[i].mean(0, keepdim=True)} if model_name in SD3_DEPTH else {}
        conditioning.append([emb[i : i + 1].clone(), extra])
    return model, latents, conditioning


# ------------------------------------------------------------------------------------------------------ nodes
def ours_defaults() -> dict:
    """Every widget input of our node at its documented default (required and optional)."""
    from lora_trainer.nodes.train_lora import TrainLoRA

    types = TrainLoRA.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
                out[name] = spec[1]["default"]
    return out


def builtin_defaults() -> dict:
    """Every widget input of ComfyUI's TrainLoraNode at its schema default."""
    from comfy_extras.nodes_train import TrainLoraNode

    return {i.id: i.default for i in TrainLoraNode.define_schema().inputs if getattr(i, "default", None) is not None}


class LoopTimer:
    """Seconds spent inside the training loop proper (excluding the node's set-up and tear-down), per node."""

    def __init__(self):
        self.seconds = float("nan")

    def patch_ours(self):
        """Our loop reports elapsed time with every step's progress event: keep the last one."""
        events = importlib.import_module(PACK + ".nodes.events")
        original = events.send

        def send(event, data):
            if event == "progress" and "elapsed_s" in data:
                self.seconds = data["elapsed_s"]
            return original(event, data)

        events.send = send

    def patch_builtin(self):
        import comfy_extras.nodes_train as nt

        original = nt.TrainSampler.sample

        def sample(sampler, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(sampler, *args, **kwargs)
            finally:
                self.seconds = time.perf_counter() - start

        nt.TrainSampler.sample = sample


def run_ours(model, latents, conditioning, settings: dict):
    """Our node, called as ComfyUI calls an INPUT_IS_LIST node: every input a list, inside inference mode."""
    import torch
    from lora_trainer.nodes.train_lora import TrainLoRA

    torch.manual_seed(int(settings.get("seed", 0)))  # ours never reads the global RNG; kept equal for fairness
    with torch.inference_mode():
        out = TrainLoRA().train(model=[model], latents=[{"samples": latents}], positive=[conditioning],
                                **{k: [v] for k, v in settings.items()})
    return out["result"]


def run_builtin(model, latents, conditioning, settings: dict):
    """ComfyUI's TrainLoraNode.execute with list inputs (is_input_list=True), inside inference mode. It gets a LIST of
    single-image latents: on one LATENT batch it crashes (UnboundLocalError: multi_res), a known defect. Returns
    (model with the LoRA, lora, loss map, steps) as 0.3.75 does."""
    import torch
    from comfy_extras.nodes_train import TrainLoraNode

    # The built-in node draws data order and timesteps from the global RNG; seed it with the node's seed.
    torch.manual_seed(int(settings.get("seed", 0)))
    singles = [{"samples": latents[i : i + 1]} for i in range(len(latents))]
    # Inputs newer ComfyUI versions added (0.33: offloading, bypass_mode, ...) get their schema defaults.
    settings = dict(builtin_defaults(), **settings)
    with torch.inference_mode():
        out = TrainLoraNode.execute(model=[model], latents=singles, positive=[conditioning],
                                    **{k: [v] for k, v in settings.items()}).args
        if len(out) == 3:  # newer ComfyUI (0.33) returns (lora, loss_map, steps): apply the LoRA as its loader does
            out = (bridge().with_lora(model, out[0]), *out)
    return out


def bare_steps(model, latents, conditioning, batch: int, steps: int, seed: int = 0) -> float:
    """"The limit": ``steps`` forward+backward passes of the model alone (no adapter; gradients only with respect to
    x_t), fp32, no checkpointing, same objective as our loop. Returns the seconds of the loop alone.

    The weights are made non-inference tensors the way our node does it (a clone with zero-strength patches loaded
    by ComfyUI's memory manager)."""
    import torch
    import comfy.model_management

    br = bridge()
    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), br.trainable_model(model) as clone:
        x0 = [clone.model.process_latent_in(x.unsqueeze(0).to(device))[0] for x in latents]
        conds = br.SampleConditioning(clone, conditioning, [tuple(x.shape) for x in x0], device)
        schedule = br.ComfySchedule(clone.model.model_sampling, device)
        start = time.perf_counter()
        for step in range(steps):
            ids = [(step * batch + j) % len(x0) for j in range(batch)]
            x = torch.stack([x0[i] for i in ids])
            sigma = schedule.sigmas[torch.randint(0, len(schedule.sigmas), (batch,), generator=gen)].to(device)
            noise = torch.randn(x.shape, generator=gen).to(device)
            x_t = schedule.noisy(sigma, noise, x).detach().requires_grad_(True)
            denoised = clone.model.apply_model(x_t, sigma, **conds.batch(ids))
            loss = ((denoised.float() - x.float()) / schedule.output_scale(sigma, x)).pow(2).mean()
            loss.backward()
            float(loss.detach())
        return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------- eval
def eval_loss(model, latents, conditioning, seed: int = 123, points: int = 8) -> float:
    """Native-objective MSE of a MODEL on the training latents: ``points`` sigmas evenly spaced over the model's own
    sigma table, seeded noise, loss on (denoised − x0) / b(σ), b(σ) = calculate_denoised(σ, 1, 0). Runs in inference
    mode, as a ComfyUI node would."""
    import torch
    import comfy.model_management

    br = bridge()
    device = comfy.model_management.get_torch_device()
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        x0 = [model.model.process_latent_in(s.unsqueeze(0).to(device))[0] for s in latents]
        conds = br.SampleConditioning(model, conditioning, [tuple(x.shape) for x in x0], device)
        schedule = br.ComfySchedule(model.model.model_sampling, device)
        table = schedule.sigmas
        gen = torch.Generator().manual_seed(seed)
        total, n = 0.0, 0
        for k in range(points):
            sigma = table[int((k + 0.5) * len(table) / points)].reshape(1).to(device)
            for i, x in enumerate(x0):
                x = x.unsqueeze(0)
                noise = torch.randn(x.shape, generator=gen).to(device)
                x_t = schedule.noisy(sigma, noise, x)
                denoised = model.model.apply_model(x_t, sigma, **conds.batch([i])).float()
                err = (denoised - x.float()) / schedule.output_scale(sigma, x_t)
                total += float(err.pow(2).sum())
                n += err.numel()
    value = total / n
    return value if math.isfinite(value) else float("nan")
