"""The training loop: micro-batches, gradient accumulation, optimizer steps, progress, cancel, loss history."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from . import objectives, optimizers
from .schedules import LRSchedule
from .timesteps import TimestepSampling
from .flat_params import FlatParams
from .inplace_safe import CopyOnWrite, protected
from .data import Group, micro_batches, to_device
from .distributed import Ranks
from .ema import EMA
from .sample_schedule import SampleSchedule
from .train_state import TrainState

log = logging.getLogger("lora_trainer")
# A non-finite loss or gradient skips its step; this many in a row mean the run has diverged and it stops.
MAX_NON_FINITE_IN_A_ROW = 5

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
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    max_grad_norm: float = 0.0  # clip the gradients' global L2 norm to this; 0 = no clipping
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    ema_decay: float = 0.0  # > 0: the weights returned are an exponential moving average with this decay


@dataclass
class StepReport:
    step: int  # steps (applied or skipped) done in this run
    steps: int
    loss: float | None  # None when the step was skipped (its loss or gradients were not finite)
    smoothed_loss: float | None
    learning_rate: float
    elapsed_s: float
    eta_s: float
    skipped: bool = False
    grad_norm: float | None = None  # the gradients' global L2 norm before clipping (None when skipped)
    sampling_s: float = 0.0  # time this run spent rendering samples so far (not in elapsed_s nor in the ETA)


@dataclass
class Callbacks:
    cancelled: Callable[[], bool] = lambda: False
    micro_step: Callable[[], None] = lambda: None
    step: Callable[[StepReport], None] = lambda report: None
    # Exceptions that mean "the user cancelled" when raised inside a micro-step (forward, backward or callback).
    cancel_exceptions: tuple[type[BaseException], ...] = ()
    # Every this many steps (not after the last one) the run's resumable state goes to ``checkpoint``; 0 = never.
    checkpoint_every: int = 0
    checkpoint: Callable[[TrainState], None] = lambda state: None
    # Sample images of the LoRA as it is: ``sample(step)`` when ``sample_schedule`` says (step 0 = before training),
    # without gradients and with the global RNG put back after. A cancel exception raised in it stops the run,
    # keeping the finished steps. Its time is counted apart from training's.
    sample_schedule: SampleSchedule = field(default_factory=SampleSchedule)
    sample: Callable[[int], None] = lambda step: None


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)  # one per applied optimizer step (mean over accumulation)
    learning_rates: list[float] = field(default_factory=list)  # the rate each applied step used
    grad_norms: list[float] = field(default_factory=list)  # each applied step's gradient norm before clipping
    skipped: list[int] = field(default_factory=list)  # numbers (1-based) of the steps skipped as non-finite
    cancelled: bool = False
    diverged: bool = False  # stopped after MAX_NON_FINITE_IN_A_ROW skipped steps; the weights are the last finite
    sampled: list[int] = field(default_factory=list)  # the steps whose samples were rendered (0 = before training)
    sampling_s: float = 0.0  # seconds spent rendering samples
    training_s: float = 0.0  # seconds spent training (from the first step to the end, less sampling)

    @property
    def steps_done(self) -> int:
        """Optimizer steps applied to the weights."""
        return len(self.losses)


class _Cancel(Exception):
    pass


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


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """The global RNG (CPU, and the training GPU's) as it was before the block, whatever the block draws from it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield


def _sample(step: int, flat: FlatParams, ema: EMA | None, callbacks: Callbacks, result: Result,
            device: torch.device) -> bool:
    """Renders the samples of ``step`` with the weights the run would return now (EMA's average when on); False when
    the user cancelled during it. Training's generator is not reachable from here; the global RNG is put back."""
    began = time.monotonic()
    try:
        with torch.no_grad(), _rng_kept(device), ema.applied(flat) if ema is not None else contextlib.nullcontext():
            callbacks.sample(step)
    except callbacks.cancel_exceptions:
        return False
    finally:
        result.sampling_s += time.monotonic() - began
    result.sampled.append(step)
    return True


def train(params: Iterable[torch.nn.Parameter], groups: list[Group], denoise: DenoiseFn, schedule: objectives.Schedule,
          settings: Settings, generator: torch.Generator, callbacks: Callbacks = Callbacks(),
          resume: TrainState | None = None, ranks: Ranks = Ranks()) -> Result:
    """Trains ``params`` (fp32 master weights) in place. Every random draw comes from ``generator``. With ``resume``
    the run continues from that state (weights, optimizer, generator, data position, history) at its step. With
    several ``ranks`` (torch.distributed) each trains its share of every global micro-batch of
    batch_size × world rows, and the gradients are summed across ranks once per step (see ``distributed``)."""
    flat = FlatParams(params)
    ema = EMA(flat, settings.ema_decay) if settings.ema_decay else None
    try:
        result = _train(flat, ema, groups, denoise, schedule, settings, generator, callbacks, resume, ranks)
        if ema is not None:  # the average is the result, also of a cancelled or diverged run
            ema.copy_to(flat)
        return result
    finally:
        flat.release_grads()


def _train(flat: FlatParams, ema: EMA | None, groups: list[Group], denoise: DenoiseFn, schedule: objectives.Schedule,
           settings: Settings, generator: torch.Generator, callbacks: Callbacks, resume: TrainState | None,
           ranks: Ranks) -> Result:
    opt = optimizers.build(settings.optimizer, flat.tensors, settings.learning_rate)
    device = flat.tensors[0].device  # where the adapters, and so the model, train
    batches = micro_batches(groups, settings.batch_size * ranks.world, generator)
    result = Result()
    smoothed = None
    non_finite_in_a_row = 0
    first = 0
    if resume is not None:
        resume.restore(flat, opt, generator, batches, ema)
        first, smoothed, non_finite_in_a_row = resume.step, resume.smoothed, resume.non_finite_in_a_row
        result.losses, result.skipped = list(resume.losses), list(resume.skipped)
        result.learning_rates, result.grad_norms = list(resume.learning_rates), list(resume.grad_norms)
    # A cancel during sampling stops the run at the next micro-step, so that it reaches every rank of a data-parallel
    # run the way any cancel does (only rank 0 samples; the others wait for it at the next gradient sum).
    cancel_pending = callbacks.sample_schedule.at_step_zero(first) and not _sample(0, flat, ema, callbacks, result,
                                                                                      device)
    start, sampled_before = time.monotonic(), result.sampling_s
    for step in range(first, settings.steps):
        lr = settings.learning_rate * settings.lr_schedule.factor(step, settings.steps)
        for param_group in opt.param_groups:
            param_group["lr"] = lr
        total = 0.0
        stop = False
        for _ in range(settings.grad_accumulation_steps):
            try:
                if cancel_pending or callbacks.cancelled():
                    raise _Cancel()
                group, rows = next(batches)
                shape = (len(rows), *group.shape)
                # drawn for the whole global batch on every rank, so each rank's share is what one process draws
                noise = group.noise(len(rows), settings.timesteps.noise, generator)
                sigma = settings.timesteps.sigmas(schedule, len(rows), generator, shape)
                mine = ranks.share(len(rows))
                if mine.stop > mine.start:
                    # the data set waits off the training device: only this rank's rows are loaded and go there
                    x0 = to_device(group.rows(rows[mine]), device)
                    ids = [group.sample_ids[r] for r in rows[mine]]
                    per_sample = sample_loss(denoise, schedule, x0, ids, noise[mine], sigma[mine],
                                             settings.loss_function, settings.compute_dtype)
                    weights = settings.timesteps.loss_weights(schedule, sigma[mine])
                    weighted = per_sample if weights is None else per_sample * weights.to(per_sample.device)
                    # one process: the batch mean; a rank: its rows' part of the global batch mean (summed later)
                    loss = weighted.mean() if ranks.world == 1 else weighted.sum() / len(rows)
                    (loss / settings.grad_accumulation_steps).backward()
                    total += float(loss.detach())
                callbacks.micro_step()
            except (_Cancel, *callbacks.cancel_exceptions):
                stop = True
                break
        mean, stop = ranks.sum_gradients_and([f.grad for f in flat.tensors], total / settings.grad_accumulation_steps,
                                             stop)
        if stop:  # a cancel (on any rank): keep what the finished steps trained, drop the half-accumulated gradients
            flat.zero_grad()
            result.cancelled = True
            return result
        elapsed = time.monotonic() - start - (result.sampling_s - sampled_before)  # training time only
        result.training_s = elapsed
        eta = elapsed / (step + 1 - first) * (settings.steps - step - 1)
        grad_norm = flat.grad_norm()
        # A NaN/inf loss or gradient never reaches the weights nor the optimizer's state. (With finite gradients the
        # weights stay finite: Adam(W) and RMSprop move each weight by a bounded multiple of lr, SGD by lr·grad.)
        if math.isfinite(mean) and math.isfinite(grad_norm):
            if 0 < settings.max_grad_norm < grad_norm:
                flat.scale_grads(settings.max_grad_norm / grad_norm)
            opt.step()
            if ema is not None:
                ema.update(flat)
            flat.zero_grad()
            result.losses.append(mean)
            result.learning_rates.append(lr)
            result.grad_norms.append(grad_norm)
            non_finite_in_a_row = 0
            smoothed = mean if smoothed is None else 0.9 * smoothed + 0.1 * mean
            callbacks.step(StepReport(step + 1, settings.steps, mean, smoothed, lr, elapsed, eta, grad_norm=grad_norm,
                                      sampling_s=result.sampling_s))
        else:
            flat.zero_grad()
            result.skipped.append(step + 1)
            non_finite_in_a_row += 1
            log.warning("step %d skipped: its loss (%s) or gradients are not finite; the LoRA stays as it was",
                        step + 1, mean)
            callbacks.step(StepReport(step + 1, settings.steps, None, smoothed, lr, elapsed, eta, skipped=True,
                                      sampling_s=result.sampling_s))
            if non_finite_in_a_row == MAX_NON_FINITE_IN_A_ROW:
                result.diverged = True
                return result
        if callbacks.checkpoint_every and (step + 1) % callbacks.checkpoint_every == 0 and step + 1 < settings.steps:
            state = TrainState.capture(step + 1, flat, opt, generator, batches, result, smoothed, non_finite_in_a_row,
                                       ema)
            with ema.applied(flat) if ema is not None else contextlib.nullcontext():  # what is saved is the result
                callbacks.checkpoint(state)
        if callbacks.sample_schedule.due(step + 1, settings.steps):
            cancel_pending = not _sample(step + 1, flat, ema, callbacks, result, device)
    result.cancelled = result.cancelled or cancel_pending  # cancelled while sampling after the last step
    return result
