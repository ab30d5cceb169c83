"""Evaluation: calibration error, per-class scores, the classical baseline, the written report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from visionloop.data.preprocess import Dataset, DatasetManifest
from visionloop.training import evaluate as evaluate_module
from visionloop.training.evaluate import EvalReport, evaluate, expected_calibration_error, fit_baseline, score

# ---------------------------------------------------------------- expected calibration error


def test_ece_of_nothing_is_zero():
    assert expected_calibration_error(np.empty((0, 3)), np.empty(0, dtype=int)) == 0.0


def test_ece_is_zero_when_confidence_equals_accuracy():
    # 10 predictions at 80% confidence, 8 of them right
    probs = np.tile([0.8, 0.2], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_zero_for_calibrated_predictions_in_several_bins():
    # bin at confidence 1.0: all right; bin at 0.7: 7 of 10 right; bin at 0.5: half right
    probs = np.vstack([np.tile([1.0, 0.0], (4, 1)), np.tile([0.3, 0.7], (10, 1)), np.tile([0.5, 0.5], (6, 1))])
    labels = np.array([0] * 4 + [1] * 7 + [0] * 3 + [0] * 3 + [1] * 3)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_is_one_when_always_confident_and_always_wrong():
    probs = np.tile([0.0, 1.0, 0.0], (12, 1))
    labels = np.zeros(12, dtype=int)
    assert expected_calibration_error(probs, labels) == pytest.approx(1.0)


def test_ece_hand_computed_mixture():
    # one right at confidence 0.9 (gap 0.1), one wrong at 0.65 (gap 0.65), in different bins:
    # ECE = 0.5 * 0.1 + 0.5 * 0.65 = 0.375
    probs = np.array([[0.9, 0.1], [0.35, 0.65]])
    labels = np.array([0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.375)


def test_ece_pools_predictions_within_one_bin():
    # both in the (0.6, 0.667] bin: mean confidence 0.63, accuracy 0.5 -> 0.13 (not the mean of gaps)
    probs = np.array([[0.62, 0.38], [0.36, 0.64]])
    labels = np.array([0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.13)


# ---------------------------------------------------------------- score()


def random_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    logits = rng.normal(size=(n, k))
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def test_score_matches_sklearn():
    rng = np.random.default_rng(0)
    classes = ["ant", "bee", "cat", "dog"]
    labels = rng.integers(0, 4, size=200)
    probs = random_probs(rng, 200, 4)
    probs[np.arange(200), labels] += 0.8 * rng.random(200)  # better than chance, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)

    result = score(probs, labels, classes)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert 0.3 < result["accuracy"] < 1.0
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert result["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    assert result["confusion"] == confusion_matrix(labels, predicted).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted)
    assert list(result["per_class"]) == classes
    for i, name in enumerate(classes):
        assert result["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        )
        assert isinstance(result["per_class"][name]["support"], int)


def test_score_keeps_classes_missing_from_the_test_set():
    classes = ["a", "b", "c"]
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    result = score(probs, labels, classes)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    assert result["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["per_class"]["a"]["precision"] == pytest.approx(1.0)
    assert result["per_class"]["a"]["recall"] == pytest.approx(0.5)
    expected_macro = f1_score(labels, probs.argmax(1), labels=[0, 1, 2], average="macro", zero_division=0)
    assert result["macro_f1"] == pytest.approx(expected_macro)
    # the result is plain JSON
    json.dumps(result)


# ---------------------------------------------------------------- baseline and report


def in_memory_dataset(images: np.ndarray, labels: np.ndarray, split: np.ndarray, classes: list[str]) -> Dataset:
    channels, size = images.shape[1], images.shape[2]
    pixels = images[split == 0].astype(np.float64) / 255.0
    manifest = DatasetManifest(
        version="ds-test00000000",
        classes=classes,
        image_size=size,
        channels=channels,
        mean=pixels.mean(axis=(0, 2, 3)).round(6).tolist(),
        std=np.maximum(pixels.std(axis=(0, 2, 3)), 1e-3).round(6).tolist(),
        counts={},
        params={},
        source="in-memory",
        hflip_ok=False,
    )
    hashes = np.asarray([f"h{i}" for i in range(len(labels))])
    return Dataset(manifest, images, labels, split, hashes)


def separable_dataset(per_class: int = 40, size: int = 6, seed: int = 0) -> Dataset:
    """Three classes of noisy images: dark, grey, bright. Any sane classifier separates them."""
    rng = np.random.default_rng(seed)
    levels = [40, 128, 215]
    images = np.concatenate(
        [np.clip(rng.normal(level, 12, size=(per_class, 1, size, size)), 0, 255) for level in levels]
    ).astype(np.uint8)
    labels = np.repeat(np.arange(3), per_class)
    split = np.tile(np.array([0, 0, 0, 0, 0, 0, 1, 2, 2, 2]), len(labels) // 10 + 1)[: len(labels)].astype(np.int8)
    return in_memory_dataset(images, labels, split, ["dark", "grey", "bright"])


def test_baseline_separates_separable_data():
    name, accuracy, seconds = fit_baseline(separable_dataset())
    assert name == "svc_rbf"
    assert accuracy == 1.0
    assert seconds >= 0.0


def test_baseline_switches_to_a_linear_model_for_large_training_sets():
    dataset = separable_dataset(per_class=6000, size=2)  # 10,800 training images of 2x2 pixels
    assert len(dataset.part("train")[0]) > evaluate_module.SVC_MAX_TRAIN
    name, accuracy, _ = fit_baseline(dataset)
    assert name == "logistic_regression"
    assert accuracy >= 0.95


def test_baseline_on_the_real_tiny_dataset_beats_nothing_but_runs(tiny_dataset):
    name, accuracy, _ = fit_baseline(tiny_dataset)
    assert name == "svc_rbf"
    assert 0.0 <= accuracy <= 1.0


def test_evaluate_writes_metrics_json_and_a_confusion_matrix_png(tmp_path):
    dataset = separable_dataset()
    _, y_test = dataset.part("test")
    # a model that gets every "grey" image wrong (calls it "bright") and everything else right
    probs = np.full((len(y_test), 3), 0.05)
    predicted = np.where(y_test == 1, 2, y_test)
    probs[np.arange(len(y_test)), predicted] = 0.9

    out_dir = tmp_path / "evaluation"
    report = evaluate(probs, dataset, out_dir, title="unit test")
    assert isinstance(report, EvalReport)
    assert sorted(p.name for p in out_dir.iterdir()) == ["confusion_matrix.png", "metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation"]  # no temporary folder left behind

    grey = int((y_test == 1).sum())
    assert report.num_test == len(y_test)
    assert report.accuracy == pytest.approx(1 - grey / len(y_test))
    assert report.confusion[1] == [0, 0, grey]
    assert report.per_class["grey"]["recall"] == 0.0
    assert report.baseline_name == "svc_rbf" and report.baseline_accuracy == 1.0
    assert report.dataset_version == "ds-test00000000"

    written = json.loads((out_dir / "metrics.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    with Image.open(out_dir / "confusion_matrix.png") as png:
        assert png.format == "PNG"
        assert png.size[0] > 100 and png.size[1] > 100
        png.load()

    flat = report.metrics()
    assert flat["test_accuracy"] == report.accuracy
    assert flat["baseline_test_accuracy"] == 1.0
    assert {"test_f1_class_dark", "test_f1_class_grey", "test_f1_class_bright"} <= flat.keys()
    assert all(isinstance(v, float) for v in flat.values())


def test_evaluate_replaces_an_earlier_report(tmp_path):
    dataset = separable_dataset()
    _, y_test = dataset.part("test")
    out_dir = tmp_path / "evaluation"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("from an older run")
    perfect = np.eye(3)[y_test]
    report = evaluate(perfect, dataset, out_dir)
    assert report.accuracy == 1.0 and report.ece == pytest.approx(0.0)
    assert sorted(p.name for p in out_dir.iterdir()) == ["confusion_matrix.png", "metrics.json"]
