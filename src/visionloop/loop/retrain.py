"""Retrain: a new dataset from the training data plus labelled production images, then the pipeline on it.

The retrain dataset is an ordinary ``class_name/image_file`` folder, so it goes through the same ingest,
validation and preprocessing as any source. It holds:

- the *base* data: the files of ``data.source`` (what the champion line was trained on) minus the base
  dataset's test split, which stays out of training for good: it is the gate's *original test set*;
- the newest labelled production images (kept by the prediction store, labels from ``POST /feedback``;
  with ``serve.feedback_token`` set, only labels that came with it), at most ``loop.max_production_share``
  of the folder. A stable share of them (``loop.production_test_fraction``, chosen by a hash of each
  image, so an image held out once is held out in every later retrain) is never trained on: it is the
  gate's *production slice*, written beside the folder.

``lineage.json`` beside the folder says where every part came from (base dataset version, request ids,
label times); it is logged to the MLflow run and summarised in the run's and the version's tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionloop.config import Settings
from visionloop.data.transform import to_array
from visionloop.data.validate import load_report
from visionloop.errors import DataError
from visionloop.fsutil import atomic_dir, atomic_write_json, read_json
from visionloop.monitoring.store import LabelledImage, PredictionStore
from visionloop.pipeline import steps


@dataclass
class BaseData:
    """The configured training data, validated and preprocessed as ``visionloop run`` would."""

    root: Path  # the ingested class folders
    dataset_dir: Path
    dataset_version: str
    classes: list[str]
    train_files: list[tuple[str, str]]  # (path under root, label) of the train and val splits
    hashes: set[str]  # content hashes of every base file (all splits)


@dataclass
class Production:
    """The usable labelled production images: newest first, one label per image (the newest)."""

    images: list[LabelledImage]
    dropped: dict[str, int] = field(default_factory=dict)  # why others were left out, with counts


@dataclass
class RetrainData:
    folder: Path
    key: str
    base_dataset: str
    base_dataset_dir: Path
    production_train: int
    production_test: int
    lineage_path: Path


def base_data(settings: Settings) -> BaseData:
    """Ingest, validate and preprocess ``data.source`` with the configured settings (all cached)."""
    ingested = steps.ingest_step(settings)
    validated = steps.validate_step(ingested, settings)
    prepared = steps.preprocess_step(validated.report_path, ingested, settings)
    from visionloop.data.preprocess import load_dataset

    dataset = load_dataset(prepared.dataset_dir)
    test = {str(h) for h in dataset.hashes[dataset.split == 2]}
    report = load_report(validated.report_path)
    train_files = [(r.path, r.label) for r in report.files if r.sha256 not in test]
    return BaseData(
        root=ingested.root,
        dataset_dir=prepared.dataset_dir,
        dataset_version=prepared.dataset_version,
        classes=dataset.manifest.classes,
        train_files=train_files,
        hashes={str(h) for h in dataset.hashes},
    )


def production_images(
    settings: Settings, store: PredictionStore, classes: list[str], base_hashes: set[str], now: float | None = None
) -> Production:
    """The labelled production images a retrain may use, newest label first."""
    now = time.time() if now is None else now
    since = now - settings.loop.label_max_age_days * 86400
    authenticated_only = bool(settings.serve.feedback_token)
    rows = store.labelled(settings.registry.model_name, since=since, authenticated_only=authenticated_only)
    dropped = {"unknown class": 0, "already in the training data": 0, "labelled again later": 0}
    seen: set[str] = set()
    usable: list[LabelledImage] = []
    for row in sorted(rows, key=lambda r: r.time, reverse=True):
        digest = Path(row.image_key).stem
        if row.true_label not in classes:
            dropped["unknown class"] += 1
        elif digest in base_hashes:
            dropped["already in the training data"] += 1
        elif row.image_key in seen:
            dropped["labelled again later"] += 1
        else:
            seen.add(row.image_key)
            usable.append(row)
    return Production(usable, {k: v for k, v in dropped.items() if v})


def held_out(image_key: str, fraction: float) -> bool:
    """Whether a production image belongs to the gate's production slice: the same answer in every retrain."""
    digest = hashlib.sha256(f"visionloop-production-test:{image_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def loop_root(settings: Settings) -> Path:
    return settings.home / "loop"


def build(settings: Settings, store: PredictionStore, base: BaseData, production: Production) -> RetrainData:
    """Write the retrain folder and the production slice (atomically, content-addressed) with their lineage."""
    loop = settings.loop
    test = [p for p in production.images if held_out(p.image_key, loop.production_test_fraction)]
    train = [p for p in production.images if not held_out(p.image_key, loop.production_test_fraction)]
    cap = int(loop.max_production_share / (1 - loop.max_production_share) * len(base.train_files))
    capped = len(train) - min(len(train), cap)
    train = train[:cap]  # newest first: the cap drops the oldest labels
    digest = hashlib.sha256(base.dataset_version.encode())
    for row in sorted(train + test, key=lambda r: r.image_key):
        digest.update(
            f"{row.image_key}\t{row.true_label}\t{held_out(row.image_key, loop.production_test_fraction)}\n".encode()
        )
    key = "rt-" + digest.hexdigest()[:12]
    datasets = loop_root(settings) / "datasets"
    folder, slice_dir, lineage_path = (
        datasets / key,
        datasets / f"{key}.production-test",
        datasets / f"{key}.lineage.json",
    )
    if not (folder / ".complete").is_file():
        with atomic_dir(folder) as tmp:
            for path, label in base.train_files:
                _link_or_copy(base.root / path, tmp / label / f"base-{Path(path).name}")
            for row in train:
                _write(tmp / row.true_label / f"prod-{Path(row.image_key).name}", store.images, row.image_key)
            (tmp / ".complete").write_text("ok\n")
    if not (slice_dir / ".complete").is_file():
        with atomic_dir(slice_dir) as tmp:
            for row in test:
                _write(tmp / row.true_label / Path(row.image_key).name, store.images, row.image_key)
            (tmp / ".complete").write_text("ok\n")
    lineage = {
        "key": key,
        "base": {
            "source": settings.data.source,
            "dataset_version": base.dataset_version,
            "files": len(base.train_files),
            "held_out_test_split": "the base dataset's test split is not in this folder: it is the gate's original test set",
        },
        "production": {
            "train": len(train),
            "test": len(test),
            "capped": capped,
            "max_share": loop.max_production_share,
            "authenticated_only": bool(settings.serve.feedback_token),
            "dropped": production.dropped,
            "labels_from": min((r.time for r in production.images), default=None),
            "labels_until": max((r.time for r in production.images), default=None),
            "train_request_ids": [r.request_id for r in train],
            "test_request_ids": [r.request_id for r in test],
        },
    }
    atomic_write_json(lineage_path, lineage)
    return RetrainData(folder, key, base.dataset_version, base.dataset_dir, len(train), len(test), lineage_path)


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)  # the base files are read-only inputs: a hard link costs no space
    except OSError:
        shutil.copyfile(src, dest)


