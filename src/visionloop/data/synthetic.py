"""A deterministic generator of labelled images: shapes and textures on noisy coloured backgrounds.

Up to 8 classes are 8 shapes (circle … diamond, stripes and checker being textures); up to 48, each
shape also comes in 6 ink hue bands (``circle-red``, ``circle-yellow``, …), which needs colour.

Used by tests and benchmarks, and as a data source (``--source synthetic``). The same parameters
and seed always give the same pixels and the same PNG bytes, on any machine: everything is drawn
from one NumPy generator per image, seeded from (seed, class, index).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes", "checker", "diamond")
# Beyond 8 classes the ink's hue band is a second axis: class k is shape k % 8 in hue band k // 8.
HUE_BANDS = ("red", "yellow", "green", "cyan", "blue", "magenta")
MAX_CLASSES = len(SHAPES) * len(HUE_BANDS)


def class_names(classes: int) -> list[str]:
    """Folder names of the first ``classes`` classes: shapes alone up to 8, then shape-hue."""
    if classes <= len(SHAPES):
        return list(SHAPES[:classes])
    return [f"{SHAPES[k % len(SHAPES)]}-{HUE_BANDS[k // len(SHAPES)]}" for k in range(classes)]


@dataclass(frozen=True)
class SyntheticSpec:
    classes: int = 4
    per_class: int = 60
    size: int = 32
    channels: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"synthetic classes must be between 2 and {MAX_CLASSES}, got {self.classes}")
        if self.per_class < 1 or self.size < 8 or self.channels not in (1, 3):
            raise ValueError("synthetic per_class >= 1, size >= 8 and channels in (1, 3) are required")
        if self.classes > len(SHAPES) and self.channels == 1:
            raise ValueError(f"more than {len(SHAPES)} synthetic classes differ by hue: they need channels=3")


def _colour(
    rng: np.random.Generator, avoid: tuple[int, ...] | None = None, hue_band: int | None = None
) -> tuple[int, int, int]:
    while True:
        if hue_band is None:
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        else:  # a saturated colour whose hue lies within 25 degrees of the band's centre
            hue = (hue_band * 60 + rng.uniform(-25, 25)) % 360
            rgb = colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
            colour = tuple(round(255 * c) for c in rgb)
        # keep shape and background apart, so every class stays learnable
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid, strict=True)) > 180:
            return colour  # type: ignore[return-value]


def render(shape: str, size: int, channels: int, rng: np.random.Generator, hue_band: int | None = None) -> Image.Image:
    """Draw one image of ``shape`` (its ink in ``hue_band`` if given); position, scale, colours and
    noise come from ``rng``."""
    if hue_band is None:
        background = _colour(rng)
        ink = _colour(rng, avoid=background)
    else:  # ink first: a background of any hue can always be found far from it, not the reverse
        ink = _colour(rng, hue_band=hue_band)
        background = _colour(rng, avoid=ink)
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


def _draw(spec: SyntheticSpec, label: int, index: int) -> Image.Image:
    rng = np.random.default_rng([spec.seed, label, index])
    band = label // len(SHAPES) if spec.classes > len(SHAPES) else None
    return render(SHAPES[label % len(SHAPES)], spec.size, spec.channels, rng, hue_band=band)


def generate(spec: SyntheticSpec, dest: Path) -> int:
    """Write ``dest/<class>/<class>_<index>.png`` for every class; returns the image count."""
    count = 0
    for label, name in enumerate(class_names(spec.classes)):
        (dest / name).mkdir(parents=True, exist_ok=True)
        for index in range(spec.per_class):
            _draw(spec, label, index).save(dest / name / f"{name}_{index:05d}.png", format="PNG", optimize=False)
            count += 1
    return count


def make_arrays(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """The same images as arrays (N, C, H, W) uint8 and labels, without touching the disk."""
    images, labels = [], []
    for label in range(spec.classes):
        for index in range(spec.per_class):
            array = np.asarray(_draw(spec, label, index))
            images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)
