"""How each training sample gets its noise level and noise, and how much its loss counts.

Default: a noise level drawn uniformly from the model's own table of training sigmas, plain Gaussian noise, weight 1
(what the node has always done, draw for draw).

Beyond the default, a noise level is chosen in two stages. First a *timestep fraction* u in (0, 1) is drawn (uniform or
logit-normal): 0 is clean, 1 pure noise, the same axis as the model's own timesteps (position in its ascending sigma
table) and, for rectified-flow models, the unshifted flow time t. Then u becomes a sigma:

* ε-, v- and x0-prediction models (and any model this module knows too little about) take the table entry whose bin
  holds u. Their networks only know the table's timesteps: ComfyUI's discrete sampling hands the network the timestep of
  the *nearest* table sigma, so an in-between sigma would noise the latent at one level while telling the network
  another.
* Rectified-flow models take σ = s·u/(1+(s−1)·u) directly, with s their own shift (what their table is built from) or
  the one asked for here. Their network takes σ itself (scaled) as a continuous timestep, so any σ in (0, 1] is valid;
  snapping to ComfyUI's 1000- or 10000-entry table would only quantise the distribution asked for.

The Schedule's optional ``prediction``, ``flow_shift`` and ``flow_shift_for`` (see training.objectives.Schedule) tell
which case applies; a schedule without them gets everything except what needs them, which is refused by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import objectives

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow time ``t`` shifted by ``shift``: s·t/(1+(s−1)·t). s > 1 moves the noise levels towards pure noise (it adds
    log s to logit(t)); s = 1 leaves them as they are; shifts compose by multiplying."""
    return shift * t / (1 + (shift - 1) * t)


