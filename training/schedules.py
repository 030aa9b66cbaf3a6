"""Learning-rate schedules: a factor of the base learning rate for every optimizer step of a run.

With ``W`` warmup steps, a run of ``T`` optimizer steps and ``s`` the 0-based step:

- warmup, ``s < W``: ``(s + 1) / W`` — from lr/W up to lr on step W-1;
- after it, the ``D = T − W`` decay steps, ``i = s − W`` (0 … D−1):
  - ``constant``: 1;
  - ``linear`` and ``cosine``: ``m + (1 − m)·shape(p)`` with ``m = min_lr_ratio`` and ``p = i / (D − 1)``, so the first
    decay step is at lr (``p = 0``) and the last one, the run's last step, exactly at the floor (``p = 1``);
    ``shape`` is ``1 − p`` or ``(1 + cos πp) / 2``. A single decay step (``D = 1``) is the last step: it is at the
    floor (``p = 1``);
  - ``cosine_with_restarts``: the decay steps split into ``cycles`` runs of consecutive steps whose lengths differ by
    at most one (cycle ``c`` holds the ``i`` with ``⌊i·cycles / D⌋ = c``); each is the cosine above over its own
    length: it starts at lr and its last step is at the floor. A cycle of one step is at the floor.

Every value depends only on (s, T) and the schedule, so a resumed run continues the same series."""
from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")


def _progress(position: int, length: int) -> float:
    """0 on the first of ``length`` steps, 1 on the last; a single step is the last (the floor comes on it)."""
    return position / (length - 1) if length > 1 else 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "constant"
    warmup_steps: int = 0  # the rate rises linearly from lr/warmup_steps to lr over these first steps
    min_lr_ratio: float = 0.0  # the floor of linear and cosine decay, as a fraction of lr; reached on the last step
    cycles: int = 1  # cosine_with_restarts: how many cosine decays (each restarting at lr) after the warmup

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: '{self.kind}' is not one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.cycles < 1:
            raise ValueError("lr_schedule: warmup_steps must be ≥ 0, min_lr_ratio in [0, 1], cycles ≥ 1")

    def factor(self, step: int, total: int) -> float:
        """The multiplier of lr for optimizer step ``step`` (0-based) of a run of ``total`` optimizer steps (see the
        module's docstring for the formula)."""
        if not 0 <= step < total:
            raise ValueError(f"lr_schedule: step {step} is outside a run of {total} steps")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = total - self.warmup_steps  # ≥ 1: this step is one of them
        i = step - self.warmup_steps
        if self.kind == "linear":
            shape = 1.0 - _progress(i, decay_steps)
        elif self.kind == "cosine":
            shape = _cosine(_progress(i, decay_steps))
        else:  # the cycle of step i and its bounds, in integers: [⌈c·D/C⌉, ⌈(c+1)·D/C⌉)
            c = i * self.cycles // decay_steps
            start, end = -(-c * decay_steps // self.cycles), -(-(c + 1) * decay_steps // self.cycles)
            shape = _cosine(_progress(i - start, end - start))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
