"""The model's native training objective and the four loss functions.

ComfyUI models return the denoised estimate x̂0 = a(σ)·x_t + b(σ)·out, an affine function of the network output
``out`` (ε, v, flow velocity or x0, depending on the model type). The native target is the output that would give
x̂0 = x0 exactly, so ``out − target = (x̂0 − x0) / b(σ)``: we take every loss on that difference, i.e. in the space the
model was trained to predict, whatever its type. The schedule (how x_t is formed, what b(σ) is, which sigmas exist)
comes from the model itself, through a ``Schedule``.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Schedule(Protocol):
    sigmas: torch.Tensor  # the noise levels the model was trained on; we draw from them uniformly

    def noisy(self, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x_t for clean latents ``x0`` at per-sample noise levels ``sigma``."""

    def output_scale(self, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """b(σ) = ∂x̂0/∂out, broadcastable against ``like``."""


def native_error(denoised: torch.Tensor, x0: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Native prediction minus native target, computed in fp32."""
    return (denoised.float() - x0.float()) / scale.float()


LOSSES = ("MSE", "L1", "Huber", "SmoothL1")


def per_sample_loss(error: torch.Tensor, name: str) -> torch.Tensor:
    """Loss of each sample (mean over all but the batch dimension) for a prediction error tensor."""
    zero = torch.zeros_like(error)
    if name == "MSE":
        elem = F.mse_loss(error, zero, reduction="none")
    elif name == "L1":
        elem = F.l1_loss(error, zero, reduction="none")
    elif name == "Huber":
        elem = F.huber_loss(error, zero, reduction="none", delta=1.0)
    elif name == "SmoothL1":
        elem = F.smooth_l1_loss(error, zero, reduction="none", beta=1.0)
    else:
        raise ValueError(f"loss_function '{name}' is not one of {', '.join(LOSSES)}")
    return elem.flatten(1).mean(1)
