"""Decoding uploads: native modes, stated conversions, damaged files, pixel bombs, parity with training."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visionloop.data.preprocess import to_array
from visionloop.data.transform import InputTransform
from visionloop.serving.errors import ApiError
from visionloop.serving.images import decode

SIZE = 8  # the model's input side
MAX_PIXELS = 1_000_000


def noise_image(mode: str, size: tuple[int, int] = (20, 12), seed: int = 0) -> Image.Image:
    """Random pixels in any PIL mode (made from RGBA noise, converted)."""
    width, height = size
    rgba = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    return (img.convert("RGB") if mode == "P" else img).convert(mode)  # P from RGB: an opaque palette


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def model_input(channels: int) -> InputTransform:
    """The transform a server applies for a model of ``channels`` x SIZE² (a card without input_transform)."""
    return InputTransform.from_card({"channels": channels, "image_size": SIZE})


def training_array(data: bytes, channels: int) -> np.ndarray:
    """What preprocessing makes of the same bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return to_array(img, SIZE, channels)


def refused(data: bytes, channels: int = 3, max_pixels: int = MAX_PIXELS, convert: bool = False) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode(data, model_input(channels), max_pixels, convert, "upload.png")
    return caught.value


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_native_mode_passes_and_is_resized_like_training(tmp_path, write_png, mode, channels):
    data = write_png(tmp_path / "x.png", size=(20, 12), mode=mode, seed=3).read_bytes()
    decoded = decode(data, model_input(channels), MAX_PIXELS, False, "x.png")
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.shape == (channels, SIZE, SIZE)
    assert (decoded.width, decoded.height, decoded.mode, decoded.converted) == (20, 12, mode, None)
    np.testing.assert_array_equal(decoded.pixels, training_array(data, channels))


def test_image_at_the_model_size_keeps_its_pixels(tmp_path, write_png):
    path = write_png(tmp_path / "x.png", size=SIZE, mode="RGB", seed=4)
    decoded = decode(path.read_bytes(), model_input(3), MAX_PIXELS, False, "x.png")
    with Image.open(path) as img:
        np.testing.assert_array_equal(decoded.pixels, np.asarray(img).transpose(2, 0, 1))


def test_jpeg_decodes_like_training():
    data = encode(noise_image("RGB", (33, 17)), "JPEG", quality=90)
    decoded = decode(data, model_input(3), MAX_PIXELS, False, "x.jpg")
    assert (decoded.mode, decoded.width, decoded.height) == ("RGB", 33, 17)
    np.testing.assert_array_equal(decoded.pixels, training_array(data, 3))


NON_NATIVE = [
    # (mode as uploaded, format, channels the model takes)
    ("RGBA", "PNG", 1),
    ("RGBA", "PNG", 3),
    ("P", "PNG", 3),
    ("P", "PNG", 1),
    ("LA", "PNG", 1),
    ("LA", "PNG", 3),
    ("1", "PNG", 1),
    ("CMYK", "JPEG", 3),
    ("L", "PNG", 3),  # grey photo for a colour model
    ("RGB", "PNG", 1),  # colour photo for a grey model
]


@pytest.mark.parametrize("mode, fmt, channels", NON_NATIVE)
def test_non_native_mode_is_refused_with_422_naming_the_mode(mode, fmt, channels):
    data = encode(noise_image(mode), fmt)
    error = refused(data, channels)
    target = "L" if channels == 1 else "RGB"
    assert (error.status, error.reason) == (422, "image_mode")
    assert f"upload.png: image mode {mode} is not what the model takes ({target})" in error.message
    assert f"convert=true to have it converted {mode}->{target}" in error.message


