"""The run's peak memory, estimated before its first step from one fake-tensor forward (training/memory_estimate.py),
printed, and compared with the device's free memory: over it, the message names the settings that would fit."""
from __future__ import annotations

import logging

import torch

import comfy.model_management

from ..training import loop
from ..training.checkpointing import repeated_blocks
from ..training.memory_estimate import GiB, Estimate, Plan, estimate, fake_tensors, profile_activations, \
    settings_that_fit
from . import comfy_bridge, events

log = logging.getLogger("lora_trainer")


def plan_of(clone, adapters, conditioning, schedule, shape: tuple[int, ...], sample: int, *, optimizer: str, batch_size: int,
            checkpointing: bool, loss_function: str, autocast: torch.dtype | None) -> Plan:
    """The run's plan: weights as loaded, trained values, and one sample's activations at ``shape`` (a latent in the
    model's space, that of data-set sample ``sample``) from a fake forward of the adapted model (hooks attached, no checkpointing)."""
    model = clone.model
    root = model.diffusion_model
    weights = [*model.parameters(), *model.buffers()]
    denoise = comfy_bridge.denoiser(clone, conditioning)
    device = next((p.device for p in adapters.trainable()), torch.device("cpu"))

    def forward() -> torch.Tensor:
        x0 = torch.zeros((1, *shape), device=device)
        sigma = schedule.sigmas[len(schedule.sigmas) // 2].reshape(1).to(device)
        return loop.sample_loss(denoise, schedule, x0, [sample], torch.zeros_like(x0), sigma, loss_function, autocast)

    with fake_tensors(), torch.enable_grad():
        profile = profile_activations(forward, repeated_blocks(root))
    return Plan(weight_bytes=sum(t.numel() * t.element_size() for t in {id(w): w for w in weights}.values()),
                trained_values=sum(p.numel() for p in adapters.trainable()), optimizer=optimizer,
                batch_size=batch_size, checkpointing=checkpointing, activations=profile)


def fp8_bytes(clone) -> int:
    """The weights' bytes with every matrix in float8_e4m3fn (what Load Diffusion Model's fp8 weight_dtype loads)."""
    return sum(t.numel() * (1 if t.ndim >= 2 else t.element_size())
               for t in {id(w): w for w in [*clone.model.parameters(), *clone.model.buffers()]}.values())


def report(clone, node_id, device: torch.device, plan: Plan) -> Estimate:
    """Prints the estimate; when it exceeds what the device has free (plus what the model already holds there),
    says so and names the settings whose estimate fits."""
    est = estimate(plan)
    free = comfy.model_management.get_free_memory(device)
    held = clone.loaded_size() if hasattr(clone, "loaded_size") else 0  # weights already on the device
    available = free + held
    message = f"estimated peak memory of training: {est.describe()}; {available / GiB:.2f} GiB available on {device}"
    fits = est.total <= available
    suggestions: list[str] = []
    if fits:
        log.info(message)
    else:
        suggestions = settings_that_fit(plan, available, fp8_bytes(clone))
        advice = ("; would fit with " + " or ".join(suggestions)) if suggestions else \
            "; no single change of checkpointing, fp8 base, batch or resolution makes it fit"
        log.warning("%s: it may run out of memory%s", message, advice)
    events.send("memory", {"node": node_id, "estimate": est.total, "parts": vars(est), "available": available,
                           "fits": fits, "suggestions": suggestions})
    return est


def estimate_and_report(clone, adapters, conditioning, schedule, shape: tuple[int, ...], sample: int, node_id,
                        device: torch.device, **settings) -> Estimate | None:
    """``report`` of ``plan_of``; None (and a debug line) where the model's forward cannot run on fake tensors: the
    estimate never stops a run."""
    try:
        plan = plan_of(clone, adapters, conditioning, schedule, shape, sample, **settings)
    except Exception as e:  # noqa: BLE001 - a model whose forward needs real values: no estimate, training goes on
        log.debug("no memory estimate for this model: %s: %s", type(e).__name__, e)
        return None
    return report(clone, node_id, device, plan)