def _write(dest: Path, images: Any, image_key: str) -> None:
    if images is None:
        raise DataError("the prediction store keeps no images (monitor.keep_images): there is nothing to retrain on")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.write_bytes(images.open(image_key))
    except (OSError, ValueError) as exc:
        raise DataError(f"kept image {image_key} cannot be read from {images.url}: {exc}") from None


def load_slice(folder: Path, classes: list[str], image_size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The production slice as model input (uint8 N x C x H x W) and labels, converted as serving converts."""
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            with contextlib.suppress(OSError, ValueError), Image.open(io.BytesIO(path.read_bytes())) as img:
                images.append(to_array(img, image_size, channels))
                labels.append(index)
    if not images:
        return np.zeros((0, channels, image_size, image_size), np.uint8), np.zeros(0, np.int64)
    return np.stack(images), np.asarray(labels, np.int64)


def lineage(path: Path) -> dict[str, Any]:
    return read_json(path)


def lineage_tags(data: RetrainData, lineage_doc: dict[str, Any]) -> dict[str, str]:
    production = lineage_doc["production"]
    return {
        "loop.retrain_dataset": data.key,
        "loop.base_dataset": data.base_dataset,
        "loop.production_train_images": str(production["train"]),
        "loop.production_test_images": str(production["test"]),
        "loop.production_capped": str(production["capped"]),
        "loop.labels_until": json.dumps(production["labels_until"]),
    }


# ---------------------------------------------------------------- running the pipeline on it


def retrain_settings(settings: Settings, source: str) -> Settings:
    """The same settings with the retrain folder (or its URL) as the data source."""
    return settings.model_copy(update={"data": settings.data.model_copy(update={"source": source})})


def train_local(
    settings: Settings, data: RetrainData, work_dir: Path, run_tags: dict[str, str], resume_run_id: str | None = None
) -> tuple[str, str, str]:
    """The local runner on the retrain folder, ingest → register (the loop's own gate decides after it);
    with ``resume_run_id``, the interrupted MLflow run continues from its checkpoint in ``work_dir``.
    Returns (registered version, MLflow run id, dataset version)."""
    from visionloop import registry
    from visionloop.pipeline.runner import run_steps

    ours = retrain_settings(settings, str(data.folder))
    train_args: dict[str, Any] = {"work_dir": work_dir, "run_tags": run_tags}
    if resume_run_id is not None:
        train_args["resume_run_id"] = resume_run_id
    done = run_steps(ours, "ingest", "register", show_progress=False, overrides={"train": train_args})
    registered, trained = done.outputs["register"], done.outputs["train"]
    assert isinstance(registered, steps.RegisterOutput) and isinstance(trained, steps.TrainOutput)
    dataset_version = registry.dataset_version_of(settings, registered.version) or ""
    return registered.version, trained.run_id, dataset_version


def upload(folder: Path, url: str) -> str:
    """Copy the retrain folder to ``url`` (fsspec: s3://, gs://, file://) for pods that cannot see the loop's disk."""
    import fsspec

    target = f"{url.rstrip('/')}/{folder.name}"
    fs, root = fsspec.core.url_to_fs(target)
    if fs.exists(f"{root}/.complete"):
        return target
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".complete")
    for parent in sorted({p.parent for p in files}):  # object stores need none; local and mounted ones do
        fs.makedirs(f"{root}/{parent.relative_to(folder).as_posix()}", exist_ok=True)
    # one call for all files: s3fs / gcsfs send them concurrently instead of one request after another
    fs.put([str(p) for p in files], [f"{root}/{p.relative_to(folder).as_posix()}" for p in files])
    with fs.open(f"{root}/.complete", "w") as marker:  # last: a half-uploaded folder is uploaded again
        marker.write("ok\n")
    return target


def train_kubeflow(settings: Settings, data: RetrainData, run_name: str) -> tuple[str, str, str]:
    """Submit the Kubeflow pipeline on the uploaded retrain folder and wait for it; training runs on the
    cluster's (GPU) nodes, not in the loop's pod. Returns (registered version, MLflow run id, dataset version)."""
    from visionloop import registry
    from visionloop.errors import ConfigError, PipelineError
    from visionloop.pipeline import kubeflow

    loop = settings.loop
    if not loop.kfp_host:
        raise ConfigError("loop.executor is kubeflow but loop.kfp_host is empty")
    if not loop.dataset_url or "://" not in loop.dataset_url or loop.dataset_url.startswith("file:"):
        raise ConfigError("loop.executor kubeflow needs loop.dataset_url, an object store the pods can read (s3://…)")
    source = upload(data.folder, loop.dataset_url)
    ours = retrain_settings(settings, source)
    # the pipeline's own promote step judges on one test set; the loop's two-test-set gate decides afterwards
    ours = ours.model_copy(update={"gate": ours.gate.model_copy(update={"promote": False})})
    submitted = kubeflow.submit_pipeline(
        loop.kfp_host,
        ours,
        {"tracking_uri": settings.tracking_uri},
        run_name=run_name,
        image=loop.kfp_image or kubeflow.DEFAULT_IMAGE,
        namespace=loop.kfp_namespace or None,
    )
    state = kubeflow.wait_for_run(
        loop.kfp_host, submitted.run_id, loop.kfp_timeout_seconds, loop.kfp_namespace or None, loop.kfp_poll_seconds
    )
    if state != "SUCCEEDED":
        raise PipelineError(f"Kubeflow run {submitted.run_id} ended {state}: {submitted.run_url}")
    found = registry.runs_with_param(settings, "data.source", source)
    if not found:
        raise PipelineError(f"Kubeflow run {submitted.run_id} succeeded but no MLflow run trained on {source}")
    version = registry.version_of_run(settings, found[0])
    if version is None:
        raise PipelineError(f"Kubeflow run {submitted.run_id} registered no version (MLflow run {found[0]})")
    return version, found[0], registry.dataset_version_of(settings, version) or ""
