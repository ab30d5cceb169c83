"""The synthetic generator: deterministic PNG bytes, array layout, and spec validation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.data.synthetic import MAX_CLASSES, SHAPES, SyntheticSpec, class_names, generate, make_arrays


def digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_spec_and_seed_give_byte_identical_files(tmp_path):
    spec = SyntheticSpec(classes=3, per_class=4, size=16, channels=3, seed=7)
    assert generate(spec, tmp_path / "first") == 12
    assert generate(spec, tmp_path / "second") == 12
    first, second = digests(tmp_path / "first"), digests(tmp_path / "second")
    assert len(first) == 12
    assert first == second


def test_layout_is_one_folder_per_shape(tmp_path):
    spec = SyntheticSpec(classes=4, per_class=2, size=8, seed=0)
    generate(spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHAPES[:4])
    assert sorted(p.name for p in (tmp_path / "circle").iterdir()) == ["circle_00000.png", "circle_00001.png"]


def test_different_seed_gives_different_bytes(tmp_path):
    generate(SyntheticSpec(classes=2, per_class=3, size=16, seed=0), tmp_path / "a")
    generate(SyntheticSpec(classes=2, per_class=3, size=16, seed=1), tmp_path / "b")
    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a)


def test_images_within_a_class_differ(tmp_path):
    generate(SyntheticSpec(classes=2, per_class=5, size=16, seed=3), tmp_path)
    assert len(set(digests(tmp_path).values())) == 10


def test_make_arrays_shape_dtype_and_labels():
    spec = SyntheticSpec(classes=3, per_class=4, size=12, channels=3, seed=2)
    images, labels = make_arrays(spec)
    assert images.shape == (12, 3, 12, 12)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_make_arrays_matches_the_written_files(tmp_path):
    spec = SyntheticSpec(classes=2, per_class=2, size=16, channels=3, seed=5)
    generate(spec, tmp_path)
    images, labels = make_arrays(spec)
    for row, (label, index) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        shape = SHAPES[label]
        with Image.open(tmp_path / shape / f"{shape}_{index:05d}.png") as img:
            on_disk = np.asarray(img).transpose(2, 0, 1)
        np.testing.assert_array_equal(images[row], on_disk)
        assert labels[row] == label


def test_one_channel_gives_greyscale(tmp_path):
    spec = SyntheticSpec(classes=2, per_class=2, size=16, channels=1, seed=0)
    generate(spec, tmp_path)
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "L"
            assert img.size == (16, 16)
    images, _ = make_arrays(spec)
    assert images.shape == (4, 1, 16, 16)


def test_three_channels_give_rgb(tmp_path):
    generate(SyntheticSpec(classes=2, per_class=1, size=8, channels=3), tmp_path)
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "RGB"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": 1},
        {"classes": MAX_CLASSES + 1},
        {"classes": len(SHAPES) + 1, "channels": 1},
        {"per_class": 0},
        {"size": 7},
        {"channels": 2},
        {"channels": 4},
    ],
)
def test_invalid_spec_raises_value_error(kwargs):
    with pytest.raises(ValueError, match="synthetic"):
        SyntheticSpec(**kwargs)


def test_more_than_eight_classes_add_hue_bands(tmp_path):
    spec = SyntheticSpec(classes=20, per_class=2, size=16, channels=3, seed=0)
    assert generate(spec, tmp_path / "a") == 40
    names = class_names(20)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(names)
    assert len(set(names)) == 20 and names[0] == "circle-red" and names[8] == "circle-yellow"
    generate(spec, tmp_path / "b")
    for path in (tmp_path / "a").rglob("*.png"):  # same seed, same bytes, beyond 8 classes too
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
    images, labels = make_arrays(spec)
    assert images.shape == (40, 3, 16, 16) and labels.max() == 19


def test_up_to_eight_classes_keep_plain_shape_names():
    assert class_names(8) == list(SHAPES)


def test_hue_band_classes_always_find_a_background():
    """Every (class, index) of a large spec draws: an ink in a hue band never waits for a
    background far enough from it (24 x 60 at seed 0 once looped forever on such a pair)."""
    images, labels = make_arrays(SyntheticSpec(classes=24, per_class=60, size=16, channels=3, seed=0))
    assert images.shape == (1440, 3, 16, 16)
    assert np.bincount(labels).tolist() == [60] * 24
