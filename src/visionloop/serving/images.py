"""Uploaded bytes → the model's uint8 (C, H, W) input, through the transform training used.

The transform is the served model card's (``InputTransform.from_card``), the very code ``preprocess``
ran on the training images. Every way an upload can be wrong is an ApiError naming the problem: not
an image, empty, truncated, too many pixels (a decompression bomb is refused from its header, before
any pixel is decoded), NaN/Inf pixel values, or — when conversion is off for the request — a colour mode
other than the model's.

Decoding is split in two so that the route can decide where it runs from what it will cost:
``open_upload`` reads only the header (width x height, mode) and is cheap enough for the event loop;
``finish`` decodes the pixels and applies the transform, which for a 4900x4900 PNG of 200 KB takes
a quarter of a second of CPU. Large uploads go whole to ``decode_all`` in a worker process
(``serving/admission.py`` says why).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionloop.data.transform import InputTransform, NonFinitePixels
from visionloop.serving.errors import ApiError, first_error
from visionloop.serving.schemas import PredictJson


@dataclass
class DecodedImage:
    pixels: np.ndarray  # uint8 (C, H, W) at the model's input size
    width: int  # as uploaded
    height: int
    mode: str  # as uploaded
    converted: str | None  # e.g. "RGBA->L" when the colour mode was converted; resizing is not stated


@dataclass
class OpenedImage:
    """An upload whose header has been read but whose pixels have not: what decoding it will cost is known."""

    image: Image.Image
    name: str
    size_bytes: int
    converted: str | None

    @property
    def pixels(self) -> int:
        width, height = self.image.size
        return width * height

    @property
    def unbounded_per_pixel(self) -> bool:
        """A progressive JPEG: each scan is another pass over the pixels, and a small file can hold thousands of
        scans, so its pixel count does not bound its cost. It never decodes on the event loop."""
        return bool(self.image.info.get("progressive"))


def open_upload(data: bytes, transform: InputTransform, max_pixels: int, convert: bool, name: str) -> OpenedImage:
    """Read only the header of one upload (``name`` in messages): cheap, so it runs on the event loop.

    Refuses, before any pixel is decoded, what the header already shows to be wrong: not an image, too many
    pixels (a decompression bomb), a colour mode other than the model's when ``convert`` is False.
    """
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
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ApiError(
            413,
            f"{name}: {width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,}",
            "too_many_pixels",
        )
    target = transform.mode
    converted = None
    if img.mode != target:
        if not convert:
            img.close()
            raise ApiError(
                422,
                f"{name}: image mode {img.mode} is not what the model takes ({target}); "
                f"send convert=true to have it converted {img.mode}->{target}",
                "image_mode",
            )
        converted = f"{img.mode}->{target}"
    return OpenedImage(img, name, len(data), converted)


def finish(opened: OpenedImage, transform: InputTransform) -> DecodedImage:
    """Decode the pixels of an opened upload and apply ``transform``: the expensive part (it may run off the loop)."""
    name = opened.name
    with opened.image as img:
        width, height = img.size
        try:
            img.load()
        except Exception as exc:  # truncated or corrupt pixel data
            raise ApiError(422, f"{name}: image data is damaged or truncated: {exc}", "damaged_image") from None
        try:
            pixels = transform.apply(img)
        except NonFinitePixels as exc:  # a float image holding NaN/Inf: min-max scaling would make garbage of it
            raise ApiError(422, f"{name}: {exc}", "non_finite") from None
        except Exception as exc:  # a mode Pillow cannot convert (e.g. LAB -> RGB)
            raise ApiError(
                422, f"{name}: cannot convert image mode {img.mode} to {transform.mode}: {exc}", "image_mode"
            ) from None
        return DecodedImage(pixels, width, height, img.mode, opened.converted)


def decode(data: bytes, transform: InputTransform, max_pixels: int, convert: bool, name: str) -> DecodedImage:
    """One upload (``name`` in messages) as ``transform``'s input; ``convert=False`` refuses other colour modes."""
    return finish(open_upload(data, transform, max_pixels, convert, name), transform)


def decode_all(
    uploads: list[tuple[str, bytes]], transform: InputTransform, max_pixels: int, convert: bool
) -> list[DecodedImage]:
    """``decode`` every upload: what the decode worker process runs (an ApiError comes back to the server whole)."""
    return [decode(data, transform, max_pixels, convert, name) for name, data in uploads]


def parse_predict_json(body: bytes, max_images: int) -> tuple[list[tuple[str, bytes]], int | None, bool | None]:
    """A ``/predict`` JSON body as ((name, bytes) per image, top_k, convert); ApiError naming what is wrong."""
    try:
        parsed = PredictJson.model_validate_json(body)
    except ValueError as exc:
        raise ApiError(422, f"bad JSON body: {first_error(exc)}", "bad_json") from None
    if not parsed.images:
        raise ApiError(422, "'images' is empty; send at least one base64-encoded image", "no_images")
    if len(parsed.images) > max_images:
        raise ApiError(413, f"{len(parsed.images)} images in one request; the limit is {max_images}", "too_many_images")
    uploads = []
    for i, text in enumerate(parsed.images):
        payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            uploads.append((f"images[{i}]", base64.b64decode(payload, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(422, f"images[{i}] is not valid base64", "bad_base64") from None
    return uploads, parsed.top_k, parsed.convert
