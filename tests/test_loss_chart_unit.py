"""The Loss Graph PNG (nodes/loss_chart.py, loaded by file path: it needs only numpy and Pillow): every series of a
LOSS_MAP is drawn in its own colour where the map has it and nowhere else, at the right steps and on the right axis."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.fast

_spec = importlib.util.spec_from_file_location(
    "loss_chart_under_test", Path(__file__).resolve().parent.parent / "nodes" / "loss_chart.py")
lc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lc)

STEPS, SKIPPED, SAVES = 60, [21, 22], [20, 40]
VALIDATION = {"step": [10, 20, 30, 40, 50, 60], "loss": [1.2, 1.0, 0.9, 0.85, 0.9, 0.95]}


def cosine_lr(step: int) -> float:
    """Warmup over 10 steps, then cosine decay to 0 at STEPS."""
    return 1e-3 * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * max(0, step - 10) / (STEPS - 10)))


def full_map() -> dict:
    applied = lc.applied_steps(STEPS - len(SKIPPED), SKIPPED)
    return {"loss": [1.5 * math.exp(-s / 20) + 0.3 + 0.1 * math.sin(s) for s in applied], "skipped": SKIPPED,
            "learning_rate": [cosine_lr(s) for s in applied], "grad_norm": [0.5] * len(applied),
            "validation": VALIDATION, "saves": SAVES}


def mask(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Where the image has exactly this colour (Pillow draws lines without anti-aliasing)."""
    return (image == np.array(colour, dtype=np.uint8)).all(axis=-1)


