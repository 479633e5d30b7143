"""The recipes' pictures, drawn with Pillow (``pip install pillow``, the ``data`` extra): without it the recipes
run and print how to get them.

- :func:`curves`: ``curves.png``, the loss per step of each phase from its JSON-lines metrics.
- :func:`masks`: ``masks.png``, held-out frames in rows (input, true masks, one row per model), one colour per
  slot id (the same slot keeps its colour across frames).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

# Distinct colours of label ids (id 0 of the true masks, the background, is dark grey).
PALETTE = [(60, 60, 60), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)]
SERIES = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_warned = False


def _pil():
    global _warned
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        if not _warned:
            print("kdfast: pictures skipped: they need Pillow (pip install pillow, or pip install 'kdfast[data]')",
                  file=sys.stderr)
            _warned = True
        return None
    return Image, ImageDraw


def read_losses(path: Path, key: str = "loss") -> tuple[list[int], list[float]]:
    steps, values = [], []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if key in record:
                steps.append(record["step"])
                values.append(record[key])
    return steps, values


def curves(out: Path, series: dict[str, Path], title: str, key: str = "loss", file: str = "curves.png") -> Path | None:
    """``out/curves.png``: ``key`` per step of each named metrics.jsonl (log scale when it spans a decade),
    smoothed over a moving window of 1/50 of the run."""
    pil = _pil()
    if pil is None:
        return None
    Image, ImageDraw = pil
    data = {name: read_losses(path, key) for name, path in series.items()}
    data = {name: (s, v) for name, (s, v) in data.items() if s and all(math.isfinite(x) for x in v)}
    if not data:
        return None
    width, height, left, right, top, bottom = 640, 360, 60, 20, 30, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    all_steps = [x for s, _ in data.values() for x in s]
    all_values = [x for _, v in data.values() for x in v]
    positive = min(all_values) > 0
    log = positive and max(all_values) / min(all_values) > 10
    f = (lambda x: math.log10(x)) if log else (lambda x: x)
    lo, hi = f(min(all_values)), f(max(all_values))
    hi = hi if hi > lo else lo + 1
    s0, s1 = min(all_steps), max(max(all_steps), min(all_steps) + 1)

    def xy(step, value):
        return (left + (step - s0) / (s1 - s0) * (width - left - right),
                top + (1 - (f(value) - lo) / (hi - lo)) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        y = top + (1 - i / 4) * (height - top - bottom)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{10 ** v if log else v:.3g}", fill=(0, 0, 0))
    for i in range(5):
        step = s0 + (s1 - s0) * i / 4
        x = left + i / 4 * (width - left - right)
        draw.line([x, height - bottom, x, height - bottom + 4], fill=(0, 0, 0))
        draw.text((x - 10, height - bottom + 6), f"{step:.0f}", fill=(0, 0, 0))
    draw.text((width // 2 - 15, height - 14), "step", fill=(0, 0, 0))
    draw.text((left, 8), f"{title}{' (log scale)' if log else ''}", fill=(0, 0, 0))
    for i, (name, (steps, values)) in enumerate(data.items()):
        window = max(1, len(values) // 50)
        smooth = [sum(values[max(0, j - window + 1):j + 1]) / len(values[max(0, j - window + 1):j + 1])
                  for j in range(len(values))]
        colour = SERIES[i % len(SERIES)]
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=colour, width=2)
        draw.line([width - right - 150, top + 12 + 14 * i, width - right - 130, top + 12 + 14 * i], fill=colour, width=2)
        draw.text((width - right - 125, top + 6 + 14 * i), name, fill=(0, 0, 0))
    path = Path(out) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _colour(labels: Tensor) -> Tensor:
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    return palette[labels.long() % len(PALETTE)]  # (..., 3)


def masks(path: Path, video: Tensor, rows: dict[str, Tensor], scale: int = 3) -> Path | None:
    """``path``: for each clip of ``video`` (B, T, 3, H, W) in [0, 1], a row of its frames then one row per
    entry of ``rows`` (label maps (B, T, H, W)), each label in its own colour; names at the left."""
    pil = _pil()
    if pil is None:
        return None
    Image, ImageDraw = pil
    b, t, _, h, w = video.shape
    names = ["input", *rows]
    label_width, gap = 90, 2
    cell_h, cell_w = h * scale, w * scale
    image = Image.new("RGB", (label_width + t * (cell_w + gap), b * len(names) * (cell_h + gap) + b * 6), "white")
    draw = ImageDraw.Draw(image)
    y = 0
    for clip in range(b):
        for name in names:
            if name == "input":
                frames = (video[clip].permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8)
            else:
                frames = _colour(rows[name][clip])
            for frame in range(t):
                tile = Image.fromarray(frames[frame].numpy()).resize((cell_w, cell_h), Image.NEAREST)
                image.paste(tile, (label_width + frame * (cell_w + gap), y))
            draw.text((4, y + cell_h // 2 - 6), name, fill=(0, 0, 0))
            y += cell_h + gap
        y += 6
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
