"""Preprocessing on real folders: input shape, dataset versions, stratified splits, statistics."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.config import ValidationPolicy
from visionloop.data.preprocess import (
    SPLITS,
    Dataset,
    PreprocessParams,
    check_no_leak,
    dataset_version,
    load_dataset,
    load_image,
    preprocess,
    resolve_shape,
    to_array,
)
from visionloop.data.sources import IngestResult, ingest
from visionloop.data.validate import ValidationReport, validate
from visionloop.errors import DataError
from visionloop.fsutil import read_json

POLICY = ValidationPolicy(min_images_per_class=2)
PARAMS = PreprocessParams(image_size=0, channels=0, val_fraction=0.1, test_fraction=0.2, seed=0)


def write_levels(root: Path, classes: dict[str, int], size: int = 8) -> Path:
    """Grey images of constant brightness, a different level for every image (so no duplicates)."""
    level = 0
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            level += 1
            Image.new("L", (size, size), (level * 37) % 256).save(root / name / f"{i:03d}.png")
    return root


# --- input shape ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[IngestResult, ValidationReport]:
    """The built-in digits, ingested and validated once for this module."""
    result = ingest("digits", tmp_path_factory.mktemp("digits") / "home")
    return result, validate(result.root, ValidationPolicy())


def test_resolve_shape_for_8x8_grey_digits(digits):
    _result, report = digits
    assert report.modes == {"L": 1797}
    assert resolve_shape(report, 0, 0) == (16, 1)  # 8 px rounded up to the 16 px floor
    assert resolve_shape(report, 24, 3) == (24, 3)  # explicit values win


def test_resolve_shape_for_rgb(make_image_folder):
    report = validate(make_image_folder(per_class=3, size=40), POLICY)
    assert resolve_shape(report, 0, 0) == (40, 3)
    big = validate(make_image_folder(per_class=3, size=100), POLICY)
    assert resolve_shape(big, 0, 0) == (64, 3)  # capped
    odd = validate(make_image_folder(per_class=3, size=29), POLICY)
    assert resolve_shape(odd, 0, 0) == (32, 3)  # rounded to a multiple of 8


def test_resolve_shape_mixed_grey_and_colour_is_rgb(make_image_folder):
    root = make_image_folder(classes=("a",), per_class=3, mode="L")
    make_image_folder(root=root, classes=("b",), per_class=3, mode="RGB", seed=1)
    assert resolve_shape(validate(root, POLICY), 0, 0)[1] == 3


# --- dataset version --------------------------------------------------------------------------------


def test_dataset_version_depends_on_content_not_location(make_image_folder, tmp_path):
    root = make_image_folder(classes=("a", "b", "c"), per_class=4)
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
    (copy / "a" / "a_000.png").rename(copy / "a" / "renamed.png")  # names do not matter either
    assert dataset_version(validate(root, POLICY), PARAMS) == dataset_version(validate(copy, POLICY), PARAMS)


def test_dataset_version_changes_with_a_label(make_image_folder, tmp_path):
    root = make_image_folder(classes=("a", "b", "c"), per_class=4)
    before = dataset_version(validate(root, POLICY), PARAMS)
    shutil.move(root / "a" / "a_000.png", root / "b" / "a_000.png")
    assert dataset_version(validate(root, POLICY), PARAMS) != before


def test_dataset_version_changes_with_content(make_image_folder, write_png):
    root = make_image_folder(per_class=4)
    before = dataset_version(validate(root, POLICY), PARAMS)
    write_png(root / "a" / "a_000.png", seed=12345)
    assert dataset_version(validate(root, POLICY), PARAMS) != before


@pytest.mark.parametrize(
    "change", [{"seed": 1}, {"image_size": 32}, {"channels": 1}, {"val_fraction": 0.15}, {"test_fraction": 0.25}]
)
def test_dataset_version_changes_with_a_parameter(make_image_folder, change):
    report = validate(make_image_folder(per_class=4), POLICY)
    changed = PreprocessParams(**{**PARAMS.__dict__, **change})
    assert dataset_version(report, changed) != dataset_version(report, PARAMS)
    assert dataset_version(report, PARAMS).startswith("ds-")


# --- preprocess -------------------------------------------------------------------------------------


@pytest.fixture
def three_classes(tmp_path) -> Path:
    return write_levels(tmp_path / "levels", {"a": 20, "b": 20, "c": 20}, size=8)


def test_preprocess_writes_arrays_and_manifest(three_classes, tmp_path):
    report = validate(three_classes, POLICY)
    folder = preprocess(report, PARAMS, tmp_path / "datasets", source="levels", hflip_ok=True)
    assert folder == tmp_path / "datasets" / dataset_version(report, PARAMS)
    assert sorted(p.name for p in folder.iterdir()) == ["data.npz", "manifest.json"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # no temporary folder left
    manifest = read_json(folder / "manifest.json")
    assert manifest["version"] == folder.name
    assert manifest["classes"] == ["a", "b", "c"]
    assert (manifest["image_size"], manifest["channels"]) == (16, 1)
    assert manifest["source"] == "levels"
    assert manifest["hflip_ok"] is True
    assert manifest["params"] == PARAMS.__dict__

    dataset = load_dataset(folder)
    assert dataset.images.shape == (60, 1, 16, 16)
    assert dataset.images.dtype == np.uint8
    assert dataset.labels.dtype == np.int64
    assert sorted(np.unique(dataset.split).tolist()) == [0, 1, 2]
    assert sorted(str(h) for h in dataset.hashes) == sorted(r.sha256 for r in report.files)
    check_no_leak(dataset)
    # the arrays hold the converted images, in the report's order
    for i, record in enumerate(report.files):
        np.testing.assert_array_equal(dataset.images[i], load_image(three_classes / record.path, 16, 1))
        assert manifest["classes"][dataset.labels[i]] == record.label


def test_splits_are_stratified_with_the_right_fractions(three_classes, tmp_path):
    dataset = load_dataset(preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets"))
    sizes = {name: int((dataset.split == s).sum()) for s, name in enumerate(SPLITS)}
    assert sizes == {"train": 42, "val": 6, "test": 12}  # 60 images: 20% test, 10% val
    for s, name in enumerate(SPLITS):
        per_class = np.bincount(dataset.labels[dataset.split == s], minlength=3)
        assert per_class.tolist() == [sizes[name] // 3] * 3, name  # every class, in proportion
    counts = dataset.manifest.counts
    assert counts == {
        "train": {"a": 14, "b": 14, "c": 14},
        "val": {"a": 2, "b": 2, "c": 2},
        "test": {"a": 4, "b": 4, "c": 4},
    }
    images, labels = dataset.part("test")
    assert len(images) == len(labels) == 12


def test_every_class_in_every_split_when_classes_are_unbalanced(tmp_path):
    root = write_levels(tmp_path / "skewed", {"common": 40, "rare": 10})
    dataset = load_dataset(preprocess(validate(root, POLICY), PARAMS, tmp_path / "datasets"))
    for s in range(3):
        assert set(dataset.labels[dataset.split == s].tolist()) == {0, 1}
    assert dataset.manifest.counts["test"] == {"common": 8, "rare": 2}


def test_normalisation_comes_from_the_training_split_only(three_classes, tmp_path):
    dataset = load_dataset(preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets"))
    train = dataset.images[dataset.split == 0].astype(np.float64) / 255.0
    everything = dataset.images.astype(np.float64) / 255.0
    np.testing.assert_allclose(dataset.manifest.mean, train.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(dataset.manifest.std, train.std(axis=(0, 2, 3)), atol=1e-6)
    # the brightness differs image by image, so statistics over all splits would be different
    assert abs(dataset.manifest.mean[0] - everything.mean()) > 1e-4


def test_preprocess_rgb_statistics_per_channel(make_image_folder, tmp_path):
    root = make_image_folder(classes=("a", "b"), per_class=10, size=16)
    folder = preprocess(validate(root, POLICY), PARAMS, tmp_path / "datasets")
    dataset = load_dataset(folder)
    assert dataset.images.shape == (20, 3, 16, 16)
    train = dataset.images[dataset.split == 0].astype(np.float64) / 255.0
    np.testing.assert_allclose(dataset.manifest.mean, train.mean(axis=(0, 2, 3)), atol=1e-6)
    assert len(dataset.manifest.std) == 3


def test_check_no_leak_finds_one_image_in_two_splits(three_classes, tmp_path):
    dataset = load_dataset(preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets"))
    leaky_hashes = dataset.hashes.copy()
    train_at, test_at = int(np.flatnonzero(dataset.split == 0)[0]), int(np.flatnonzero(dataset.split == 2)[0])
    leaky_hashes[test_at] = leaky_hashes[train_at]
    leaky = Dataset(dataset.manifest, dataset.images, dataset.labels, dataset.split, leaky_hashes)
    with pytest.raises(DataError, match=f"{str(leaky_hashes[train_at])[:12]} is in two splits"):
        check_no_leak(leaky)


def test_check_no_leak_allows_copies_within_one_split(three_classes, tmp_path):
    dataset = load_dataset(preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets"))
    hashes = dataset.hashes.copy()
    first, second = np.flatnonzero(dataset.split == 0)[:2]
    hashes[second] = hashes[first]
    check_no_leak(Dataset(dataset.manifest, dataset.images, dataset.labels, dataset.split, hashes))


def test_preprocess_refuses_a_failed_report(make_image_folder, tmp_path):
    report = validate(make_image_folder(classes=("only",), per_class=10), POLICY)
    assert not report.passed
    with pytest.raises(DataError, match=r"validation failed.*at least 2 classes"):
        preprocess(report, PARAMS, tmp_path / "datasets")
    assert not (tmp_path / "datasets").exists()


def test_preprocess_too_few_images_to_stratify(tmp_path):
    report = validate(write_levels(tmp_path / "tiny", {"a": 2, "b": 2}), POLICY)
    assert report.passed
    with pytest.raises(DataError, match="stratified split"):
        preprocess(report, PARAMS, tmp_path / "datasets")
    assert not (tmp_path / "datasets").exists() or list((tmp_path / "datasets").iterdir()) == []


def test_preprocess_file_changed_since_validation(three_classes, tmp_path):
    report = validate(three_classes, POLICY)
    (three_classes / report.files[5].path).write_bytes(b"overwritten with junk")
    with pytest.raises(DataError, match="changed since validation"):
        preprocess(report, PARAMS, tmp_path / "datasets")
    assert not (tmp_path / "datasets").exists() or list((tmp_path / "datasets").iterdir()) == []


def test_second_preprocess_reuses_the_folder(three_classes, tmp_path):
    report = validate(three_classes, POLICY)
    folder = preprocess(report, PARAMS, tmp_path / "datasets")
    marker = folder / "left-by-test"
    marker.write_text("a rebuild would replace the folder and drop me")
    again = preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets")
    assert again == folder
    assert marker.is_file()
    other = preprocess(report, PreprocessParams(16, 1, 0.1, 0.2, seed=1), tmp_path / "datasets")
    assert other != folder
    assert not np.array_equal(load_dataset(other).split, load_dataset(folder).split)


def test_digits_end_to_end(digits, tmp_path):
    result, report = digits
    assert report.passed, report.errors
    dataset = load_dataset(preprocess(report, PARAMS, tmp_path / "datasets", hflip_ok=result.hflip_ok))
    assert dataset.images.shape[1:] == (1, 16, 16)
    assert len(dataset.labels) == len(report.files)  # digits has a few exact duplicates; they are dropped
    assert dataset.manifest.classes == [str(d) for d in range(10)]
    for s in range(3):
        assert set(dataset.labels[dataset.split == s].tolist()) == set(range(10))
    check_no_leak(dataset)


# --- load_dataset -----------------------------------------------------------------------------------


def test_load_dataset_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no dataset at"):
        load_dataset(tmp_path / "ds-missing")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"not an npz file at all", id="garbage"),
        pytest.param(lambda data: data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:], id="bit-flips"),
    ],
)
def test_load_dataset_damaged_npz(three_classes, tmp_path, damage):
    folder = preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets")
    npz = folder / "data.npz"
    npz.write_bytes(damage(npz.read_bytes()))
    with pytest.raises(DataError, match="damaged"):
        load_dataset(folder)


def test_load_dataset_damaged_manifest(three_classes, tmp_path):
    folder = preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets")
    (folder / "manifest.json").write_text("{ half a manifest")
    with pytest.raises(DataError, match="damaged"):
        load_dataset(folder)


def test_load_dataset_inconsistent_manifest(three_classes, tmp_path):
    folder = preprocess(validate(three_classes, POLICY), PARAMS, tmp_path / "datasets")
    manifest = read_json(folder / "manifest.json")
    (folder / "manifest.json").write_text(
        (folder / "manifest.json").read_text().replace(f'"image_size": {manifest["image_size"]}', '"image_size": 32')
    )
    with pytest.raises(DataError, match="inconsistent"):
        load_dataset(folder)


# --- image conversion -------------------------------------------------------------------------------


def test_rgba_drops_alpha(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    out = to_array(rgba, 8, 3)
    assert out.shape == (3, 8, 8)
    assert out[:, 0, 0].tolist() == [10, 20, 30]
    assert to_array(rgba, 16, 1).shape == (1, 16, 16)


def test_palette_image_is_expanded(tmp_path):
    palette = Image.new("P", (10, 6))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette.paste(1, (0, 0, 5, 6))
    path = tmp_path / "palette.png"
    palette.save(path)
    with Image.open(path) as img:
        assert img.mode == "P"
    out = load_image(path, 10, 3)
    assert out.shape == (3, 10, 10)
    assert out[:, 5, 0].tolist() == [200, 100, 50]
    assert out[:, 5, 9].tolist() == [0, 0, 0]
    assert load_image(path, 16, 1).shape == (1, 16, 16)


def test_16_bit_grey_is_scaled_to_8_bits(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000) + 500
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
        grey = to_array(img, 8, 1)
        colour = to_array(img, 16, 3)
    assert grey.shape == (1, 8, 8)
    assert grey.dtype == np.uint8
    assert (grey.min(), grey.max()) == (0, 255)  # the full 16-bit range is stretched, not clipped
    assert np.all(np.diff(grey.reshape(-1).astype(int)) >= 0)  # order kept
    assert colour.shape == (3, 16, 16)


def test_constant_16_bit_image_does_not_divide_by_zero():
    flat = Image.fromarray(np.full((4, 4), 40_000, dtype=np.uint16))
    assert to_array(flat, 4, 1).tolist() == np.zeros((1, 4, 4), dtype=np.uint8).tolist()


def test_preprocess_mixed_modes(tmp_path, write_png):
    root = tmp_path / "mixed"
    (root / "deep").mkdir(parents=True)
    for i in range(10):
        write_png(root / "rgba" / f"{i}.png", mode="RGBA", seed=[1, i])
        write_png(root / "grey" / f"{i}.png", mode="L", seed=[2, i])
        deep = np.random.default_rng([3, i]).integers(0, 65535, (16, 16), dtype=np.uint16)
        Image.fromarray(deep).save(root / "deep" / f"{i}.png")
        with Image.open(write_png(root / "pal" / f"{i}.png", seed=[4, i])) as img:
            palette = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        palette.save(root / "pal" / f"{i}.png")
    report = validate(root, POLICY)
    assert report.passed, report.errors
    assert set(report.modes) >= {"RGBA", "L", "P"}
    dataset = load_dataset(preprocess(report, PARAMS, tmp_path / "datasets"))
    assert dataset.images.shape == (40, 3, 16, 16)
    assert dataset.manifest.channels == 3
