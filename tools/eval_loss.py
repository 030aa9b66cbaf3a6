"""The native-objective loss of a ComfyUI MODEL on training latents at fixed noise levels and noise.

Shared by the tests (through a test-only node) and the benchmarks, so both judge training the same way: every latent
is noised at ``points`` sigmas spread evenly over the model's own sigma table, with seeded noise, and the loss is
taken on the model's native prediction (see training/objectives.py).
"""
from __future__ import annotations

import sys

import torch


def pack_module(name: str):
    """A module of the pack's ComfyUI glue (``nodes/<name>.py``) as it was loaded (its module name depends on who
    loaded the pack)."""
    return next(m for module, m in sys.modules.items() if module.endswith(f"lora_trainer.nodes.{name}"))


def denoised_and_errors(model, samples, captions: list, seed: int, points: int = 8):
    """Denoised outputs and native errors of ``model`` on every latent of ``samples`` (a LATENT's samples: a batch,
    or a NestedTensor of streams, whose outputs are the packed rows the model works on) at every eval sigma."""
    import comfy.model_management

    bridge = pack_module("comfy_bridge")
    device = comfy.model_management.get_torch_device()
    comfy.model_management.load_models_gpu([model])
    x0 = bridge.ModelSpaceLatents(model, pack_module("inputs").latent_samples({"samples": samples}))
    count = len(x0.shapes)
    captions = [captions[i if len(captions) > 1 else 0] for i in range(count)]
    conds = bridge.SampleConditioning(model, captions, x0.shapes, device, layouts=x0.layouts)
    schedule = bridge.ComfySchedule(model.model.model_sampling, device)
    gen = torch.Generator().manual_seed(seed)
    outs, errors = [], []
    with torch.no_grad():
        for k in range(points):
            sigma = schedule.sigmas[int((k + 0.5) * len(schedule.sigmas) / points)].reshape(1).to(device)
            for i in range(count):
                x = x0.load([i]).to(device)
                noise = torch.randn(x.shape, generator=gen).to(device)
                x_t = schedule.noisy(sigma, noise, x)
                denoised = conds.forward(model, x_t, sigma, [i]).float()
                outs.append(denoised.cpu())
                errors.append(((denoised - x.float()) / schedule.output_scale(sigma, x_t)).cpu())
    return torch.cat(outs), torch.cat(errors)


def eval_loss(model, samples, captions: list, seed: int = 123) -> float:
    """Mean squared native error (the MSE objective) over the eval grid."""
    return float(denoised_and_errors(model, samples, captions, seed)[1].pow(2).mean())
