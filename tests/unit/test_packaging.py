"""The serving side installs without torch, scikit-learn, kfp or onnx; one constraints file pins everything.

The serving image (deploy/docker/serve.Dockerfile) is built from the core install, and tests/deploy builds and runs it;
these tests catch the same mistakes in seconds: a training-only library among the core dependencies, a dependency
without a pin, or a serving module that imports torch at import time.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING_ONLY = {"torch", "scikit-learn", "kfp", "onnx", "mlflow"}  # mlflow (full) needs scikit-learn and pandas


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name).replace(".", "-")] = version
    return pins


def test_core_install_has_no_training_library():
    core = {_name(r) for r in _project()["dependencies"]}
    assert not core & TRAINING_ONLY, f"training-only libraries in the core (serving) install: {core & TRAINING_ONLY}"
    assert {"onnxruntime", "fastapi", "mlflow-skinny"} <= core
    train = {_name(r) for r in _project()["optional-dependencies"]["train"]}
    assert train >= TRAINING_ONLY


def test_every_dependency_is_pinned_in_the_one_constraints_file():
    pins = _pins()
    wanted = list(_project()["dependencies"])
    for extra in _project()["optional-dependencies"].values():
        wanted += extra
    missing = sorted({_name(r) for r in wanted} - {n.replace(".", "-") for n in pins})
    assert not missing, f"not pinned in constraints.txt: {missing}"


SERVING_MODULES = [
    "visionloop.serving.app",
    "visionloop.serving.service",
    "visionloop.monitoring.monitor",
    "visionloop.monitoring.report",
    "visionloop.registry",
]


@pytest.mark.parametrize("args", [["serve", "--help"], ["monitor", "--help"], ["models", "--help"]])
def test_serving_commands_run_with_training_libraries_absent(args):
    """Imports of torch, scikit-learn, kfp, onnx and pandas fail in this interpreter, as in the serving image."""
    program = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = {{"torch", "sklearn", "kfp", "kfp_server_api", "onnx", "pandas", "pyarrow"}}
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (absent from the serving install)")
        sys.meta_path.insert(0, Absent())
        for module in {SERVING_MODULES!r}:
            importlib.import_module(module)
        from visionloop.serving.app import create_app
        sys.argv = ["visionloop", *{args!r}]
        from visionloop.cli import main
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
