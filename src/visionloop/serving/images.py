"""Uploaded bytes → the model's uint8 (C, H, W) input, through the transform training used.

The transform is the served model card's (``InputTransform.from_card``), the very code ``preprocess``
ran on the training images. Every way an upload can be wrong is an ApiError naming the problem: not
an image, empty, truncated, too many pixels (a decompression bomb is refused from its header, before
any pixel is decoded), or — when conversion is off for the request — a colour mode other than the
model's.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionloop.data.transform import InputTransform
from visionloop.serving.errors import ApiError


@dataclass
class DecodedImage:
    pixels: np.ndarray  # uint8 (C, H, W) at the model's input size
    width: int  # as uploaded
    height: int
    mode: str  # as uploaded
    converted: str | None  # e.g. "RGBA->L" when the colour mode was converted; resizing is not stated


def decode(data: bytes, transform: InputTransform, max_pixels: int, convert: bool, name: str) -> DecodedImage:
    """One upload (``name`` in messages) as ``transform``'s input; ``convert=False`` refuses other colour modes."""
    if not data:
        raise ApiError(422, f"{name}: empty upload (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # over Pillow's own limit
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ApiError(413, f"{name}: image has too many pixels (over {limit:,})", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ApiError(
            422, f"{name}: not an image PIL can read ({len(data)} bytes; send PNG, JPEG, …)", "not_an_image"
        ) from None
    except Exception as exc:
        raise ApiError(422, f"{name}: cannot read image header: {exc}", "not_an_image") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ApiError(
                413,
                f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,}",
                "too_many_pixels",
            )
        target = transform.mode
        converted = None
        if img.mode != target:
            if not convert:
                raise ApiError(
                    422,
                    f"{name}: image mode {img.mode} is not what the model takes ({target}); "
                    f"send convert=true to have it converted {img.mode}->{target}",
                    "image_mode",
                )
            converted = f"{img.mode}->{target}"
        try:
            img.load()
        except Exception as exc:  # truncated or corrupt pixel data
            raise ApiError(422, f"{name}: image data is damaged or truncated: {exc}", "damaged_image") from None
        try:
            pixels = transform.apply(img)
        except Exception as exc:  # a mode Pillow cannot convert (e.g. LAB -> RGB)
            raise ApiError(
                422, f"{name}: cannot convert image mode {img.mode} to {target}: {exc}", "image_mode"
            ) from None
    return DecodedImage(pixels, width, height, img.mode, converted)
