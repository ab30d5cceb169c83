"""Export the trained model to ONNX, prove it computes what PyTorch computes, and write its model card.

The graph takes ``input``: float32 pixels in [0, 1], shape (batch, C, H, W) with a dynamic batch
axis, and returns ``probabilities`` (batch, classes) and ``embedding`` (batch, D), the penultimate
layer that drift monitoring compares against the training data. Normalisation is inside the graph.

Parity: ONNX Runtime and PyTorch run the same held-out test images; if any probability differs by
more than the tolerance the export fails and nothing is written. The model card (JSON + Markdown)
holds everything serving needs: classes, input size, channels, normalisation, dataset version,
metrics and the training configuration, and ``input_transform``: the image → pixels transform
preprocessing applied to the training images, which the server reads back and applies to uploads.
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visionloop import __version__
from visionloop.data.preprocess import Dataset
from visionloop.data.transform import InputTransform
from visionloop.errors import ExportError
from visionloop.fsutil import atomic_dir, atomic_write_json
from visionloop.inference import CHECK_PIXEL, INPUT_NAME, OUTPUT_NAMES, OnnxClassifier
from visionloop.monitoring.profile import profile_dataset
from visionloop.training.model import ExportWrapper, ModelSpec, count_parameters
from visionloop.training.train import load_model, predict_proba

OPSET = 17
PARITY_IMAGES = 256


@dataclass
class ExportResult:
    onnx_path: Path
    card_path: Path
    weights_path: Path
    max_abs_diff: float
    parity_images: int


def to_onnx_bytes(model: torch.nn.Module, channels: int, image_size: int) -> bytes:
    wrapper = ExportWrapper(model).eval()
    example = torch.rand(2, channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch"},
                OUTPUT_NAMES[0]: {0: "batch"},
                OUTPUT_NAMES[1]: {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def model_card(payload: dict, dataset: Dataset, metrics: dict, train_config: dict, parity: float) -> dict:
    manifest = dataset.manifest
    spec = payload["spec"]
    # the parameters preprocess's to_array used for this dataset, stated so serving applies the same
    transform = InputTransform.for_model(manifest.channels, manifest.image_size)
    return {
        "name": "visionloop residual CNN",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "visionloop_version": __version__,
        "classes": manifest.classes,
        "image_size": manifest.image_size,
        "channels": manifest.channels,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [-1, manifest.channels, manifest.image_size, manifest.image_size],
            "range": [0.0, 1.0],
            "layout": "NCHW",
            "conversion": transform.describe(),
        },
        "input_transform": transform.to_card(manifest.mean, manifest.std),
        "outputs": {
            OUTPUT_NAMES[0]: {"shape": [-1, len(manifest.classes)], "meaning": "softmax over classes"},
            OUTPUT_NAMES[1]: {
                "shape": [-1, ModelSpec.from_dict(spec).embedding_dim],
                "meaning": "penultimate layer",
            },
        },
        "normalization": {"mean": manifest.mean, "std": manifest.std, "applied": "inside the graph"},
        "calibration": {
            "method": "temperature scaling fitted on the validation split",
            "temperature": round(float(payload["state_dict"]["temperature"]), 6),
            "applied": "inside the graph",
        },
        "architecture": {**spec, "parameters": payload.get("parameters")},
        "dataset": {"version": manifest.version, "source": manifest.source, "counts": manifest.counts},
        "metrics": metrics,
        "training": train_config,
        "onnx": {"opset": OPSET, "parity_max_abs_diff": parity},
    }


def card_markdown(card: dict) -> str:
    metrics = card["metrics"]
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float))
    return (
        f"# Model card — {card['name']}\n\n"
        f"- dataset version: `{card['dataset']['version']}` (source `{card['dataset']['source']}`)\n"
        f"- classes ({len(card['classes'])}): {', '.join(card['classes'])}\n"
        f"- input: `{card['input']['name']}` float32 {card['input']['shape']} in [0, 1]; "
        f"{card['input']['conversion']}\n"
        f"- outputs: probabilities, embedding\n"
        f"- architecture: width {card['architecture']['width']}, depth {card['architecture']['depth']}, "
        f"{card['architecture']['parameters']} parameters\n"
        f"- calibration: softmax temperature {card['calibration']['temperature']:.3f} (fitted on the validation split)\n"
        f"- ONNX opset {card['onnx']['opset']}, parity max |diff| {card['onnx']['parity_max_abs_diff']:.2e}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


def export(
    model_path: Path,
    dataset: Dataset,
    out_dir: Path,
    tolerance: float,
    metrics: dict | None = None,
    train_config: dict | None = None,
    reference_size: int = 2000,
) -> ExportResult:
    """Write ``model.onnx``, ``model_card.json``/``.md`` and ``weights.pt`` to ``out_dir`` — all or nothing."""
    model, payload = load_model(model_path)
    payload["parameters"] = count_parameters(model)
    manifest = dataset.manifest
    onnx_bytes = to_onnx_bytes(model, manifest.channels, manifest.image_size)

    x_test, _ = dataset.part("test")
    sample = x_test[:PARITY_IMAGES]
    if len(sample) == 0:
        raise ExportError("no test images to check parity on")
    expected = predict_proba(model, torch.from_numpy(sample)).numpy()
    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        onnx_path.write_bytes(onnx_bytes)
        card_stub = {
            "channels": manifest.channels,
            "image_size": manifest.image_size,
            "classes": manifest.classes,
        }
        atomic_write_json(tmp / "model_card.json", card_stub)
        classifier = OnnxClassifier.load(onnx_path, tmp / "model_card.json", threads=1)
        got, _ = classifier.run(sample)
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:
            raise ExportError(
                f"ONNX output differs from PyTorch by {diff:.3g} on {len(sample)} test images "
                f"(tolerance {tolerance:g}, gate.parity_tolerance); nothing exported"
            )
        card = model_card(payload, dataset, metrics or {}, train_config or {}, diff)
        # what traffic to this version should look like: the drift tests' reference (monitoring/profile.py)
        profile = profile_dataset(classifier, dataset, reference_size)
        profile.write_files(tmp)
        card["reference_profile"] = {k: v for k, v in profile.summary().items() if k != "quantiles"}
        # what the graph answers on its check input: serving compares a fresh load against it
        check, _ = classifier.run(classifier.check_input())
        card["onnx"]["check"] = {
            "input": f"one image, every pixel {CHECK_PIXEL}",
            "probabilities": [round(float(p), 7) for p in check[0]],
        }
        atomic_write_json(tmp / "model_card.json", card)
        (tmp / "model_card.md").write_text(card_markdown(card), encoding="utf-8")
        (tmp / "weights.pt").write_bytes(model_path.read_bytes())
    return ExportResult(out_dir / "model.onnx", out_dir / "model_card.json", out_dir / "weights.pt", diff, len(sample))
