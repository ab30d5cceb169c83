"""The one image → model-input transform: training (``preprocess``) and serving both call ``InputTransform.apply``.

Only numpy and Pillow are imported here, so the serving image can use it without scikit-learn or torch.

The transform, in order:

1. high bit depth (modes ``I``, ``I;16*``, ``F``): min-max scaled per image to 0-255 and truncated to
   uint8 (mode ``L``); a constant image becomes all 0; an image holding NaN or ±Inf (only float images
   can) is refused with ``NonFinitePixels``: min-max scaling would turn it into garbage pixels that the
   model then labels with confidence, in training as in serving;
2. ``convert`` to the model's mode (``L`` grey or ``RGB``; alpha dropped, palette expanded, CMYK
   through Pillow's own conversion);
3. resize to ``size`` x ``size`` with the stated resample filter (aspect ratio not kept), only when
   the size differs;
4. uint8 pixels in channel order C, H, W.

The exported model card states these parameters (``input_transform``, see ``to_card``) and serving
rebuilds the transform from the card (``from_card``), so what a server does to an upload is what the
card says training did; a card that states something this code cannot do is refused, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
MODE_OF_CHANNELS = {1: "L", 3: "RGB"}
RESAMPLE_FILTERS = {f.name.lower(): f for f in Image.Resampling}
HIGH_DEPTH_SCALING = "min-max"
LAYOUT = "CHW"
DTYPE = "uint8"
NORMALIZATION_APPLIED = "inside the graph"


class NonFinitePixels(ValueError):
    """An image whose pixel values include NaN or ±Inf: bad input, not something to scale."""

    def __init__(self, count: int, total: int) -> None:
        super().__init__(f"non-finite pixel values: {count:,} of {total:,} pixels are NaN or infinite")
        self.count = count


def check_finite(array: np.ndarray) -> None:
    """Raise ``NonFinitePixels`` when a float ``array`` holds NaN or ±Inf (integer arrays cannot)."""
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            raise NonFinitePixels(int(finite.size - np.count_nonzero(finite)), int(finite.size))


def check_finite_image(img: Image.Image) -> None:
    """``check_finite`` for a decoded image: validation calls it, so a NaN TIFF is counted as a bad file."""
    if img.mode == "F":  # the one Pillow mode that can hold NaN/Inf
        check_finite(np.asarray(img))


@dataclass(frozen=True)
class InputTransform:
    mode: str  # "L" or "RGB": the model's colour mode
    size: int  # the square side the model takes
    resample: str = "bilinear"
    high_depth_modes: tuple[str, ...] = HIGH_DEPTH_MODES

    def __post_init__(self) -> None:
        if self.mode not in MODE_OF_CHANNELS.values():
            raise ValueError(f"mode {self.mode!r} is not one of {sorted(MODE_OF_CHANNELS.values())}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample {self.resample!r} is not one of {sorted(RESAMPLE_FILTERS)}")
        if self.size < 1:
            raise ValueError(f"size must be at least 1, not {self.size}")

    @classmethod
    def for_model(cls, channels: int, image_size: int) -> InputTransform:
        """The transform training uses for a model of ``channels`` x ``image_size``²."""
        if channels not in MODE_OF_CHANNELS:
            raise ValueError(f"channels must be 1 or 3, not {channels}")
        return cls(MODE_OF_CHANNELS[channels], image_size)

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def apply(self, img: Image.Image) -> np.ndarray:
        """``img`` as the model's uint8 (C, H, W) input; ``NonFinitePixels`` for NaN/Inf pixels."""
        check_finite_image(img)  # before scaling, whatever the card's high-depth list says
        if img.mode in self.high_depth_modes:
            array = np.asarray(img, dtype=np.float64)
            span = array.max() - array.min()
            img = Image.fromarray(((array - array.min()) / (span or 1.0) * 255).astype(np.uint8), "L")
        converted = img.convert(self.mode)
        if converted.size != (self.size, self.size):
            converted = converted.resize((self.size, self.size), RESAMPLE_FILTERS[self.resample])
        array = np.asarray(converted, dtype=np.uint8)
        return array[None] if self.channels == 1 else array.transpose(2, 0, 1)

    def describe(self) -> str:
        """One line for people (the card's ``input.conversion`` and its Markdown)."""
        return (
            f"{'/'.join(self.high_depth_modes)}: min-max scaled to 0-255; PIL convert({self.mode!r})"
            f"{' (alpha dropped)' if self.mode == 'RGB' else ''}; resize to {self.size}x{self.size} "
            f"{self.resample}; uint8 {LAYOUT}; divide by 255"
        )

    def to_card(self, mean: list[float] | None = None, std: list[float] | None = None) -> dict:
        """The model card's ``input_transform`` block; ``mean``/``std`` are stated, applied inside the graph."""
        block: dict = {
            "mode": self.mode,
            "size": [self.size, self.size],
            "resample": self.resample,
            "high_bit_depth": {"modes": list(self.high_depth_modes), "scaling": HIGH_DEPTH_SCALING},
            "layout": LAYOUT,
            "dtype": DTYPE,
        }
        if mean is not None and std is not None:
            block["normalization"] = {"mean": mean, "std": std, "applied": NORMALIZATION_APPLIED}
        return block

    @classmethod
    def from_card(cls, card: dict) -> InputTransform:
        """The transform a model card states; a card from before ``input_transform`` gets training's defaults.

        Raises ValueError naming the field when the card asks for something this code does not do, or
        for a shape that does not fit the card's own ``channels``/``image_size``.
        """
        channels, image_size = int(card["channels"]), int(card["image_size"])
        block = card.get("input_transform")
        if block is None:
            return cls.for_model(channels, image_size)
        try:
            high = block.get("high_bit_depth", {})
            expected = {
                "layout": (block.get("layout", LAYOUT), LAYOUT),
                "dtype": (block.get("dtype", DTYPE), DTYPE),
                "high_bit_depth.scaling": (high.get("scaling", HIGH_DEPTH_SCALING), HIGH_DEPTH_SCALING),
                "normalization.applied": (
                    block.get("normalization", {}).get("applied", NORMALIZATION_APPLIED),
                    NORMALIZATION_APPLIED,
                ),
                "size": (list(block["size"]), [image_size, image_size]),
                "mode": (block["mode"], MODE_OF_CHANNELS.get(channels)),
            }
            for field, (stated, supported) in expected.items():
                if stated != supported:
                    raise ValueError(f"{field} is {stated!r}; this server applies only {supported!r} here")
            return cls(
                block["mode"],
                image_size,
                block.get("resample", "bilinear"),
                tuple(high.get("modes", HIGH_DEPTH_MODES)),
            )
        except KeyError as exc:
            raise ValueError(f"model card input_transform: {exc.args[0]!r} is missing") from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"model card input_transform: {exc}") from None


def to_array(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """``img`` as uint8 (C, H, W) for a model of ``channels`` x ``image_size``², as training prepares it."""
    return InputTransform.for_model(channels, image_size).apply(img)
