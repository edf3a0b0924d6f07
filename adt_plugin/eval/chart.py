"""A bar chart PNG of the report: one panel per metric, one bar per model.

Drawn with Pillow (no plotting library needed). Each panel has its own scale
from zero, names whether higher or lower is better, and prints the values.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

from .grid import load_font, text_width

PALETTE = [(110, 110, 110), (66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]


def bar_chart(
    values: Mapping[str, Mapping[str, float]],
    models: Sequence[str],
    labels: Mapping[str, str],
    panel_size: tuple[int, int] = (260, 240),
    per_row: int = 4,
) -> Image.Image:
    """`values[metric][model]` (NaN or absent: no bar); `labels[metric]` is the panel title."""
    metrics = [m for m in values if any(math.isfinite(values[m].get(x, math.nan)) for x in models)]
    if not metrics:
        raise ValueError("no metric has a value to plot")
    font, small = load_font(15), load_font(12)
    pw, ph = panel_size
    cols = min(per_row, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    legend_h = 30
    image = Image.new("RGB", (cols * pw, rows * ph + legend_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x = 10
    for i, model in enumerate(models):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle((x, 9, x + 14, 23), fill=colour)
        draw.text((x + 20, 8), model, fill=(0, 0, 0), font=font)
        x += 40 + int(text_width(font, model))
    for index, metric in enumerate(metrics):
        ox, oy = (index % cols) * pw, legend_h + (index // cols) * ph
        _panel(draw, (ox, oy, ox + pw, oy + ph), labels.get(metric, metric), values[metric], models, font, small)
    return image


def _panel(draw, box, title, per_model, models, font, small) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0 + 10, y0 + 6), title, fill=(0, 0, 0), font=font)
    top, bottom = y0 + 46, y1 - 26
    finite = [per_model[m] for m in models if math.isfinite(per_model.get(m, math.nan))]
    high, low = max(0.0, max(finite)), min(0.0, min(finite))
    span = (high - low) or 1.0
    zero = bottom - (0 - low) / span * (bottom - top)
    slot = (x1 - x0 - 20) / len(models)
    draw.line((x0 + 10, zero, x1 - 10, zero), fill=(120, 120, 120))
    for i, model in enumerate(models):
        value = per_model.get(model, math.nan)
        left = x0 + 10 + i * slot + slot * 0.15
        right = left + slot * 0.7
        if not math.isfinite(value):
            draw.text((left, zero - 16), "n/a", fill=(120, 120, 120), font=small)
            continue
        y = bottom - (value - low) / span * (bottom - top)
        draw.rectangle((left, min(y, zero), right, max(y, zero)), fill=PALETTE[i % len(PALETTE)])
        text = f"{value:.4g}"
        ty = y - 15 if value >= 0 else y + 2
        draw.text(((left + right - text_width(small, text)) / 2, ty), text, fill=(0, 0, 0), font=small)
