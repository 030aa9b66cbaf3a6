"""The training loop: micro-batches, gradient accumulation, optimizer steps, progress, cancel, loss history."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import objectives, optimizers
from .flat_params import FlatParams
from .inplace_safe import CopyOnWrite, protected
from .data import Group, micro_batches

# denoise(x_t, sigma, sample_ids) -> ComfyUI's denoised estimate x̂0 for those samples (their own captions).
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


@dataclass
class Settings:
    steps: int
    batch_size: int = 1
    grad_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    optimizer: str = "AdamW"
    loss_function: str = "MSE"
    compute_dtype: torch.dtype | None = None  # autocast dtype; None = the model's own


@dataclass
class StepReport:
    step: int  # optimizer steps done in this run
    steps: int
    loss: float
    smoothed_loss: float
    learning_rate: float
    elapsed_s: float
    eta_s: float


@dataclass
class Callbacks:
    cancelled: Callable[[], bool] = lambda: False
    micro_step: Callable[[], None] = lambda: None
    step: Callable[[StepReport], None] = lambda report: None
    # Exceptions that mean "the user cancelled" when raised inside a micro-step (forward, backward or callback).
    cancel_exceptions: tuple[type[BaseException], ...] = ()


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)  # one per completed optimizer step (mean over accumulation)
    cancelled: bool = False

    @property
    def steps_done(self) -> int:
        return len(self.losses)


class _Cancel(Exception):
    pass


def draw_sigmas(schedule: objectives.Schedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample noise levels, uniformly from the model's own table of training sigmas."""
    table = schedule.sigmas
    return table[torch.randint(0, len(table), (n,), generator=generator)]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sample_loss(denoise: DenoiseFn, schedule: objectives.Schedule, x0: torch.Tensor, ids: list[int],
                noise: torch.Tensor, sigma: torch.Tensor, loss_function: str,
                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sample native-objective loss of the model on ``x0`` at the given noise and sigmas."""
    sigma = sigma.to(x0.device)
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    x_t = schedule.noisy(sigma, noise, x0)
    # ComfyUI's model code writes into tensors in place; ``protected`` keeps backward correct through that.
    with autocast(x0.device, compute_dtype), protected(CopyOnWrite()):
        denoised = denoise(x_t, sigma, ids)
    error = objectives.native_error(denoised, x0, schedule.output_scale(sigma, x0))
    return objectives.per_sample_loss(error, loss_function)


def train(params: Iterable[torch.nn.Parameter], groups: list[Group], denoise: DenoiseFn, schedule: objectives.Schedule,
          settings: Settings, generator: torch.Generator, callbacks: Callbacks = Callbacks()) -> Result:
    """Trains ``params`` (fp32 master weights) in place. Every random draw comes from ``generator``."""
    flat = FlatParams(params)
    try:
        return _train(flat, groups, denoise, schedule, settings, generator, callbacks)
    finally:
        flat.release_grads()


def _train(flat: FlatParams, groups: list[Group], denoise: DenoiseFn, schedule: objectives.Schedule,
           settings: Settings, generator: torch.Generator, callbacks: Callbacks) -> Result:
    opt = optimizers.build(settings.optimizer, flat.tensors, settings.learning_rate)
    batches = micro_batches(groups, settings.batch_size, generator)
    result = Result()
    smoothed = None
    start = time.monotonic()
    for step in range(settings.steps):
        total = 0.0
        for _ in range(settings.grad_accumulation_steps):
            try:
                if callbacks.cancelled():
                    raise _Cancel()
                group, rows = next(batches)
                x0 = group.latents[rows]
                noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
                sigma = draw_sigmas(schedule, len(rows), generator)
                ids = [group.sample_ids[r] for r in rows]
                loss = sample_loss(denoise, schedule, x0, ids, noise, sigma, settings.loss_function,
                                   settings.compute_dtype).mean()
                (loss / settings.grad_accumulation_steps).backward()
                total += float(loss.detach())
                callbacks.micro_step()
            except (_Cancel, *callbacks.cancel_exceptions):
                # Keep what the finished optimizer steps trained; drop the half-accumulated gradients.
                flat.zero_grad()
                result.cancelled = True
                return result
        opt.step()
        flat.zero_grad()
        mean = total / settings.grad_accumulation_steps
        result.losses.append(mean)
        smoothed = mean if smoothed is None else 0.9 * smoothed + 0.1 * mean
        elapsed = time.monotonic() - start
        callbacks.step(StepReport(step + 1, settings.steps, mean, smoothed, opt.param_groups[0]["lr"], elapsed,
                                  elapsed / (step + 1) * (settings.steps - step - 1)))
    return result
