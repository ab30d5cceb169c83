"""Plain helpers shared by the end-to-end tests (this folder is on sys.path: no __init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mlflow_client(home: Path) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{(home / 'mlflow.db').resolve()}")


def registered_versions(home: Path) -> list[str]:
    if not (home / "mlflow.db").is_file():
        return []
    return sorted(str(mv.version) for mv in mlflow_client(home).search_model_versions(""))
