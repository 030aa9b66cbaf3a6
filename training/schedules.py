"""Learning-rate schedules: a factor of the base learning rate for every optimizer step of a run."""
from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")


@dataclass(frozen=True)
class LRSchedule:
    kind: str = "constant"
    warmup_steps: int = 0  # the rate rises linearly from lr/warmup_steps to lr over these first steps
    min_lr_ratio: float = 0.0  # the floor of linear and cosine decay, as a fraction of lr
    cycles: int = 1  # cosine_with_restarts: how many cosine decays (each restarting at lr) after the warmup

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: '{self.kind}' is not one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.cycles < 1:
            raise ValueError("lr_schedule: warmup_steps must be ≥ 0, min_lr_ratio in [0, 1], cycles ≥ 1")

    def factor(self, step: int, total: int) -> float:
        """The multiplier of lr for optimizer step ``step`` (0-based) of a run of ``total`` steps."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = max(total - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)  # 0 at the first step after warmup
        if self.kind == "linear":
            shape = 1.0 - progress
        elif self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # cosine_with_restarts: the same cosine, ``cycles`` times over the decay steps
            shape = 0.5 * (1.0 + math.cos(math.pi * ((progress * self.cycles) % 1.0)))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
