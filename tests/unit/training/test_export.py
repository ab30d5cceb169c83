"""ONNX export: the files, parity with PyTorch at any batch size, the model card, all-or-nothing writes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from visionloop.errors import ExportError
from visionloop.inference import INPUT_NAME, OUTPUT_NAMES, OnnxClassifier
from visionloop.training.export import ExportResult, export
from visionloop.training.model import ExportWrapper, count_parameters
from visionloop.training.train import load_model, predict_proba, save_model

EXPORT_FILES = [
    "model.onnx", "model_card.json", "model_card.md", "reference_profile.json", "reference_profile.npz", "weights.pt",
]  # fmt: skip


@pytest.fixture(scope="module")
def exported(trained, tiny_dataset, tmp_path_factory) -> ExportResult:
    out_dir = tmp_path_factory.mktemp("export") / "model"
    return export(
        trained.model_path,
        tiny_dataset,
        out_dir,
        tolerance=1e-4,
        metrics={"test_accuracy": 0.5, "baseline_test_accuracy": 0.25},
        train_config={"epochs": 2, "width": 8},
    )


@pytest.fixture(scope="module")
def classifier(exported) -> OnnxClassifier:
    return OnnxClassifier.load(exported.onnx_path, exported.card_path, threads=1)


def test_export_writes_the_model_card_weights_and_reference_profile(exported):
    out_dir = exported.onnx_path.parent
    assert sorted(p.name for p in out_dir.iterdir()) == EXPORT_FILES
    assert exported.card_path == out_dir / "model_card.json"
    assert exported.weights_path == out_dir / "weights.pt"
    # nothing else next to the export: no temporary folder left behind
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]
    assert 0.0 <= exported.max_abs_diff <= 1e-4
    assert exported.parity_images == 18  # every test image (fewer than the 256 cap)


def test_weights_are_the_trained_model(exported, trained):
    assert exported.weights_path.read_bytes() == trained.model_path.read_bytes()
    model, _ = load_model(exported.weights_path)
    assert model.spec == trained.spec


def test_onnx_graph_has_a_dynamic_batch_axis(classifier):
    inputs = classifier.session.get_inputs()
    outputs = classifier.session.get_outputs()
    assert [i.name for i in inputs] == [INPUT_NAME]
    assert [o.name for o in outputs] == list(OUTPUT_NAMES)
    assert isinstance(inputs[0].shape[0], str)  # symbolic, not a fixed batch
    assert inputs[0].shape[1:] == [3, 16, 16]
    assert inputs[0].type == "tensor(float)"


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnx_matches_torch_at_any_batch_size(classifier, trained, batch):
    model, _ = load_model(trained.model_path)
    x = np.random.default_rng(batch).random((batch, 3, 16, 16), dtype=np.float32)
    probs, embedding = classifier.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    with torch.no_grad():
        expected_probs, expected_embedding = ExportWrapper(model.eval())(torch.from_numpy(x))
    assert probs.shape == (batch, 3)
    assert embedding.shape == (batch, trained.spec.embedding_dim)
    np.testing.assert_allclose(probs, expected_probs.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(embedding, expected_embedding.numpy(), atol=1e-4, rtol=1e-4)


def test_classifier_run_on_uint8_images_matches_predict_proba(classifier, trained, tiny_dataset):
    model, _ = load_model(trained.model_path)
    x_test, y_test = tiny_dataset.part("test")
    probs, embeddings = classifier.run(x_test, batch_size=4)  # chunks of 4, the last one partial
    expected = predict_proba(model, torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert embeddings.shape == (len(x_test), trained.spec.embedding_dim)
    whole, _ = classifier.run(x_test)
    np.testing.assert_allclose(probs, whole, atol=1e-6, rtol=0)
    assert classifier.accuracy(x_test, y_test) == pytest.approx(float((expected.argmax(1) == y_test).mean()))


def test_classifier_run_on_no_images_keeps_the_output_widths(classifier, trained):
    probs, embeddings = classifier.run(np.zeros((0, 3, 16, 16), dtype=np.uint8))
    assert probs.shape == (0, 3)
    assert embeddings.shape == (0, trained.spec.embedding_dim)


def test_model_card_says_how_to_feed_the_model(exported, tiny_dataset, trained):
    card = json.loads(exported.card_path.read_text())
    manifest = tiny_dataset.manifest
    assert card["classes"] == manifest.classes
    assert card["image_size"] == 16 and card["channels"] == 3
    assert card["input"]["name"] == INPUT_NAME
    assert card["input"]["shape"] == [-1, 3, 16, 16]
    assert card["input"]["range"] == [0.0, 1.0]
    assert card["normalization"]["mean"] == manifest.mean
    assert card["normalization"]["std"] == manifest.std
    assert card["dataset"]["version"] == manifest.version
    assert card["dataset"]["counts"] == manifest.counts
    assert card["outputs"][OUTPUT_NAMES[0]]["shape"] == [-1, 3]
    assert card["outputs"][OUTPUT_NAMES[1]]["shape"] == [-1, trained.spec.embedding_dim]
    assert card["metrics"] == {"test_accuracy": 0.5, "baseline_test_accuracy": 0.25}
    assert card["training"] == {"epochs": 2, "width": 8}
    assert card["onnx"]["parity_max_abs_diff"] == exported.max_abs_diff
    model, _ = load_model(trained.model_path)
    assert card["architecture"]["parameters"] == count_parameters(model)
    assert card["architecture"]["width"] == 8 and card["architecture"]["depth"] == 2


def test_embedding_output_has_the_cards_dimension(classifier, tiny_dataset):
    x_test, _ = tiny_dataset.part("test")
    _, embeddings = classifier.run(x_test[:5])
    assert embeddings.shape == (5, classifier.card["outputs"][OUTPUT_NAMES[1]]["shape"][1])


def test_markdown_card_names_dataset_classes_and_metrics(exported, tiny_dataset):
    text = (exported.onnx_path.parent / "model_card.md").read_text()
    assert tiny_dataset.manifest.version in text
    for name in tiny_dataset.manifest.classes:
        assert name in text
    assert "| test_accuracy | 0.5000 |" in text


def test_parity_failure_raises_and_writes_nothing(trained, tiny_dataset, exported, tmp_path):
    if exported.max_abs_diff == 0.0:
        pytest.skip("ONNX Runtime and PyTorch agree bit for bit here; no tolerance below the real difference")
    tolerance = 1e-30  # below any non-zero difference
    out_dir = tmp_path / "exports" / "model"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export(trained.model_path, tiny_dataset, out_dir, tolerance=tolerance)
    assert not out_dir.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no temporary folder either


def test_failed_export_keeps_the_previous_export(trained, tiny_dataset, tmp_path):
    out_dir = tmp_path / "model"
    first = export(trained.model_path, tiny_dataset, out_dir, tolerance=1e-4)
    before = {name: (out_dir / name).read_bytes() for name in EXPORT_FILES}
    if first.max_abs_diff == 0.0:
        pytest.skip("ONNX Runtime and PyTorch agree bit for bit here; no tolerance below the real difference")
    with pytest.raises(ExportError):
        export(trained.model_path, tiny_dataset, out_dir, tolerance=first.max_abs_diff / 2)
    assert {name: (out_dir / name).read_bytes() for name in EXPORT_FILES} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_model_with_non_finite_outputs_is_not_exported(trained, tiny_dataset, tmp_path):
    """NaN never passes the parity check (a ``diff > tol`` test would let NaN through)."""
    model, payload = load_model(trained.model_path)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    broken = tmp_path / "broken.pt"
    save_model(broken, model, payload["classes"], payload["dataset_version"])
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export(broken, tiny_dataset, tmp_path / "out", tolerance=1e-4)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.pt"]


def test_export_needs_test_images(trained, tiny_dataset, tmp_path):
    no_test = dataclasses.replace(tiny_dataset, split=np.where(tiny_dataset.split == 2, 0, tiny_dataset.split))
    with pytest.raises(ExportError, match="no test images"):
        export(trained.model_path, no_test, tmp_path / "out", tolerance=1e-4)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 16, 16), (2, 3, 8, 8), (2, 3, 16, 17), (3, 16, 16), (2, 16, 16, 3)],
    ids=["grey", "smaller", "not-square", "no-batch-axis", "channels-last"],
)
def test_classifier_rejects_a_wrong_input_shape(classifier, shape):
    with pytest.raises(ExportError, match="do not fit the model input"):
        classifier.run(np.zeros(shape, dtype=np.uint8))


def test_classifier_load_of_a_missing_model_is_an_error(exported, tmp_path):
    with pytest.raises(ExportError, match="cannot load ONNX model"):
        OnnxClassifier.load(tmp_path / "absent.onnx", exported.card_path)
    with pytest.raises(ExportError, match="cannot load ONNX model"):
        OnnxClassifier.load(exported.onnx_path, tmp_path / "absent.json")


def test_reference_profile_is_the_held_out_splits_through_the_exported_graph(exported, classifier, tiny_dataset):
    from visionloop.data.preprocess import SPLITS
    from visionloop.monitoring.profile import ReferenceProfile

    profile = ReferenceProfile.load(exported.onnx_path.parent)
    held_out = np.isin(tiny_dataset.split, [SPLITS.index("val"), SPLITS.index("test")])
    assert len(profile) == held_out.sum()  # fewer than monitor.reference_size: all of them
    assert profile.origin == "export" and profile.splits == ["val", "test"]
    probs, embeddings = classifier.run(tiny_dataset.images[held_out])
    np.testing.assert_allclose(np.sort(profile.sample.probabilities, axis=0), np.sort(probs, axis=0), atol=1e-6)
    assert profile.sample.embeddings.shape == embeddings.shape
    card = classifier.card["reference_profile"]
    assert card["size"] == len(profile) and card["files"] == ["reference_profile.npz", "reference_profile.json"]