def _check_number(name: str, value: object, *, minimum: float | None = None, above: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: {value!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value} must be ≥ {minimum:g}")
    if above is not None and value <= above:
        raise ValueError(f"{name}: {value} must be > {above:g}")


def prediction_of(schedule: objectives.Schedule) -> str:
    """What the model's network outputs: 'eps', 'v', 'flow', 'x0' or 'other' (also for a schedule that does not say)."""
    return getattr(schedule, "prediction", "other")


@dataclass(frozen=True)
class TimestepSampling:
    kind: str = "uniform"
    """How the timestep fraction is drawn. "uniform" (default): uniformly over the model's timesteps (with no shift this
    is exactly the old draw: a uniform entry of the model's sigma table). "logit_normal": u = sigmoid(logit_mean +
    logit_std·z), z ~ N(0, 1), which concentrates training on middle noise levels (as SD3 was trained). Errors about it
    are named ``timestep_sampling``."""

    logit_mean: float = 0.0
    """kind="logit_normal" only: the mean of logit(u). 0 (default) centres the draws on the middle timestep; > 0 moves
    them towards noise, < 0 towards clean. Any finite number."""

    logit_std: float = 1.0
    """kind="logit_normal" only: the standard deviation of logit(u); default 1. Smaller concentrates the draws, larger
    spreads them towards both ends. Finite, > 0."""

    shift: float = 0.0
    """Flow-matching models only. 0 (default): the model's own shift (its sigma table as it is). > 0: train at this
    shift instead of the model's own, σ = shift·u/(1+(shift−1)·u); 1 is unshifted, 3 is SD3's own, larger puts more
    weight on high noise (composition, large images). Finite, ≥ 0; not together with resolution_shift. Refused (by
    name) for models that are not flow models."""

    resolution_shift: bool = False
    """Flow-matching models whose own sampling shifts with image size (Flux-type: Flux, Chroma, Qwen-Image): False
    (default) = their fixed shift. True: each micro-batch uses the shift the model's sampling gives for its latents'
    size (ComfyUI's ModelSamplingFlux formula: the model's own shift at 1024², less for smaller images, more for
    larger ones).
    Not together with shift; refused (by name) for models without a resolution-dependent shift."""

    min_snr_gamma: float = 0.0
    """Min-SNR-γ loss weighting. 0 (default): off, every sample weighs 1. > 0: each sample's loss is multiplied by
    min(SNR, γ)/SNR for ε-prediction and min(SNR, γ)/(SNR+1) for v-prediction models (SNR = 1/σ²), i.e. its loss in
    x0-space weighs min(SNR, γ): low-noise samples stop dominating. The weights are ≤ 1; 5 is the usual γ. Finite,
    ≥ 0. Refused (by name) for flow, x0 and other models: it is defined for ε/v objectives only (see loss_weights)."""

    noise_offset: float = 0.0
    """Noise offset. 0 (default): off. > 0: each sample's noise gets noise_offset·N(0, 1) added per channel, the same
    over all its pixels (and frames), which lets the model learn to change an image's overall brightness and colour
    (very dark or bright images). Usual values 0.03–0.1. Finite, ≥ 0."""

    def __post_init__(self) -> None:
        if self.kind not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: '{self.kind}' is not one of {', '.join(TIMESTEP_SAMPLINGS)}")
        _check_number("logit_mean", self.logit_mean)
        _check_number("logit_std", self.logit_std, above=0.0)
        _check_number("shift", self.shift, minimum=0.0)
        if not isinstance(self.resolution_shift, bool):
            raise ValueError(f"resolution_shift: {self.resolution_shift!r} is not True or False")
        if self.shift > 0 and self.resolution_shift:
            raise ValueError("shift, resolution_shift: choose one (a fixed shift, or the model's own "
                             "resolution-dependent one)")
        _check_number("min_snr_gamma", self.min_snr_gamma, minimum=0.0)
        _check_number("noise_offset", self.noise_offset, minimum=0.0)

    # -- noise ----------------------------------------------------------------------------------------------------
    def noise(self, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
        """The Gaussian noise of a micro-batch of latents of ``shape`` (drawn before the sigmas); with a noise offset
        the offset's draws (one per sample and channel) follow the noise's."""
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if self.noise_offset > 0:
            per_channel = tuple(shape[:2]) + (1,) * (len(shape) - 2)  # broadcast over every spatial (and time) dim
            noise = noise + self.noise_offset * torch.randn(per_channel, generator=generator, dtype=torch.float32)
        return noise

    # -- noise levels ---------------------------------------------------------------------------------------------
    def check(self, schedule: objectives.Schedule, latent_shape: tuple[int, ...] | None = None) -> None:
        """Raises ValueError, naming the field, when this sampling does not apply to the model behind ``schedule``
        (``latent_shape`` only matters for resolution_shift). sigmas() and loss_weights() check too; calling this once
        before training reports the problem before any work."""
        prediction = prediction_of(schedule)
        for name, wanted in (("shift", self.shift > 0), ("resolution_shift", self.resolution_shift)):
            if wanted and prediction != "flow":
                raise ValueError(f"{name}: applies to flow-matching models only; this model's prediction type is "
                                 f"'{prediction}'")
        if self.resolution_shift and latent_shape is not None:
            self.flow_shift(schedule, latent_shape)
        if self.min_snr_gamma > 0 and prediction not in ("eps", "v"):
            raise ValueError(f"min_snr_gamma: min-SNR weighting is defined for ε- and v-prediction models; this "
                             f"model's prediction type is '{prediction}' (for flow models use logit_normal sampling "
                             f"or a shift instead)")

    def flow_shift(self, schedule: objectives.Schedule, latent_shape: tuple[int, ...] | None = None) -> float | None:
        """The shift s that a flow model's sigmas are drawn with (σ = s·u/(1+(s−1)·u)) for latents of
        ``latent_shape``, or None where they come from the model's table instead (not a flow model, or its sampling is
        not a plain shift)."""
        if prediction_of(schedule) != "flow":
            return None
        if self.shift > 0:
            return float(self.shift)
        if self.resolution_shift:
            if latent_shape is None:
                raise ValueError("resolution_shift: needs the latents' shape (sigmas(..., latent_shape))")
            shift_for = getattr(schedule, "flow_shift_for", None)
            shift = shift_for(tuple(latent_shape)) if shift_for is not None else None
            if shift is None:
                raise ValueError(f"resolution_shift: this model's sampling has no resolution-dependent shift for "
                                 f"latents of shape {tuple(latent_shape)} (a fixed shift can be set with shift)")
            return float(shift)
        own = getattr(schedule, "flow_shift", None)
        return None if own is None else float(own)

    def sigmas(self, schedule: objectives.Schedule, n: int, generator: torch.Generator,
               latent_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Per-sample noise levels for ``n`` samples of a micro-batch of latents of ``latent_shape``."""
        table = schedule.sigmas
        if self.kind == "uniform" and self.shift == 0 and not self.resolution_shift:
            # The default, unchanged: one randint per micro-batch. (Uniform u binned into the table would give the
            # same distribution, but other draws, and default runs must stay bit-identical.)
            return table[torch.randint(0, len(table), (n,), generator=generator)]
        self.check(schedule)
        shift = self.flow_shift(schedule, latent_shape)  # refuses a resolution_shift the model has none for
        u = self._fractions(n, generator)
        if shift is not None:
            # Never σ = 0 (where the flow target is undefined and the loss would divide by zero): u stays at or above
            # the table's first timestep, as ComfyUI's own flow tables do (they start at t = 1/N).
            return shifted(u.clamp(min=1.0 / len(table)), shift).to(table.dtype)
        index = (u * len(table)).long().clamp(0, len(table) - 1)  # u's bin among len(table) equal ones
        return table[index]

    def _fractions(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n timestep fractions in [0, 1] (0 = clean)."""
        if self.kind == "logit_normal":
            z = torch.randn(n, generator=generator, dtype=torch.float32)
            return torch.sigmoid(self.logit_mean + self.logit_std * z)
        return torch.rand(n, generator=generator, dtype=torch.float32)

    # -- loss weights ---------------------------------------------------------------------------------------------
    def loss_weights(self, schedule: objectives.Schedule, sigma: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights at these noise levels, or None for all ones.

        Min-SNR-γ caps each sample's weight in x0-space at γ (its native loss is SNR·(x0 loss) for ε-prediction,
        (SNR+1)·(x0 loss) for v, with SNR = 1/σ² for ComfyUI's x_t = x0 + σ·ε). It is refused for flow models: their
        signal is scaled by 1−σ, so SNR = ((1−σ)/σ)², and applying the formula to the velocity loss would drive the
        weight of pure-noise samples to 0, an invention no trainer's min_snr_gamma means; flow models are steered by
        where their sigmas are drawn instead (logit_normal, shift), as their authors do. An x0-predicting model's loss
        already is the x0 loss, where min-SNR would only up-weigh samples (weights up to γ)."""
        if self.min_snr_gamma == 0:
            return None
        self.check(schedule)
        variance = sigma.double().square()  # σ² = 1/SNR
        # min(SNR, γ)/SNR = min(1, γσ²), written so that it stays finite for any σ in the table
        eps_weight = (self.min_snr_gamma * variance).clamp(max=1.0)
        if prediction_of(schedule) == "eps":
            return eps_weight.float()
        return (eps_weight / (1.0 + variance)).float()  # v: min(SNR, γ)/(SNR+1) = min(1, γσ²)/(1+σ²)
