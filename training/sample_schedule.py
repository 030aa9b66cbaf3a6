"""When a run renders its sample images: before the first step (optional), every N steps, and after the last one.

Pure arithmetic on step numbers, so that the loop, a resumed run and the tests agree on it without a model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleSchedule:
    every: int = 0  # sample after every this many steps; 0 = never sample
    at_start: bool = False  # also sample the untrained LoRA, before the first step (step 0)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def at_step_zero(self, first: int) -> bool:
        """Whether a run starting at step ``first`` (0, or where it resumes) samples before training: only a new run
        does; a resumed one sampled its step 0 before it was stopped."""
        return self.enabled and self.at_start and first == 0

    def due(self, step: int, steps: int) -> bool:
        """Whether the run samples after ``step`` (1-based, of ``steps``): at every multiple of ``every`` and after
        the last step, so the last column of a grid is always the LoRA the run returns."""
        return self.enabled and (step % self.every == 0 or step == steps)

    def planned(self, steps: int, first: int = 0) -> list[int]:
        """Every step a run of ``steps`` starting at ``first`` samples at, in order (what a grid's columns are)."""
        return ([0] if self.at_step_zero(first) else []) + [s for s in range(first + 1, steps + 1)
                                                            if self.due(s, steps)]
