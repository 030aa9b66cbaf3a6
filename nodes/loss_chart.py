"""Draws a loss curve into an RGB image with Pillow (no plotting library needed)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


SKIPPED_COLOUR = (200, 40, 40)


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


def per_step(values: list[float], skipped: list[int]) -> list[float]:
    """The loss of every step number 1..n, NaN at the skipped ones (``values`` holds the applied steps' losses)."""
    n = len(values) + len(set(skipped))
    marks = {s for s in skipped if isinstance(s, int) and 1 <= s <= n}
    applied = iter(values)
    return [math.nan if step in marks else next(applied, math.nan) for step in range(1, n + 1)]


def loss_chart(values: list[float], skipped: list[int] = ()) -> np.ndarray:
    """An HxWx3 uint8 chart of ``values`` (raw and smoothed), with a red mark at every skipped step number. Empty,
    single or constant series are drawn too."""
    values = per_step(list(values), list(skipped))
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        draw.text((left + 10, top + 10), "no loss values", fill=(0, 0, 0))
        return np.asarray(img)
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:  # constant series: give it a band so nothing divides by zero
        pad = max(abs(hi) * 0.05, 1e-6)
        lo, hi = lo - pad, hi + pad
    n = len(values)

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / (n - 1) if n > 1 else 0.5)
        y = bottom - (bottom - top) * (min(max(v, lo), hi) - lo) / (hi - lo)
        return x, y

    for series, colour, width in ((values, (150, 180, 230), 1), (smoothed(values), (20, 60, 160), 2)):
        pts = [point(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line(pts, fill=colour, width=width)
    marks = [i for i, v in enumerate(values) if not math.isfinite(v)]
    for i in marks:
        x, _ = point(i, lo)
        draw.line([(x, top), (x, bottom)], fill=SKIPPED_COLOUR, width=1)
    if marks:
        draw.text((right - 220, top + 4), f"{len(marks)} step(s) skipped: loss not finite", fill=SKIPPED_COLOUR)
    draw.text((4, top), f"{hi:.4g}", fill=(0, 0, 0))
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), "step 1", fill=(0, 0, 0))
    draw.text((right - 60, bottom + 8), f"step {n}", fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 40, bottom + 24), "loss per step", fill=(0, 0, 0))
    return np.asarray(img)
