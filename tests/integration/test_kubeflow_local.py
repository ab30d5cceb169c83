"""The Kubeflow pipeline executed end to end by KFP's own local runner, against a real MLflow store.

``kfp.local.SubprocessRunner(use_venv=False)`` runs each component the way a pod would: its function's
source is written to a file and run by ``python -m kfp.dsl.executor_main`` in a fresh process (this
interpreter, which has visionloop installed, standing in for the image), with its inputs as artifact
folders under the pipeline root. Local mode ignores the image, the resource limits and caching.
About 30 s on 2 CPU cores: eight processes that each import torch and MLflow, and two epochs of training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionloop.config import Settings
from visionloop.pipeline import kubeflow

pytestmark = [
    pytest.mark.slow,
    # kfp.local says the image is not a python image and that resources are ignored: both expected here
    pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning"),
]


def test_the_pipeline_registers_a_champion_when_run_by_kfp_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kfp.local
    import mlflow

    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # kfp.local would otherwise write ./local_outputs into the repository
    outputs = tmp_path / "kfp-outputs"
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(outputs),
        workspace_root=str(tmp_path / "kfp-workspace"),
    )
    settings = Settings(
        home=tmp_path / "submitter-home",  # does not travel: each component works in a scratch home
        data={"source": "synthetic", "synthetic_classes": 3, "synthetic_per_class": 20, "synthetic_size": 16},
        train={"epochs": 2, "threads": 1, "width": 8, "depth": 2, "batch_size": 32},
        gate={"min_accuracy": 0.0},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    run = kubeflow.build_pipeline()(settings_json=kubeflow.settings_json(settings), tracking_uri=uri)

    metrics = run.outputs["metrics"].metadata
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert {"test_macro_f1", "test_ece", "baseline_test_accuracy"} <= set(metrics)
    gate = run.outputs["gate"].metadata
    assert (gate["promoted"], gate["version"]) == (1.0, 1.0)
    assert gate["challenger_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.01)  # ONNX vs torch

    client = mlflow.MlflowClient(tracking_uri=uri)
    name = settings.registry.model_name
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1"
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "1",
        "challenger": "1",
    }
    assert champion.tags["gate.decision"] == "promoted"
    tracked = client.get_run(champion.run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert tracked.data.params["train.epochs"] == "2"
    # the SQLite store keeps its artifacts beside the db file, not in a component's scratch home
    assert tracked.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())

    exported = list(outputs.glob("*/export/onnx_model/model.onnx"))
    assert len(exported) == 1 and (exported[0].parent / "model_card.json").is_file()
    assert not (tmp_path / "submitter-home").exists()
    assert not (tmp_path / "local_outputs").exists()