def plot_area(image: np.ndarray) -> np.ndarray:
    """The inside of the frame: the legend above it is left out."""
    return image[lc.MARGIN // 2 + 1: lc.HEIGHT - lc.MARGIN, lc.MARGIN + 1: lc.WIDTH - lc.MARGIN]


def counts(image: np.ndarray) -> dict[str, int]:
    colours = {"raw": lc.RAW_COLOUR, "smoothed": lc.SMOOTHED_COLOUR, "validation": lc.VALIDATION_COLOUR,
               "lr": lc.LR_COLOUR, "save": lc.SAVE_COLOUR, "skipped": lc.SKIPPED_COLOUR}
    return {name: int(mask(image, colour).sum()) for name, colour in colours.items()}


def x_of_step(step: float, first: float, last: float, right: int) -> float:
    return lc.MARGIN + (right - lc.MARGIN) * (step - first) / (last - first)


def test_a_full_map_draws_every_series():
    image = lc.loss_map_chart(full_map())
    assert image.shape == (lc.HEIGHT, lc.WIDTH, 3) and image.dtype == np.uint8
    found = counts(plot_area(image))
    assert all(n > 50 for n in found.values()), found


def test_comfyuis_bare_loss_map_draws_the_loss_only():
    values = full_map()["loss"]
    found = counts(lc.loss_map_chart({"loss": values}))  # legend included: it names only what is drawn
    assert found["raw"] > 50 and found["smoothed"] > 50, found
    assert found["validation"] == found["lr"] == found["save"] == found["skipped"] == 0, found
    # Without a learning-rate axis the plot takes the right margin too: the last loss point lies past its edge.
    right = mask(lc.loss_map_chart({"loss": values}), lc.SMOOTHED_COLOUR)[:, lc.WIDTH - lc.MARGIN:]
    assert right.any()


@pytest.mark.parametrize("loss_map", [{}, {"loss": []}, None, {"loss": [], "skipped": [], "learning_rate": []},
                                      {"loss": [math.nan, math.inf]}])
def test_nothing_to_draw_says_so(loss_map):
    image = lc.loss_map_chart(loss_map)
    found = counts(image)
    assert sum(found.values()) == 0, found
    assert (image < 100).all(axis=-1).sum() > 20, "the 'no loss values' text"


@pytest.mark.parametrize("loss_map", [
    {"loss": [0.5] * 10, "learning_rate": [1e-4] * 10},
    {"loss": [0.5], "learning_rate": [1e-4], "validation": {"step": [1], "loss": [0.5]}},
    {"loss": [0.5, 0.4], "learning_rate": [0.0, 0.0], "saves": [1]},
])
def test_constant_and_single_values_are_drawn(loss_map):
    found = counts(lc.loss_map_chart(loss_map))
    assert found["smoothed"] > 0 and found["lr"] > 0, found
    assert (found["validation"] > 0) == ("validation" in loss_map), found
    assert (found["save"] > 0) == ("saves" in loss_map), found


def test_malformed_fields_are_left_out():
    values = full_map()["loss"]
    found = counts(lc.loss_map_chart({"loss": values, "learning_rate": "fast", "validation": [1, 2],
                                      "saves": None, "skipped": ["x"]}))
    assert found["smoothed"] > 50 and found["lr"] == found["validation"] == found["save"] == 0, found
    # Lengths that disagree: only the pairs there are; junk values are dropped, the rest drawn.
    found = counts(lc.loss_map_chart({"loss": values, "learning_rate": [1e-3, None, 5e-4],
                                      "validation": {"step": [5, 10, "?"], "loss": [1.0, math.nan, 0.8, 0.7]}}))
    assert found["lr"] > 0 and found["validation"] > 0, found


def test_learning_rate_is_on_its_own_axis_and_series_sit_at_their_steps():
    image = lc.loss_map_chart(full_map())
    right = lc.WIDTH - lc.MARGIN
    top, bottom = lc.MARGIN // 2, lc.HEIGHT - lc.MARGIN
    lr = mask(image, lc.LR_COLOUR)[top:bottom + 1, lc.MARGIN:right + 1]
    columns = np.flatnonzero(lr.any(axis=0))
    rows_at = lambda c: np.flatnonzero(lr[:, c])  # noqa: E731
    # Warmup from a tenth of its axis (1e-4 at step 1) to its top by step 10, then down to its bottom (0) at step 60:
    # the rate (1e-3 scale) is not squashed onto the loss axis (scale 1).
    height = bottom - top
    peak = int(round(x_of_step(10, 1, STEPS, right))) - lc.MARGIN
    assert abs(rows_at(columns[0]).mean() - 0.9 * height) <= 3 and rows_at(peak).min() <= 2
    assert rows_at(columns[-1]).max() >= height - 2
    # Validation dots at their steps; dashed save lines at theirs; red skip marks at theirs.
    for step in VALIDATION["step"]:
        x = int(round(x_of_step(step, 1, STEPS, right)))
        assert mask(image, lc.VALIDATION_COLOUR)[top:bottom, x].any(), step
    for step in SAVES:
        x = int(round(x_of_step(step, 1, STEPS, right)))
        column = mask(image, lc.SAVE_COLOUR)[top:bottom, x - 1:x + 2].any(axis=1)
        assert 0.3 < column.mean() < 0.8, (step, column.mean())  # dashed: drawn and undrawn runs
    for step in SKIPPED:
        x = int(round(x_of_step(step, 1, STEPS, right)))
        assert mask(image, lc.SKIPPED_COLOUR)[top:bottom, x - 1:x + 2].any(axis=1).mean() > 0.9, step


def test_skipped_steps_shift_the_applied_losses_to_their_step_numbers():
    assert lc.applied_steps(4, [2, 3]) == [1, 4, 5, 6]
    assert lc.applied_steps(3, [4, 5]) == [1, 2, 3]  # skipped at the end (a diverged run)
    assert lc.applied_steps(2, []) == [1, 2]
    assert [v if math.isfinite(v) else None for v in lc.per_step([1.0, 2.0], [1])] == [None, 1.0, 2.0]


def test_step_ticks_are_round_numbers_inside_the_range():
    assert lc._nice_ticks(1, 60, 8) == [10, 20, 30, 40, 50, 60]
    assert lc._nice_ticks(1, 1, 8) == [1]
    assert lc._nice_ticks(0, 5, 8) == [0, 1, 2, 3, 4, 5]
    ticks = lc._nice_ticks(1, 100000, 8)
    assert len(ticks) <= 8 and ticks[-1] == 100000
