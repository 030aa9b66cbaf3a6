"""Unit tests of what long runs need (issue 11): learning-rate schedules and gradient clipping in the loop."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from test_training_unit import gen, params_of, run_train, toy_problem  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import loop  # noqa: E402
from training.schedules import LRSchedule  # noqa: E402

pytestmark = pytest.mark.fast


def factors(schedule: LRSchedule, total: int) -> list[float]:
    return [schedule.factor(step, total) for step in range(total)]


# The values of every schedule, step by step: tests/test_schedules_unit.py.


@pytest.mark.parametrize("bad", [dict(kind="step"), dict(warmup_steps=-1), dict(min_lr_ratio=1.5), dict(cycles=0)])
def test_bad_schedules_are_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule(**bad)


def test_the_loop_uses_and_reports_the_scheduled_rate():
    reports = []
    schedule = LRSchedule("cosine", warmup_steps=3, min_lr_ratio=0.1)
    run_train(steps=10, learning_rate=0.02, lr_schedule=schedule, callbacks=loop.Callbacks(step=reports.append))
    assert [r.learning_rate for r in reports] == pytest.approx([0.02 * f for f in factors(schedule, 10)])


def test_a_schedule_changes_what_is_trained_exactly_as_scaling_sgd_steps():
    """SGD moves by lr·grad: a run at factor f per step equals, step for step, the gradients scaled by f."""
    warm, warm_set, _ = run_train(steps=4, optimizer="SGD", learning_rate=0.1, lr_schedule=LRSchedule(warmup_steps=4))
    flat, flat_set, _ = run_train(steps=4, optimizer="SGD", learning_rate=0.1)
    assert warm.losses[0] == flat.losses[0]  # the same first forward
    assert any(not torch.equal(a, b) for a, b in zip(params_of(warm_set), params_of(flat_set)))


def test_gradient_clipping_limits_the_update_and_reports_the_norm_before_clipping():
    """SGD at lr 1: the step moves the weights by exactly the clipped gradient, whose norm is max_grad_norm."""
    reports = []
    net, aset, groups, sched, denoise = toy_problem(0)
    before = torch.cat([p.detach().reshape(-1).clone() for p in aset.parameters()])
    with attached(net, aset):
        loop.train(aset.trainable(), groups, denoise, sched,
                   loop.Settings(steps=1, batch_size=2, learning_rate=1.0, optimizer="SGD", max_grad_norm=1e-4),
                   gen(0), loop.Callbacks(step=reports.append))
    after = torch.cat([p.detach().reshape(-1) for p in aset.parameters()])
    assert reports[0].grad_norm > 1e-4, "the test needs a gradient larger than the limit"
    assert float(torch.linalg.vector_norm(after - before)) == pytest.approx(1e-4, rel=1e-3)


def test_no_clipping_below_the_limit_and_by_default():
    clipped, clipped_set, _ = run_train(steps=3, max_grad_norm=1e9)
    plain, plain_set, _ = run_train(steps=3)
    assert clipped.losses == plain.losses
    assert all(torch.equal(a, b) for a, b in zip(params_of(clipped_set), params_of(plain_set)))
    reports = []
    run_train(steps=2, callbacks=loop.Callbacks(step=reports.append))
    assert all(r.grad_norm > 0 and math.isfinite(r.grad_norm) for r in reports)


# -- exact resume ----------------------------------------------------------------------------------------------------
def round_trip(state):
    """Through the file form (tensors + JSON strings), as a resume reads it back."""
    import json

    from training import train_state

    tensors, metadata = train_state.pack(state, {"note": "test"})
    metadata = json.loads(json.dumps(metadata))
    back, info = train_state.unpack({k: v.clone() for k, v in tensors.items()}, metadata, "test")
    assert info == {"note": "test"}
    return back


@pytest.mark.parametrize("optimizer", ["AdamW", "Adam", "SGD", "RMSprop"])
def test_a_resumed_run_is_bit_identical_to_one_that_never_stopped(optimizer):
    """Checkpoints every 3 steps of a 10-step run with batches that cross epoch boundaries; a fresh run resumed from
    any of them ends with the same weights and losses, bit for bit."""
    settings = dict(steps=10, batch_size=3, grad_accumulation_steps=2, learning_rate=0.05, optimizer=optimizer,
                    lr_schedule=LRSchedule("cosine", warmup_steps=2), max_grad_norm=0.5)
    states = []
    whole, whole_set, _ = run_train(seed=7, callbacks=loop.Callbacks(checkpoint_every=3, checkpoint=states.append),
                                    **settings)
    assert [s.step for s in states] == [3, 6, 9]
    for state in states:
        net, aset, groups, sched, denoise = toy_problem(7)
        with attached(net, aset):
            resumed = loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(**settings), gen(12345),
                                 resume=round_trip(state))
        assert resumed.losses == whole.losses and resumed.steps_done == 10
        assert resumed.learning_rates == whole.learning_rates and resumed.grad_norms == whole.grad_norms
        assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(whole_set))), state.step


def test_a_state_for_other_weights_is_refused():
    from training.train_state import StateError

    states = []
    run_train(steps=4, callbacks=loop.Callbacks(checkpoint_every=2, checkpoint=states.append))
    net, aset, groups, sched, denoise = toy_problem(0, "LoHa")
    with attached(net, aset), pytest.raises(StateError, match="another model or adapter"):
        loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(steps=4, batch_size=2), gen(0),
                   resume=states[0])


def test_a_file_that_is_no_state_is_refused():
    from training.train_state import StateError, unpack

    with pytest.raises(StateError, match="'x.safetensors' is not a training state file"):
        unpack({"w": torch.ones(1)}, {"manifest": '{"format": "lora_trainer.dataset/1"}'}, "x.safetensors")


# -- EMA -------------------------------------------------------------------------------------------------------------
def test_ema_weights_are_the_moving_average_of_the_trained_ones():
    net, aset, groups, sched, denoise = toy_problem(0)
    trajectory = [torch.cat([p.detach().reshape(-1).clone() for p in aset.parameters()])]
    with attached(net, aset):
        loop.train(aset.trainable(), groups, denoise, sched,
                   loop.Settings(steps=6, batch_size=2, learning_rate=0.05, ema_decay=0.8), gen(0),
                   loop.Callbacks(step=lambda r: trajectory.append(
                       torch.cat([p.detach().reshape(-1).clone() for p in aset.parameters()]))))
    expected = trajectory[0]
    for weights in trajectory[1:]:
        expected = 0.8 * expected + 0.2 * weights
    final = torch.cat([p.detach().reshape(-1) for p in aset.parameters()])
    torch.testing.assert_close(final, expected)
    assert not torch.equal(final, trajectory[-1]), "the result is the average, not the last step"


def test_a_resumed_run_with_ema_is_bit_identical_too():
    settings = dict(steps=8, batch_size=2, learning_rate=0.05, optimizer="Adam", ema_decay=0.9)
    states = []
    whole, whole_set, _ = run_train(seed=3, callbacks=loop.Callbacks(checkpoint_every=3, checkpoint=states.append),
                                    **settings)
    assert states[0].ema is not None
    net, aset, groups, sched, denoise = toy_problem(3)
    with attached(net, aset):
        loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(**settings), gen(0),
                   resume=round_trip(states[1]))
    assert all(torch.equal(a, b) for a, b in zip(params_of(aset), params_of(whole_set)))


def test_bad_ema_decay_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        run_train(steps=1, ema_decay=1.0)


# -- validation ------------------------------------------------------------------------------------------------------
def test_validation_is_deterministic_and_leaves_training_alone():
    from training.validation import Validation

    net, aset, groups, sched, denoise = toy_problem(0)
    validation = Validation(groups, sched, seed=1)

    def evaluate() -> float:
        with attached(net, aset):
            return validation.loss(lambda *a: loop.sample_loss(*a[:1], sched, *a[1:], "MSE"), denoise)

    before = evaluate()
    assert evaluate() == before
    seen = []
    with attached(net, aset):
        validated = loop.train(aset.trainable(), groups, denoise, sched,
                               loop.Settings(steps=10, batch_size=2, learning_rate=0.05, optimizer="Adam"), gen(0),
                               loop.Callbacks(step=lambda r: seen.append(evaluate())))
    plain, _, _ = run_train(steps=10)
    assert validated.losses == plain.losses, "evaluating never changes the training's draws"
    assert len(seen) == 10 and min(seen) < before and len(set(seen)) == 10, "it follows what training changed"
