"""Evaluate a trained model on the held-out test split, beside a classical baseline.

Accuracy, per-class precision/recall/F1, a confusion-matrix PNG, expected calibration error, and a
scikit-learn baseline fitted on the very same train split and scored on the very same test split in
the same run — so every run answers "is deep learning paying for itself here?".
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.svm import SVC

from visionloop.data.preprocess import Dataset
from visionloop.fsutil import atomic_dir, atomic_write_json

SVC_MAX_TRAIN = 10_000  # kernel SVMs grow quadratically; beyond this the baseline is a linear model


@dataclass
class EvalReport:
    accuracy: float
    macro_f1: float
    ece: float
    num_test: int
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    baseline_name: str
    baseline_accuracy: float
    baseline_fit_seconds: float
    dataset_version: str

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow."""
        flat = {
            "test_accuracy": self.accuracy,
            "test_macro_f1": self.macro_f1,
            "test_ece": self.ece,
            "baseline_test_accuracy": self.baseline_accuracy,
            "baseline_fit_seconds": self.baseline_fit_seconds,
        }
        for name, scores in self.per_class.items():
            flat[f"test_f1_class_{name}"] = scores["f1"]
        return flat


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    if len(labels) == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_baseline(dataset: Dataset) -> tuple[str, float, float]:
    """(name, test accuracy, fit seconds) of a classical model on the same flattened pixels."""
    x_train, y_train = dataset.part("train")
    x_test, y_test = dataset.part("test")
    flat_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255.0
    flat_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0
    if len(flat_train) <= SVC_MAX_TRAIN:
        name, model = "svc_rbf", SVC(C=10.0, gamma="scale")
    else:
        name, model = "logistic_regression", LogisticRegression(max_iter=300)
    started = time.perf_counter()
    model.fit(flat_train, y_train)
    seconds = time.perf_counter() - started
    return name, float((model.predict(flat_test) == y_test).mean()), seconds


def score(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(len(classes))), zero_division=0
    )
    return {
        "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1)),
        "ece": expected_calibration_error(probs, labels),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
        "confusion": confusion_matrix(labels, predicted, labels=list(range(len(classes)))).tolist(),
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    side = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(epochs, [h["train_loss"] for h in history], label="train")
    left.plot(epochs, [h["val_loss"] for h in history], label="val")
    left.set_title("loss")
    right.plot(epochs, [h["train_accuracy"] for h in history], label="train (augmented)")
    right.plot(epochs, [h["val_accuracy"] for h in history], label="val")
    right.set_title("accuracy")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(probs: np.ndarray, dataset: Dataset, out_dir: Path, title: str = "test confusion matrix") -> EvalReport:
    """Score test-split probabilities ``probs`` and the baseline; write metrics.json + confusion_matrix.png."""
    _, y_test = dataset.part("test")
    classes = dataset.manifest.classes
    scores = score(probs, y_test, classes)
    baseline_name, baseline_acc, baseline_seconds = fit_baseline(dataset)
    report = EvalReport(
        accuracy=scores["accuracy"],
        macro_f1=scores["macro_f1"],
        ece=scores["ece"],
        num_test=len(y_test),
        per_class=scores["per_class"],
        confusion=scores["confusion"],
        baseline_name=baseline_name,
        baseline_accuracy=baseline_acc,
        baseline_fit_seconds=baseline_seconds,
        dataset_version=dataset.manifest.version,
    )
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "metrics.json", report.to_dict())
        plot_confusion(report.confusion, classes, tmp / "confusion_matrix.png", title)
    return report
