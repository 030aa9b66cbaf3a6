"""The native-objective loss of a ComfyUI MODEL on training latents at fixed noise levels and noise.

Shared by the tests (through a test-only node) and the benchmarks, so both judge training the same way: every latent
is noised at ``points`` sigmas spread evenly over the model's own sigma table, with seeded noise, and the loss is
taken on the model's native prediction (see training/objectives.py).
"""
from __future__ import annotations

import sys

import torch


def pack_bridge():
    """The pack's ComfyUI glue as it was loaded (its module name depends on who loaded the pack)."""
    return next(m for name, m in sys.modules.items() if name.endswith("lora_trainer.nodes.comfy_bridge"))


def denoised_and_errors(model, samples: torch.Tensor, captions: list, seed: int, points: int = 8):
    """Denoised outputs and native errors of ``model`` on every latent of ``samples`` at every eval sigma."""
    import comfy.model_management

    bridge = pack_bridge()
    device = comfy.model_management.get_torch_device()
    comfy.model_management.load_models_gpu([model])
    x0 = [model.model.process_latent_in(s.unsqueeze(0).to(device))[0] for s in samples]
    captions = [captions[i if len(captions) > 1 else 0] for i in range(len(x0))]
    conds = bridge.SampleConditioning(model, captions, [tuple(x.shape) for x in x0], device)
    schedule = bridge.ComfySchedule(model.model.model_sampling, device)
    gen = torch.Generator().manual_seed(seed)
    outs, errors = [], []
    with torch.no_grad():
        for k in range(points):
            sigma = schedule.sigmas[int((k + 0.5) * len(schedule.sigmas) / points)].reshape(1).to(device)
            for i, x in enumerate(x0):
                x = x.unsqueeze(0)
                noise = torch.randn(x.shape, generator=gen).to(device)
                x_t = schedule.noisy(sigma, noise, x)
                denoised = model.model.apply_model(x_t, sigma, **conds.batch([i])).float()
                outs.append(denoised.cpu())
                errors.append(((denoised - x.float()) / schedule.output_scale(sigma, x_t)).cpu())
    return torch.cat(outs), torch.cat(errors)


def eval_loss(model, samples: torch.Tensor, captions: list, seed: int = 123) -> float:
    """Mean squared native error (the MSE objective) over the eval grid."""
    return float(denoised_and_errors(model, samples, captions, seed)[1].pow(2).mean())
