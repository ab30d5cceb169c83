"""The training loop: outputs, CPU determinism, exact resume, checkpoint checks, early stopping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from visionloop.errors import TrainingError
from visionloop.training.model import ResidualCNN
from visionloop.training.train import load_model, pick_device, predict_proba, save_model, train


def weights(path) -> dict[str, torch.Tensor]:
    model, _ = load_model(path)
    return model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


def test_training_writes_model_checkpoint_and_history(trained, tiny_dataset):
    out_dir = trained.model_path.parent
    assert trained.model_path == out_dir / "model.pt"
    assert trained.model_path.is_file() and (out_dir / "last.pt").is_file()
    assert trained.epochs_run == 2 and not trained.stopped_early and trained.resumed_from_epoch is None
    assert trained.device == "cpu"
    assert [h["epoch"] for h in trained.history] == [1, 2]
    for entry in trained.history:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"} <= entry.keys()
        assert np.isfinite(entry["train_loss"]) and 0.0 <= entry["val_accuracy"] <= 1.0
    assert trained.best_val_accuracy == max(h["val_accuracy"] for h in trained.history)
    assert trained.history[trained.best_epoch - 1]["val_accuracy"] == trained.best_val_accuracy

    model, payload = load_model(trained.model_path)
    manifest = tiny_dataset.manifest
    assert payload["classes"] == manifest.classes
    assert payload["dataset_version"] == manifest.version
    assert model.spec == trained.spec
    assert (trained.spec.width, trained.spec.depth) == (8, 2)
    assert trained.spec.num_classes == 3 and trained.spec.in_channels == 3 and trained.spec.image_size == 16
    assert list(trained.spec.mean) == manifest.mean and list(trained.spec.std) == manifest.std
    assert not model.training  # load_model hands back an eval-mode model

    checkpoint = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["dataset_version"] == manifest.version
    assert checkpoint["history"] == trained.history


def test_predict_proba_gives_distributions_for_every_image(trained, tiny_dataset):
    model, _ = load_model(trained.model_path)
    x_test, _ = tiny_dataset.part("test")
    probs = predict_proba(model, torch.from_numpy(x_test), batch_size=5)  # several partial batches
    assert probs.shape == (len(x_test), 3)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(x_test)))
    whole = predict_proba(model, torch.from_numpy(x_test))
    torch.testing.assert_close(probs, whole)


def test_same_seed_on_cpu_gives_identical_weights(tiny_dataset, tiny_settings, tmp_path):
    settings = tiny_settings(epochs=2)
    first = train(tiny_dataset, tmp_path / "a", settings, hflip=True, show_progress=False)
    second = train(tiny_dataset, tmp_path / "b", settings, hflip=True, show_progress=False)
    assert_same_weights(weights(first.model_path), weights(second.model_path))
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]
    # and the seed matters: another seed gives other weights
    third = train(tiny_dataset, tmp_path / "c", tiny_settings(epochs=2, seed=1), hflip=True, show_progress=False)
    assert not torch.equal(weights(first.model_path)["head.weight"], weights(third.model_path)["head.weight"])


def test_interrupted_then_resumed_run_equals_an_uninterrupted_run(tiny_dataset, tiny_settings, tmp_path):
    settings = tiny_settings(epochs=4)
    straight = train(tiny_dataset, tmp_path / "straight", settings, hflip=True, show_progress=False)

    def interrupt_after_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    out_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, out_dir, settings, hflip=True, on_epoch=interrupt_after_two, show_progress=False)
    assert (out_dir / "last.pt").is_file()
    assert not (out_dir / "model.pt").exists()

    epochs_seen = []
    resumed = train(
        tiny_dataset,
        out_dir,
        settings,
        hflip=True,
        resume=True,
        on_epoch=lambda epoch, _: epochs_seen.append(epoch),
        show_progress=False,
    )
    # on_epoch runs before the epoch's checkpoint, so an epoch whose logging was interrupted is
    # trained (and logged) again: nothing is ever checkpointed but unlogged
    assert resumed.resumed_from_epoch == 1
    assert epochs_seen == [2, 3, 4]
    assert resumed.epochs_run == 4
    assert resumed.best_epoch == straight.best_epoch
    assert resumed.best_val_accuracy == straight.best_val_accuracy
    assert resumed.history == [
        {**h, "epoch_seconds": r["epoch_seconds"]} for h, r in zip(straight.history, resumed.history, strict=True)
    ]
    assert_same_weights(weights(resumed.model_path), weights(straight.model_path))
    # the final (not only the best) state matches too: compare the last checkpoints
    last_straight = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu", weights_only=True)
    last_resumed = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)
    assert_same_weights(last_straight["model"], last_resumed["model"])


def test_resume_of_a_finished_run_trains_no_more(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "done"
    first = train(tiny_dataset, out_dir, tiny_settings(epochs=1), show_progress=False)
    again = train(tiny_dataset, out_dir, tiny_settings(epochs=1), resume=True, show_progress=False)
    assert again.resumed_from_epoch == 1 and again.epochs_run == 1
    assert_same_weights(weights(first.model_path), weights(again.model_path))


def test_resume_without_a_checkpoint_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_dataset, tmp_path / "empty", tiny_settings(epochs=1), resume=True, show_progress=False)


def test_resume_with_a_checkpoint_from_another_dataset_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    train(tiny_dataset, out_dir, tiny_settings(epochs=1), show_progress=False)
    other_manifest = dataclasses.replace(tiny_dataset.manifest, version="ds-000000000000")
    other = dataclasses.replace(tiny_dataset, manifest=other_manifest)
    with pytest.raises(TrainingError, match="another dataset"):
        train(other, out_dir, tiny_settings(epochs=2), resume=True, show_progress=False)


def test_resume_with_a_checkpoint_of_another_model_shape_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    train(tiny_dataset, out_dir, tiny_settings(epochs=1), show_progress=False)
    with pytest.raises(TrainingError, match="model shape"):
        train(tiny_dataset, out_dir, tiny_settings(epochs=2, width=12), resume=True, show_progress=False)


@pytest.mark.parametrize("changed", [{"epochs": 4}, {"batch_size": 16}, {"lr": 1e-3}, {"schedule": "cosine"}])
def test_resume_under_other_training_settings_is_an_error(tiny_dataset, tiny_settings, tmp_path, changed):
    """A resume must continue the same run; e.g. more epochs would step OneCycleLR past its end."""
    out_dir = tmp_path / "run"
    train(tiny_dataset, out_dir, tiny_settings(epochs=2), show_progress=False)
    with pytest.raises(TrainingError, match=f"trained with {next(iter(changed))}="):
        train(tiny_dataset, out_dir, tiny_settings(**{"epochs": 2, **changed}), resume=True, show_progress=False)


def test_resume_may_change_settings_that_do_not_shape_the_run(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    first = train(tiny_dataset, out_dir, tiny_settings(epochs=2), show_progress=False)
    again = train(
        tiny_dataset, out_dir, tiny_settings(epochs=2, patience=5, threads=2), resume=True, show_progress=False
    )
    assert again.resumed_from_epoch == 2
    assert_same_weights(weights(first.model_path), weights(again.model_path))


def test_resume_from_an_unreadable_checkpoint_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="unreadable"):
        train(tiny_dataset, out_dir, tiny_settings(epochs=1), resume=True, show_progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is missing")
def test_cuda_requested_without_cuda_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    with pytest.raises(TrainingError, match="no CUDA device"):
        train(tiny_dataset, tmp_path / "run", tiny_settings(device="cuda"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_auto_device_falls_back_to_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"


def test_empty_validation_split_is_an_error(tiny_dataset, tiny_settings, tmp_path):
    no_val = dataclasses.replace(tiny_dataset, split=np.where(tiny_dataset.split == 1, 0, tiny_dataset.split))
    with pytest.raises(TrainingError, match="empty train or val"):
        train(no_val, tmp_path / "run", tiny_settings(epochs=1), show_progress=False)


def test_early_stopping_when_val_accuracy_cannot_improve(tiny_dataset, tiny_settings, tmp_path):
    """Every val image is the same picture, with the labels balanced: whatever the model predicts,
    val accuracy is exactly 1/3 in every epoch, so with patience 1 training stops after epoch 2."""
    images = tiny_dataset.images.copy()
    val = tiny_dataset.split == 1
    images[val] = tiny_dataset.images[np.flatnonzero(val)[0]]
    assert np.bincount(tiny_dataset.labels[val]).tolist() == [3, 3, 3]
    frozen_val = dataclasses.replace(tiny_dataset, images=images)

    out_dir = tmp_path / "run"
    weights_after: dict[int, dict[str, torch.Tensor]] = {}

    def last_checkpoint() -> dict[str, torch.Tensor]:
        return torch.load(out_dir / "last.pt", map_location="cpu", weights_only=True)["model"]

    def keep_weights(epoch: int, _metrics: dict[str, float]) -> None:
        # on_epoch runs before epoch `epoch` is checkpointed: last.pt still holds the epoch before
        if epoch > 1:
            weights_after[epoch - 1] = last_checkpoint()

    result = train(frozen_val, out_dir, tiny_settings(epochs=6, patience=1), on_epoch=keep_weights, show_progress=False)
    weights_after[result.epochs_run] = last_checkpoint()
    assert result.stopped_early
    assert result.epochs_run == 2 < 6
    assert result.best_epoch == 1
    assert [h["val_accuracy"] for h in result.history] == pytest.approx([1 / 3, 1 / 3])
    # model.pt holds the best epoch's weights, not the last epoch's
    best = weights(result.model_path)
    # model.pt = the best epoch's weights plus the temperature fitted after training (checkpoints hold 1)
    assert float(weights_after[1]["temperature"]) == 1.0 and float(best["temperature"]) > 0
    assert_same_weights(
        {k: v for k, v in best.items() if k != "temperature"},
        {k: v for k, v in weights_after[1].items() if k != "temperature"},
    )
    assert not torch.equal(weights_after[1]["head.weight"], weights_after[2]["head.weight"])


def test_no_early_stop_while_patience_lasts(trained):
    assert not trained.stopped_early
    assert trained.epochs_run == 2


def test_load_model_on_a_garbage_file_is_an_error(tmp_path):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a torch file")
    with pytest.raises(TrainingError, match="cannot load model"):
        load_model(garbage)


def test_load_model_on_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="no trained model"):
        load_model(tmp_path / "absent.pt")


def test_load_model_rejects_a_torch_file_without_a_model(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"something": torch.zeros(3)}, path)
    with pytest.raises(TrainingError, match="cannot load model"):
        load_model(path)


def test_save_then_load_round_trips_weights_and_metadata(trained, tmp_path):
    model, payload = load_model(trained.model_path)
    copy_path = tmp_path / "copy.pt"
    save_model(copy_path, model, payload["classes"], payload["dataset_version"])
    again, again_payload = load_model(copy_path)
    assert isinstance(again, ResidualCNN)
    assert_same_weights(model.state_dict(), again.state_dict())
    assert again_payload["classes"] == payload["classes"]
    assert again_payload["dataset_version"] == payload["dataset_version"]
    assert [p.name for p in tmp_path.iterdir()] == ["copy.pt"]  # no temporary file left behind


def _labels_and_logits(scale: float, n: int = 400, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax at temperature ``scale`` is calibrated (labels drawn from it)."""
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(n, classes, generator=g) * 2.0
    labels = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=g).squeeze(1)
    return true_logits * scale, labels


@pytest.mark.parametrize(("scale", "direction"), [(3.0, "above"), (0.3, "below")])
def test_fit_temperature_undoes_over_and_under_confidence(scale: float, direction: str):
    from visionloop.training.train import fit_temperature

    logits, labels = _labels_and_logits(scale)
    temperature = fit_temperature(logits, labels)
    assert (temperature > 1.5) if direction == "above" else (temperature < 0.6)
    before = torch.nn.functional.cross_entropy(logits, labels)
    after = torch.nn.functional.cross_entropy(logits / temperature, labels)
    assert after < before  # a better NLL on the data it was fitted to
    assert torch.equal((logits / temperature).argmax(1), logits.argmax(1))  # no prediction changes


def test_trained_model_carries_its_fitted_temperature(trained):
    model, _ = load_model(trained.model_path)
    assert float(model.temperature) == pytest.approx(trained.temperature)
    assert 0.05 <= trained.temperature <= 20.0
