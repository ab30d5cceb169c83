"""Non-finite pixels are bad input: a float image holding NaN/Inf is refused, not min-max scaled into garbage."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visionloop.data import preprocess
from visionloop.data.transform import InputTransform, NonFinitePixels


def float_image(bad: float | None) -> Image.Image:
    array = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    if bad is not None:
        array[3, 4] = bad
    return Image.fromarray(array, "F")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_pixels_are_refused_naming_the_problem(bad: float) -> None:
    with pytest.raises(NonFinitePixels, match="non-finite pixel values: 1 of 64"):
        InputTransform("L", 4).apply(float_image(bad))


def test_a_finite_float_image_is_still_scaled() -> None:
    pixels = InputTransform("L", 8).apply(float_image(None))
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255


def test_preprocess_reports_a_nan_tiff_as_an_image_that_does_not_decode(tmp_path) -> None:
    """Training reads images through the same transform: a NaN TIFF is a named bad image, not garbage pixels."""
    path = tmp_path / "nan.tiff"
    buffer = io.BytesIO()
    float_image(float("nan")).save(buffer, format="TIFF")
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="non-finite pixel values"):
        preprocess.load_image(path, 8, 1)


def test_validation_counts_a_nan_tiff_as_a_bad_file(tmp_path) -> None:
    """Bad training images are reported where bad images are counted: validation's report, not a crash later."""
    from visionloop.config import ValidationPolicy
    from visionloop.data.validate import validate

    for name, bad in (("nan.tiff", float("nan")), ("ok.tiff", None), ("ok2.tiff", None)):
        folder = tmp_path / "digit"
        folder.mkdir(exist_ok=True)
        float_image(bad).save(folder / name, format="TIFF")
    report = validate(tmp_path, ValidationPolicy(max_bad_fraction=0.5, min_images_per_class=1))
    assert list(report.bad_files) == ["digit/nan.tiff"]
    assert "non-finite pixel values" in report.bad_files["digit/nan.tiff"]
