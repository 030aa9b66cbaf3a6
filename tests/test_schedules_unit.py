"""Learning-rate schedules (issue 21): every step's rate against the documented formula (written out again here, by
brute force), the floor on the last optimizer step, and the series the real loop uses — with gradient accumulation
and across a resume."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from test_training_unit import gen, run_train, toy_problem  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import loop  # noqa: E402
from training.schedules import LR_SCHEDULES, LRSchedule  # noqa: E402

pytestmark = pytest.mark.fast

DECAYING = ("linear", "cosine", "cosine_with_restarts")


def documented(kind: str, warmup: int, floor: float, cycles: int, total: int) -> list[float]:
    """The factor of every step as web/docs/LoraTrainer_TrainingOptions.md states it."""
    out = []
    decay = total - warmup
    for s in range(total):
        if s < warmup:
            out.append((s + 1) / warmup)
            continue
        i = s - warmup
        if kind == "constant":
            out.append(1.0)
            continue
        if kind == "cosine_with_restarts":  # the steps of i's cycle: those with the same ⌊j·cycles / D⌋
            members = [j for j in range(decay) if j * cycles // decay == i * cycles // decay]
        else:
            members = list(range(decay))
        position, length = members.index(i), len(members)
        p = position / (length - 1) if length > 1 else 1.0
        shape = 1 - p if kind == "linear" else (1 + math.cos(math.pi * p)) / 2
        out.append(floor + (1 - floor) * shape)
    return out


def series(schedule: LRSchedule, total: int) -> list[float]:
    return [schedule.factor(step, total) for step in range(total)]


CASES = [(total, warmup) for total in (1, 2, 10, 37) for warmup in sorted({0, 1, total - 1, total, total + 3})]


@pytest.mark.parametrize("kind", LR_SCHEDULES)
@pytest.mark.parametrize("floor, cycles", [(0.0, 1), (0.1, 3), (0.25, 50)])
@pytest.mark.parametrize("total, warmup", CASES, ids=[f"T{t}-W{w}" for t, w in CASES])
def test_every_step_follows_the_documented_formula(kind, floor, cycles, total, warmup):
    schedule = LRSchedule(kind, warmup, floor, cycles)
    assert series(schedule, total) == pytest.approx(documented(kind, warmup, floor, cycles, total), abs=1e-12)


@pytest.mark.parametrize("kind", DECAYING)
@pytest.mark.parametrize("total, warmup", [(1, 0), (2, 0), (2, 1), (10, 0), (10, 3), (10, 9), (37, 5)])
def test_decay_reaches_the_floor_exactly_on_the_last_step(kind, total, warmup):
    f = series(LRSchedule(kind, warmup, 0.1, 3), total)
    assert f[-1] == pytest.approx(0.1, abs=1e-15) and min(f) >= 0.1 - 1e-15
    if total - warmup >= 2 and kind != "cosine_with_restarts":  # restarts: below, cycle by cycle
        assert f[warmup] == pytest.approx(1.0) and all(a > b for a, b in zip(f[warmup:], f[warmup + 1:]))


def test_warmup_rises_linearly_to_lr_then_the_decay_starts_at_lr():
    assert series(LRSchedule(warmup_steps=4), 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = series(LRSchedule("cosine", warmup_steps=2, min_lr_ratio=0.2), 12)
    assert cosine[:2] == [0.5, 1.0]  # 10 decay steps: p = i / 9
    assert cosine[2:] == pytest.approx([0.2 + 0.8 * (1 + math.cos(math.pi * i / 9)) / 2 for i in range(10)])
    linear = series(LRSchedule("linear", min_lr_ratio=0.1), 11)  # 11 decay steps: p = i / 10
    assert linear == pytest.approx([0.1 + 0.9 * (1 - i / 10) for i in range(11)])


def test_degenerate_runs():
    # one step: no warmup means its only decay step is the last one, at the floor; a warmup of 1 is full lr
    assert series(LRSchedule("cosine", min_lr_ratio=0.3), 1) == pytest.approx([0.3])
    assert series(LRSchedule("linear", warmup_steps=1, min_lr_ratio=0.3), 1) == [1.0]
    # warmup = steps: no decay at all; warmup beyond steps: the run ends part of the way up
    assert series(LRSchedule("cosine", warmup_steps=4), 4) == [0.25, 0.5, 0.75, 1.0]
    assert series(LRSchedule("linear", warmup_steps=8), 4) == [0.125, 0.25, 0.375, 0.5]
    # warmup = steps − 1: the warmup ends at lr, then the single decay step at the floor
    assert series(LRSchedule("linear", warmup_steps=3, min_lr_ratio=0.1), 4) == pytest.approx([1 / 3, 2 / 3, 1, 0.1])
    assert series(LRSchedule("constant", warmup_steps=3), 4) == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_cosine_with_restarts_ends_every_cycle_at_the_floor():
    f = series(LRSchedule("cosine_with_restarts", cycles=3, min_lr_ratio=0.05), 30)
    for start in (0, 10, 20):  # three cycles of 10 steps
        cycle = f[start:start + 10]
        assert cycle[0] == pytest.approx(1.0) and cycle[-1] == pytest.approx(0.05)
        assert all(a > b for a, b in zip(cycle, cycle[1:]))
        assert cycle[4] == pytest.approx(0.05 + 0.95 * (1 + math.cos(math.pi * 4 / 9)) / 2)
    # 11 decay steps in 3 cycles: lengths 4, 4, 3 (⌊i·3/11⌋), each from lr to the floor
    g = series(LRSchedule("cosine_with_restarts", warmup_steps=2, cycles=3), 13)
    assert g[:2] == [0.5, 1.0]
    assert [i for i in range(2, 13) if g[i] == pytest.approx(1.0)] == [2, 6, 10]
    assert [i for i in range(2, 13) if g[i] == pytest.approx(0.0, abs=1e-15)] == [5, 9, 12]
    # one cycle is the plain cosine
    assert series(LRSchedule("cosine_with_restarts", 2, 0.1, 1), 17) == series(LRSchedule("cosine", 2, 0.1), 17)


def test_a_step_outside_the_run_is_refused():
    with pytest.raises(ValueError, match="step 5 is outside a run of 5 steps"):
        LRSchedule("cosine").factor(5, 5)


# -- the series the loop uses -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DECAYING)
def test_with_gradient_accumulation_each_optimizer_step_gets_one_value_of_the_series(kind):
    """``total`` is the number of optimizer steps: 7 steps of 3 micro-batches run the 7-step series, not a 21-step one,
    and the last optimizer step is at the floor."""
    schedule = LRSchedule(kind, warmup_steps=2, min_lr_ratio=0.1, cycles=2)
    reports, micro = [], []
    result, _, _ = run_train(steps=7, grad_accumulation_steps=3, learning_rate=0.02, lr_schedule=schedule,
                             callbacks=loop.Callbacks(step=reports.append, micro_step=lambda: micro.append(1)))
    expected = [0.02 * f for f in documented(kind, 2, 0.1, 2, 7)]
    assert len(micro) == 21 and [r.step for r in reports] == list(range(1, 8))
    assert [r.learning_rate for r in reports] == pytest.approx(expected)
    assert result.learning_rates == pytest.approx(expected) and result.learning_rates[-1] == pytest.approx(0.002)


@pytest.mark.parametrize("kind", LR_SCHEDULES)
def test_a_resumed_run_continues_the_same_series(kind):
    settings = dict(steps=11, batch_size=2, grad_accumulation_steps=2, learning_rate=0.03,
                    lr_schedule=LRSchedule(kind, warmup_steps=3, min_lr_ratio=0.2, cycles=2))
    states = []
    whole, _, _ = run_train(seed=3, callbacks=loop.Callbacks(checkpoint_every=4, checkpoint=states.append), **settings)
    assert whole.learning_rates == pytest.approx([0.03 * f for f in documented(kind, 3, 0.2, 2, 11)])
    assert [s.step for s in states] == [4, 8]
    for state in states:
        reports = []
        net, aset, groups, sched, denoise = toy_problem(3)
        with attached(net, aset):
            resumed = loop.train(aset.trainable(), groups, denoise, sched, loop.Settings(**settings), gen(999),
                                 loop.Callbacks(step=reports.append), resume=state)
        assert resumed.learning_rates == whole.learning_rates
        assert [r.learning_rate for r in reports] == whole.learning_rates[state.step:]


def test_a_resume_with_more_steps_stretches_the_decay_from_the_resumed_step():
    """As the docs say: with steps raised on resume, the steps after it follow the series of the new length."""
    schedule = LRSchedule("cosine", warmup_steps=1, min_lr_ratio=0.1)
    states = []
    first, _, _ = run_train(seed=1, steps=6, lr_schedule=schedule,
                            callbacks=loop.Callbacks(checkpoint_every=3, checkpoint=states.append))
    net, aset, groups, sched, denoise = toy_problem(1)
    with attached(net, aset):
        longer = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=10, batch_size=2, learning_rate=0.05, optimizer="Adam",
                                          lr_schedule=schedule), gen(0), resume=states[0])
    assert longer.learning_rates[:3] == first.learning_rates[:3]
    assert longer.learning_rates[3:] == pytest.approx([0.05 * f for f in documented("cosine", 1, 0.1, 1, 10)[3:]])
    assert longer.learning_rates[-1] == pytest.approx(0.005)
