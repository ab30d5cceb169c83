"""A deterministic generator of labelled images: shapes and textures on noisy coloured backgrounds.

Used by tests and benchmarks, and as a data source (``--source synthetic``). The same parameters
and seed always give the same pixels and the same PNG bytes, on any machine: everything is drawn
from one NumPy generator per image, seeded from (seed, class, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "diamond")


@dataclass(frozen=True)
class SyntheticSpec:
    classes: int = 4
    per_class: int = 60
    size: int = 32
    channels: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(SHAPES):
            raise ValueError(f"synthetic classes must be between 2 and {len(SHAPES)}, got {self.classes}")
        if self.per_class < 1 or self.size < 8 or self.channels not in (1, 3):
            raise ValueError("synthetic per_class >= 1, size >= 8 and channels in (1, 3) are required")


def _colour(rng: np.random.Generator, avoid: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        # keep shape and background apart, so every class stays learnable
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid, strict=True)) > 180:
            return colour  # type: ignore[return-value]


def render(shape: str, size: int, channels: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of ``shape``; position, scale, colours and noise come from ``rng``."""
    background = _colour(rng)
    ink = _colour(rng, avoid=background)
    scale = 4  # draw large, then downsample: anti-aliased edges at any output size
    big = size * scale
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    radius = big * rng.uniform(0.22, 0.38)
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    stroke = max(1, int(radius * 0.35))
    if shape == "circle":
        draw.ellipse(box, fill=ink)
    elif shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=ink)
    elif shape == "cross":
        draw.rectangle((cx - radius, cy - stroke / 2, cx + radius, cy + stroke / 2), fill=ink)
        draw.rectangle((cx - stroke / 2, cy - radius, cx + stroke / 2, cy + radius), fill=ink)
    elif shape == "ring":
        draw.ellipse(box, outline=ink, width=stroke)
    elif shape == "diamond":
        draw.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=ink)
    elif shape == "stripes":
        period = max(4, int(big * rng.uniform(0.08, 0.14)))
        for x in range(0, big, period):
            draw.rectangle((x, 0, x + period // 2 - 1, big), fill=ink)
    elif shape == "checker":
        period = max(4, int(big * rng.uniform(0.1, 0.18)))
        for y in range(0, big, period):
            for x in range(0, big, period):
                if (x // period + y // period) % 2 == 0:
                    draw.rectangle((x, y, x + period - 1, y + period - 1), fill=ink)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    small = img.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32)
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return out.convert("L") if channels == 1 else out


def generate(spec: SyntheticSpec, dest: Path) -> int:
    """Write ``dest/<shape>/<shape>_<index>.png`` for every class; returns the image count."""
    count = 0
    for label in range(spec.classes):
        shape = SHAPES[label]
        (dest / shape).mkdir(parents=True, exist_ok=True)
        for index in range(spec.per_class):
            rng = np.random.default_rng([spec.seed, label, index])
            image = render(shape, spec.size, spec.channels, rng)
            image.save(dest / shape / f"{shape}_{index:05d}.png", format="PNG", optimize=False)
            count += 1
    return count


def make_arrays(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """The same images as arrays (N, C, H, W) uint8 and labels, without touching the disk."""
    images, labels = [], []
    for label in range(spec.classes):
        for index in range(spec.per_class):
            rng = np.random.default_rng([spec.seed, label, index])
            array = np.asarray(render(SHAPES[label], spec.size, spec.channels, rng))
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
