"""Unit tests of sampling while training, without ComfyUI: when the loop samples (training.sample_schedule), that a
sampling callback that draws random numbers, runs the model and even tries to train changes nothing of the run, that
its time is counted apart, and that a cancel during it keeps the finished steps."""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from lora.injection import attached  # noqa: E402
from tests.test_training_unit import gen, params_of, run_train, toy_problem  # noqa: E402
from training import loop  # noqa: E402
from training.sample_schedule import SampleSchedule  # noqa: E402

pytestmark = pytest.mark.fast


def test_schedule_every_n_steps_the_last_step_and_step_zero():
    assert SampleSchedule(3, True).planned(10) == [0, 3, 6, 9, 10]
    assert SampleSchedule(5, False).planned(10) == [5, 10]
    assert SampleSchedule(20, True).planned(10) == [0, 10]
    assert SampleSchedule(3, True).planned(10, first=4) == [6, 9, 10]  # a resumed run: no step 0, same multiples
    assert SampleSchedule(0, True).planned(10) == [] and not SampleSchedule().enabled


class Sampler:
    """A sampling callback as rough as a real one: runs the model, draws from the global RNG, sleeps."""

    def __init__(self, model_forward, cancel_at: int | None = None, exception: type[BaseException] = KeyboardInterrupt):
        self.forward, self.cancel_at, self.exception = model_forward, cancel_at, exception
        self.steps: list[int] = []
        self.grad_enabled: list[bool] = []

    def __call__(self, step: int) -> None:
        self.steps.append(step)
        self.grad_enabled.append(torch.is_grad_enabled())
        torch.randn(100)  # ComfyUI's prepare_noise seeds and draws from the global RNG
        torch.manual_seed(step)
        self.forward(torch.randn(3, 8))
        time.sleep(0.01)
        if step == self.cancel_at:
            raise self.exception()


def sampled_run(make_sampler, steps: int = 6, **settings):
    """run_train's toy run (seed 1) with samples at step 0 and every 2 steps; ``make_sampler(net, adapters)``."""
    net, aset, groups, sched, denoise = toy_problem(1)
    sampler = make_sampler(net, aset)
    callbacks = loop.Callbacks(sample_schedule=SampleSchedule(2, True), sample=sampler,
                               cancel_exceptions=(KeyboardInterrupt,))
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=steps, batch_size=2, learning_rate=0.05, optimizer="Adam", **settings),
                            gen(1), callbacks)
    return result, aset, sampler


def test_sampling_changes_nothing_of_the_run_and_its_time_is_apart():
    torch.manual_seed(1234)  # the toy model's nn.Linear draws its initial weights from the global RNG
    reference, ref_set, _ = run_train(seed=1, steps=6)
    without = torch.random.get_rng_state()
    torch.manual_seed(1234)
    result, aset, sampler = sampled_run(lambda net, _: Sampler(net))
    assert torch.equal(torch.random.get_rng_state(), without), "the global RNG is put back after each sampling"
    assert result.losses == reference.losses
    assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(ref_set)))
    assert sampler.steps == result.sampled == [0, 2, 4, 6]
    assert sampler.grad_enabled == [False] * 4
    assert result.sampling_s >= 0.04 and result.training_s > 0


@pytest.mark.parametrize("cancel_at, steps_kept", [(0, 0), (2, 2), (6, 6)])
def test_a_cancel_during_sampling_keeps_the_finished_steps(cancel_at, steps_kept):
    result, aset, sampler = sampled_run(lambda net, _: Sampler(net, cancel_at))
    assert result.cancelled and result.steps_done == steps_kept
    assert sampler.steps[-1] == cancel_at and result.sampled == sampler.steps[:-1]
    reference, ref_set, _ = run_train(seed=1, steps=steps_kept)
    assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(ref_set)))


def test_samples_of_an_ema_run_show_the_average_and_training_goes_on_unchanged():
    seen = []

    def make(net, adapters):
        sampler = Sampler(net)
        return lambda step: (seen.append(torch.cat([p.detach().flatten() for p in adapters.trainable()])),
                             sampler(step))

    result, aset, _ = sampled_run(make, ema_decay=0.5)
    reference, ref_set, _ = run_train(seed=1, steps=6, ema_decay=0.5)
    assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(ref_set)))
    # the samples after the last step show what the run returns: the average
    assert torch.equal(seen[-1], torch.cat([p.detach().flatten() for p in aset.trainable()]))
    assert not torch.equal(seen[1], seen[2])
