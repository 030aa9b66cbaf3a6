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
    """The model's noising process. Optional members, read with getattr by training.timesteps (a schedule without them
    gets the default sampling, and what needs them is refused by name):

    * ``prediction: str``: what the network outputs, 'eps', 'v' (σ_data = 1), 'flow' (rectified flow,
      x_t = (1−σ)·x0 + σ·ε), 'x0' or 'other'. Min-SNR weighting and flow shifts depend on it.
    * ``flow_shift: float | None``: a flow model's own shift s, when its table is σ = s·t/(1+(s−1)·t) at t = i/N.
    * ``flow_shift_for(latent_shape) -> float | None``: the shift the model's own sampling uses for a micro-batch of
      latents of this shape (batch, channels, ...), None when it does not depend on the latents' size.
    """

    sigmas: torch.Tensor  # the noise levels the model was trained on, ascending; the default draws them uniformly

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