@pytest.mark.parametrize("mode, fmt, channels", NON_NATIVE)
def test_non_native_mode_with_convert_is_converted_like_training(mode, fmt, channels):
    data = encode(noise_image(mode), fmt)
    decoded = decode(data, model_input(channels), MAX_PIXELS, True, "x")
    target = "L" if channels == 1 else "RGB"
    assert decoded.converted == f"{mode}->{target}"
    assert decoded.mode == mode
    assert decoded.pixels.shape == (channels, SIZE, SIZE)
    np.testing.assert_array_equal(decoded.pixels, training_array(data, channels))


def test_native_mode_with_convert_states_no_conversion(tmp_path, write_png):
    data = write_png(tmp_path / "x.png", mode="L").read_bytes()
    assert decode(data, model_input(1), MAX_PIXELS, True, "x").converted is None


def sixteen_bit_png() -> bytes:
    ramp = np.linspace(1000, 60000, 16 * 16).astype(np.uint16).reshape(16, 16)  # a full-range 16-bit gradient
    data = encode(Image.fromarray(ramp))
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "I;16"
    return data


def test_16_bit_png_is_refused_without_convert():
    error = refused(sixteen_bit_png(), channels=1)
    assert error.status == 422
    assert "image mode I;16" in error.message


def test_16_bit_png_with_convert_is_scaled_like_training():
    data = sixteen_bit_png()
    decoded = decode(data, model_input(1), MAX_PIXELS, True, "depth.png")
    assert decoded.converted == "I;16->L"
    np.testing.assert_array_equal(decoded.pixels, training_array(data, 1))
    # stretched to 0-255 rather than clipped: the gradient still spans the whole range
    assert decoded.pixels.min() < 20 and decoded.pixels.max() > 235


def test_empty_upload_is_a_422():
    error = refused(b"")
    assert (error.status, error.reason) == (422, "empty")
    assert error.message == "upload.png: empty upload (0 bytes)"


def test_random_bytes_are_a_422():
    data = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    error = refused(data)
    assert (error.status, error.reason) == (422, "not_an_image")
    assert "upload.png: not an image PIL can read (500 bytes" in error.message


def test_text_is_a_422():
    error = refused(b"hello, this is not a picture\n")
    assert (error.status, error.reason) == (422, "not_an_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_a_422(fmt):
    data = encode(noise_image("RGB", (64, 64)), fmt)
    error = refused(data[: len(data) // 2])
    assert (error.status, error.reason) == (422, "damaged_image")
    assert "upload.png: image data is damaged or truncated" in error.message


def single_colour_png(width: int, height: int) -> bytes:
    return encode(Image.new("L", (width, height), 128))  # compresses to almost nothing


def test_too_many_pixels_is_a_413_from_the_header():
    data = single_colour_png(5000, 5000)
    error = refused(data, channels=1)
    assert (error.status, error.reason) == (413, "too_many_pixels")
    assert error.message == "upload.png: 5000x5000 = 25,000,000 pixels is over the limit of 1,000,000"
    # refused before any pixel is decoded: the same header with the pixel data cut off gives the same answer
    header_only = refused(data[:200], channels=1)
    assert (header_only.status, header_only.message) == (413, error.message)


def test_pixel_limit_is_inclusive():
    decoded = decode(single_colour_png(40, 25), model_input(1), 1000, False, "x")
    assert (decoded.width, decoded.height) == (40, 25)
    assert np.all(decoded.pixels == 128)
    assert refused(single_colour_png(41, 25), channels=1, max_pixels=1000).status == 413


@pytest.mark.parametrize("size", [(40, 30), (40, 60)], ids=["bomb-warning", "bomb-error"])
def test_pillows_own_pixel_limit_is_the_one_named_when_it_is_lower(monkeypatch, size):
    # serve.max_pixels cannot be set above Pillow's default limit (see test_config); here Pillow's limit
    # is lowered to 1000 to keep the image cheap, and the 413 names the limit that actually applied
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    error = refused(single_colour_png(*size), channels=1, max_pixels=10_000)
    assert error.status == 413
    assert "over 1,000" in error.message
