"""Serving takes what training took: uploads in any common format and mode reach the grey digits champion
converted as preprocessing converted them, and say so; ``convert=false`` (per request or as the setting)
refuses them as before."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from visionloop.data.preprocess import Dataset
from visionloop.data.transform import InputTransform


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploads(digits_dataset: Dataset) -> dict[str, tuple[bytes, str, int]]:
    """(bytes, mode as uploaded, true class) of one test digit in each format, at 48x48 (not the model's 16)."""
    x_test, y_test = digits_dataset.part("test")
    grey = Image.fromarray(np.asarray(x_test[1][0])).resize((48, 48), Image.Resampling.BILINEAR)
    label = int(y_test[1])
    rgb = grey.convert("RGB")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    deep = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)  # the same digit on 0-65535
    files = {
        "rgb.jpg": (encode(rgb, "JPEG", quality=95), "RGB"),
        "rgba.png": (encode(rgba, "PNG"), "RGBA"),
        "palette.gif": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "GIF"), "P"),
        "deep.png": (encode(deep, "PNG"), "I;16"),
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG", quality=95), "CMYK"),
        "rgb.webp": (encode(rgb, "WEBP", lossless=True), "RGB"),
        "rgb.bmp": (encode(rgb, "BMP"), "RGB"),
    }
    for name, (data, mode) in files.items():
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode == mode, (name, img.mode)  # the test sends what it says it sends
    return {name: (data, mode, label) for name, (data, mode) in files.items()}


NAMES = ["rgb.jpg", "rgba.png", "palette.gif", "deep.png", "cmyk.jpg", "rgb.webp", "rgb.bmp"]


def logged_conversion(home: Path, request_id: str) -> str | None:
    """The ``converted`` column of a prediction, once the log's writer thread has committed it."""
    deadline = time.monotonic() + 30
    while True:
        with sqlite3.connect(home / "monitoring" / "predictions.db") as db:
            row = db.execute("SELECT converted FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None or time.monotonic() > deadline:
            assert row is not None, f"{request_id} never reached the prediction log"
            return row[0]
        time.sleep(0.1)


@pytest.mark.parametrize("name", NAMES)
def test_each_format_is_converted_by_default_and_says_so(champion_server, champion_settings, uploads, name):
    data, mode, label = uploads[name]
    with champion_server.client() as http:
        answer = http.post("/predict", files={"file": (name, data)})
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["predictions"][0]
    assert prediction["converted"] == f"{mode}->L"
    assert prediction["label"] == str(label)
    assert logged_conversion(champion_settings.home, prediction["request_id"]) == f"{mode}->L"


@pytest.mark.parametrize("name", NAMES)
def test_each_format_is_refused_with_convert_false(champion_server, uploads, name):
    data, mode, _ = uploads[name]
    with champion_server.client() as http:
        by_query = http.post("/predict", params={"convert": "false"}, files={"file": (name, data)})
        by_json = http.post("/predict", json={"images": [base64.b64encode(data).decode()], "convert": False})
    for answer, shown in ((by_query, name), (by_json, "images[0]")):
        assert answer.status_code == 422, answer.text
        assert answer.json() == {
            "error": f"{shown}: image mode {mode} is not what the model takes (L); "
            f"send convert=true to have it converted {mode}->L"
        }


def test_the_json_body_wins_over_the_query(champion_server, uploads):
    data, mode, _ = uploads["rgba.png"]
    body = {"images": [base64.b64encode(data).decode()], "convert": True}
    with champion_server.client() as http:
        answer = http.post("/predict", params={"convert": "false"}, json=body)
        refused = http.post("/predict", params={"convert": "true"}, json={**body, "convert": False})
    assert answer.status_code == 200 and answer.json()["predictions"][0]["converted"] == f"{mode}->L"
    assert refused.status_code == 422


def test_the_only_size_changed_upload_states_no_conversion(champion_server, digits_dataset):
    x_test, _ = digits_dataset.part("test")
    big_grey = encode(Image.fromarray(np.asarray(x_test[1][0])).resize((48, 48)), "PNG")
    with champion_server.client() as http:
        answer = http.post("/predict", params={"convert": "false"}, files={"file": ("grey.png", big_grey)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["converted"] is None


def test_the_served_card_states_the_transform_the_server_applies(strong_export: Path, digits_dataset: Dataset):
    card = json.loads((strong_export / "model_card.json").read_text())
    manifest = digits_dataset.manifest
    assert card["input_transform"] == {
        "mode": "L",
        "size": [manifest.image_size, manifest.image_size],
        "resample": "bilinear",
        "high_bit_depth": {"modes": ["I", "I;16", "I;16B", "I;16L", "F"], "scaling": "min-max"},
        "layout": "CHW",
        "dtype": "uint8",
        "normalization": {"mean": manifest.mean, "std": manifest.std, "applied": "inside the graph"},
    }
    assert InputTransform.from_card(card) == InputTransform.for_model(manifest.channels, manifest.image_size)


@pytest.fixture(scope="module")
def strict_by_setting(request: pytest.FixtureRequest, champion_settings) -> Iterator[Any]:
    """The champion served with serve.convert=false: conversion only where a request asks for it."""
    conftest = request.config.pluginmanager.get_plugin(str(Path(__file__).with_name("conftest.py")))
    server = conftest.launch(
        champion_settings.home,
        "--model-name", champion_settings.registry.model_name,
        "--poll-seconds", "0",
        "--set", "serve.convert=false",
        "--set", "serve.log_predictions=false",  # the module's champion_server writes the shared home's log
    )  # fmt: skip
    yield server
    server.stop()


def test_the_setting_off_refuses_unless_a_request_asks(strict_by_setting, uploads):
    data, mode, label = uploads["rgba.png"]
    with strict_by_setting.client() as http:
        refused = http.post("/predict", files={"file": ("rgba.png", data)})
        by_query = http.post("/predict", params={"convert": "true"}, files={"file": ("rgba.png", data)})
        by_json = http.post("/predict", json={"images": [base64.b64encode(data).decode()], "convert": True})
    assert refused.status_code == 422
    assert f"image mode {mode} is not what the model takes (L)" in refused.json()["error"]
    for answer in (by_query, by_json):
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["converted"] == f"{mode}->L"
        assert answer.json()["predictions"][0]["label"] == str(label)
