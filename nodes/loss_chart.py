"""Draws a LOSS_MAP into an RGB image with Pillow (no plotting library needed): loss (raw and smoothed), validation
loss, learning rate on a right axis, red marks at skipped steps and markers at intermediate saves."""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48

TEXT = (0, 0, 0)
FRAME = (120, 120, 120)
RAW_COLOUR = (150, 180, 230)
SMOOTHED_COLOUR = (20, 60, 160)
VALIDATION_COLOUR = (230, 110, 0)
LR_COLOUR = (20, 150, 60)
SAVE_COLOUR = (150, 60, 200)
SKIPPED_COLOUR = (200, 40, 40)

Points = list[tuple[float, float]]  # (step number, value), finite values only


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average; a non-finite value (a skipped step) stays NaN and leaves the average as it was."""
    out, current = [], None
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        current = v if current is None else weight * current + (1 - weight) * v
        out.append(current)
    return out


def applied_steps(applied: int, skipped: Iterable[int]) -> list[int]:
    """The step numbers of the ``applied`` steps: 1..(applied + skipped) without the skipped ones."""
    n = applied + len(set(skipped))
    marks = {s for s in skipped if isinstance(s, int) and 1 <= s <= n}
    return [step for step in range(1, n + 1) if step not in marks][:applied]


def per_step(values: list[float], skipped: list[int]) -> list[float]:
    """The loss of every step number 1..n, NaN at the skipped ones (``values`` holds the applied steps' losses)."""
    n = len(values) + len(set(skipped))
    out = [math.nan] * n
    for step, v in zip(applied_steps(len(values), skipped), values):
        out[step - 1] = v
    return out


def _floats(values) -> list[float]:
    """A series from a LOSS_MAP field that may be absent or hold junk: non-numbers become NaN."""
    out = []
    for v in values if isinstance(values, (list, tuple)) else ():
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _finite(points: Iterable[tuple[float, float]]) -> Points:
    return [(s, v) for s, v in points if math.isfinite(s) and math.isfinite(v)]


def _band(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):  # constant series: give it a band so nothing divides by zero
        pad = max(abs(hi) * 0.05, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _nice_ticks(first: float, last: float, most: int) -> list[int]:
    """Whole step numbers at 1, 2 or 5 x 10^k apart, at most ``most`` of them, inside [first, last]."""
    span = max(last - first, 1)
    unit = 10 ** math.floor(math.log10(span / max(most, 1)))
    spacing = next(m * unit for m in (1, 2, 5, 10) if span / (m * unit) <= most)
    spacing = max(1, int(spacing))
    start = math.ceil(first / spacing) * spacing
    return list(range(int(start), int(last) + 1, spacing))


def loss_map_chart(loss_map: dict | None) -> np.ndarray:
    """The chart of a LOSS_MAP: ours (loss, skipped, learning_rate, validation, saves) or ComfyUI's bare
    {"loss": [...]}; absent or malformed fields are left out of the chart."""
    loss_map = loss_map if isinstance(loss_map, dict) else {}
    skipped = [s for s in loss_map.get("skipped", ()) or () if isinstance(s, int)]
    validation = loss_map.get("validation") if isinstance(loss_map.get("validation"), dict) else {}
    return loss_chart(_floats(loss_map.get("loss")), skipped, learning_rate=_floats(loss_map.get("learning_rate")),
                      validation=list(zip(_floats(validation.get("step")), _floats(validation.get("loss")))),
                      saves=_floats(loss_map.get("saves")))


def loss_chart(values: list[float], skipped: list[int] = (), *, learning_rate: list[float] = (),
               validation: list[tuple[float, float]] = (), saves: list[float] = ()) -> np.ndarray:
    """An HxWx3 uint8 chart of ``values`` (the applied steps' losses, raw and smoothed) with a red mark at every
    skipped step number, ``validation`` as (step, loss) pairs on the same axis, ``learning_rate`` (one per applied
    step) on a right axis and a dashed marker at every step in ``saves``. Empty, single or constant series are drawn
    too."""
    values, skipped = list(values), list(skipped)
    steps = applied_steps(len(values), skipped)
    raw = _finite(zip(steps, values))
    series = [(raw, RAW_COLOUR, 1, "loss"),
              (_finite(zip(steps, smoothed(values))), SMOOTHED_COLOUR, 2, "smoothed"),
              (_finite(validation), VALIDATION_COLOUR, 2, "validation")]
    lr = _finite(zip(steps, learning_rate))
    n = len(values) + len(set(skipped))
    marks = [s for s in sorted(set(skipped)) if 1 <= s <= n]
    saves = sorted({s for s in saves if math.isfinite(s)})

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    left, top, bottom = MARGIN, MARGIN // 2, HEIGHT - MARGIN
    right = WIDTH - (MARGIN if lr else MARGIN // 2)  # room for the learning-rate axis when there is one
    draw.rectangle([left, top, right, bottom], outline=FRAME)
    on_left = [v for points, *_ in series for _, v in points]
    if not on_left:
        draw.text((left + 10, top + 10), "no loss values", fill=TEXT)
        return np.asarray(img)
    lo, hi = _band(on_left)
    every_step = [s for points, *_ in series for s, _ in points] + [s for s, _ in lr] + marks + saves
    first, last = min(every_step), max(every_step)

    def x(step: float) -> float:
        return left + (right - left) * ((step - first) / (last - first) if last > first else 0.5)

    def y(v: float, lo: float, hi: float) -> float:
        return bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)

    def plot(points: Points, colour, width: int, lo: float, hi: float, dots: bool = False) -> None:
        xy = [(x(s), y(v, lo, hi)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=width)
        for px, py in xy if dots or len(xy) == 1 else ():
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)

    for step in marks:
        draw.line([(x(step), top), (x(step), bottom)], fill=SKIPPED_COLOUR, width=1)
    for step in saves:  # dashed, so a save never reads as a skipped step
        for y0 in range(top, bottom, 8):
            draw.line([(x(step), y0), (x(step), min(y0 + 4, bottom))], fill=SAVE_COLOUR, width=1)
    if lr:
        lr_lo, lr_hi = _band([v for _, v in lr])
        plot(lr, LR_COLOUR, 1, lr_lo, lr_hi)
        draw.text((right + 4, top), f"{lr_hi:.2g}", fill=LR_COLOUR)
        draw.text((right + 4, bottom - 10), f"{lr_lo:.2g}", fill=LR_COLOUR)
        draw.text((right + 4, (top + bottom) // 2 - 5), "lr", fill=LR_COLOUR)
    for points, colour, width, name in series:
        plot(points, colour, width, lo, hi, dots=name == "validation")

    legend = [(name, colour) for points, colour, _, name in series if points]
    legend += [("learning rate", LR_COLOUR)] * bool(lr) + [("save", SAVE_COLOUR)] * bool(saves)
    legend += [(f"{len(marks)} skipped (loss not finite)", SKIPPED_COLOUR)] * bool(marks)
    lx = left
    for name, colour in legend:
        draw.line([(lx, top // 2), (lx + 14, top // 2)], fill=colour, width=3)
        draw.text((lx + 18, top // 2 - 6), name, fill=TEXT)
        lx += 18 + int(draw.textlength(name)) + 14

    draw.text((4, top), f"{hi:.4g}", fill=TEXT)
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=TEXT)
    for tick in _nice_ticks(first, last, 8):
        tx = x(tick)
        draw.line([(tx, bottom), (tx, bottom + 4)], fill=FRAME)
        label = str(tick)
        draw.text((tx - draw.textlength(label) / 2, bottom + 6), label, fill=TEXT)
    draw.text(((left + right) // 2 - 12, bottom + 24), "step", fill=TEXT)
    return np.asarray(img)
