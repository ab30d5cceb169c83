"""One transform for training and serving: byte-identical pixels, stated in the card, applied as stated."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.config import Settings
from visionloop.data import preprocess, transform
from visionloop.data.transform import InputTransform
from visionloop.inference import OnnxClassifier
from visionloop.serving.images import decode
from visionloop.serving.model import LoadedModel

SIZE = 12
MAX_PIXELS = 1_000_000


def digit_like(seed: int = 0, size: tuple[int, int] = (37, 29)) -> Image.Image:
    """A smooth RGB picture with some structure (resampling noise alone would hide a wrong filter)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, rng.integers(0, 256, (height, width))], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def files() -> dict[str, tuple[bytes, str]]:
    """The formats and modes serving takes: (bytes, mode Pillow opens them in)."""
    img = digit_like()
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    deep = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 200 + 300).astype(np.uint16))

    def save(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    out = {
        "rgb.jpg": (save(img, "JPEG", quality=90), "RGB"),
        "rgba.png": (save(rgba, "PNG"), "RGBA"),
        "palette.gif": (save(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "GIF"), "P"),
        "deep.png": (save(deep, "PNG"), "I;16"),
        "cmyk.jpg": (save(img.convert("CMYK"), "JPEG", quality=90), "CMYK"),
        "rgb.webp": (save(img, "WEBP", quality=80), "RGB"),
        "rgb.bmp": (save(img, "BMP"), "RGB"),
        "grey.png": (save(img.convert("L"), "PNG"), "L"),
    }
    for name, (data, mode) in out.items():
        with Image.open(io.BytesIO(data)) as opened:
            assert opened.mode == mode, name
    return out


FILES = files()


def card_for(channels: int, **block: object) -> dict:
    """A model card as export writes it, with ``block`` overriding fields of its input_transform."""
    stated = InputTransform.for_model(channels, SIZE).to_card([0.5] * channels, [0.25] * channels)
    return {"channels": channels, "image_size": SIZE, "classes": ["a", "b"], "input_transform": stated | block}


def test_preprocess_uses_the_transform_module_itself():
    # one implementation: preprocess imports the function, it does not keep a copy
    assert preprocess.to_array is transform.to_array


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(FILES))
def test_served_pixels_are_byte_identical_to_the_training_pixels(tmp_path: Path, name: str, channels: int):
    data, mode = FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    trained = preprocess.load_image(path, SIZE, channels)  # what preprocess stores in data.npz
    served = decode(data, InputTransform.from_card(card_for(channels)), MAX_PIXELS, True, name)
    assert served.pixels.dtype == trained.dtype == np.uint8
    assert served.pixels.shape == trained.shape == (channels, SIZE, SIZE)
    assert served.pixels.tobytes() == trained.tobytes()
    target = "L" if channels == 1 else "RGB"
    assert served.converted == (None if mode == target else f"{mode}->{target}")


@pytest.mark.parametrize("channels", [1, 3])
def test_the_card_block_round_trips_and_an_old_card_gets_the_same_defaults(channels: int):
    stated = InputTransform.from_card(card_for(channels))
    old_card = {"channels": channels, "image_size": SIZE, "classes": ["a", "b"]}  # exported before the block
    assert stated == InputTransform.from_card(old_card) == InputTransform.for_model(channels, SIZE)
    assert (stated.mode, stated.size, stated.channels) == ("L" if channels == 1 else "RGB", SIZE, channels)


def test_the_block_states_every_parameter():
    assert card_for(1)["input_transform"] == {
        "mode": "L",
        "size": [SIZE, SIZE],
        "resample": "bilinear",
        "high_bit_depth": {"modes": ["I", "I;16", "I;16B", "I;16L", "F"], "scaling": "min-max"},
        "layout": "CHW",
        "dtype": "uint8",
        "normalization": {"mean": [0.5], "std": [0.25], "applied": "inside the graph"},
    }


def test_the_server_applies_the_resample_filter_the_card_states():
    data, _ = FILES["rgb.bmp"]
    served = decode(data, InputTransform.from_card(card_for(3, resample="nearest")), MAX_PIXELS, True, "x")
    with Image.open(io.BytesIO(data)) as img:
        nearest = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.NEAREST)).transpose(2, 0, 1)
        bilinear = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(served.pixels, nearest)
    assert not np.array_equal(served.pixels, bilinear)  # so the card's choice is what made the difference


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ({"resample": "magic"}, "resample 'magic' is not one of"),
        ({"layout": "HWC"}, "layout is 'HWC'; this server applies only 'CHW'"),
        ({"dtype": "float32"}, "dtype is 'float32'"),
        ({"mode": "RGB"}, "mode is 'RGB'; this server applies only 'L'"),
        ({"size": [SIZE, SIZE + 1]}, f"size is [{SIZE}, {SIZE + 1}]"),
        ({"high_bit_depth": {"modes": ["I;16"], "scaling": "clip"}}, "high_bit_depth.scaling is 'clip'"),
        ({"normalization": {"mean": [0.5], "std": [0.2], "applied": "by the client"}}, "normalization.applied"),
        ({"mode": None}, "mode is None"),
    ],
)
def test_a_card_stating_what_this_server_cannot_apply_is_refused(override: dict, says: str):
    with pytest.raises(ValueError, match="model card input_transform: ") as caught:
        InputTransform.from_card(card_for(1, **override))
    assert says in str(caught.value)


def test_a_card_missing_a_field_is_refused_naming_it():
    card = card_for(1)
    del card["input_transform"]["size"]
    with pytest.raises(ValueError, match="'size' is missing"):
        InputTransform.from_card(card)


def test_a_model_whose_card_cannot_be_applied_does_not_load():
    # LoadedModel builds the transform when the holder loads a version, so a reload refuses it up front
    with pytest.raises(ValueError, match="resample 'magic'"):
        LoadedModel("m", "1", OnnxClassifier(session=None, card=card_for(1, resample="magic")))
    assert LoadedModel("m", "1", OnnxClassifier(session=None, card=card_for(3))).transform.mode == "RGB"


def test_the_setting_defaults_to_converting_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch):
    assert Settings().serve.convert is True
    monkeypatch.setenv("VISIONLOOP_SERVE__CONVERT", "false")
    assert Settings().serve.convert is False
