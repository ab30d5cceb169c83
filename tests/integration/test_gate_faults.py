"""The quality gate under faults and concurrency, against real stores and real processes.

- A tracking server killed before ``visionloop promote``: the command fails within its
  ``registry.timeout_seconds`` with one ``error:`` line naming the store, and, once the server is
  back on the same backend store, no alias has moved and no history event was added.
- Two ``visionloop promote`` processes racing on one model, four rounds (each order of registering
  and starting once), on the embedded SQLite
  store and on ``mlflow server`` over PostgreSQL: every round ends with a consistent history.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from registry_stores import MlflowServer, isolate, make_settings, postgres_database, register, running_server

from visionloop import registry
from visionloop.config import Settings
from visionloop.data.preprocess import Dataset
from visionloop.errors import RegistryError

pytestmark = pytest.mark.slow

VISIONLOOP = str(Path(sys.executable).parent / "visionloop")
ROUNDS = 4  # registration order x which process starts first: each combination once
HANG_GUARD_S = 120  # a hang guard only: the bound that matters is timeout_seconds, checked by the rc and message


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    isolate(monkeypatch)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def home(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, digits_dataset: Dataset) -> Path:
    """A home holding the dataset the exports were trained on, where ``promote --version`` looks for it."""
    version = digits_dataset.manifest.version
    # the folder conftest's digits_dataset was preprocessed into ("digitscurrent" links to "digitsN")
    [folder] = {path.resolve() for path in tmp_path_factory.getbasetemp().glob(f"digits*/datasets/{version}")}
    home = tmp_path / "home"
    shutil.copytree(folder, home / "datasets" / version)
    return home


@pytest.fixture
def test_set(digits_dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    return digits_dataset.part("test")


def promote(home: Path, settings: Settings, version: str) -> subprocess.Popen:
    """``visionloop promote --version`` as its own process, against the store of ``settings``."""
    command = [
        VISIONLOOP,
        "--home",
        str(home),
        "promote",
        "--version",
        version,
        "--set",
        f"registry.tracking_uri={settings.tracking_uri}",
        "--set",
        f"registry.model_name={settings.registry.model_name}",
        "--set",
        f"registry.timeout_seconds={settings.registry.timeout_seconds}",
        "--set",
        "gate.min_accuracy=0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_TRACKING"))}
    return subprocess.Popen(
        command, cwd=home.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"promote still running after {HANG_GUARD_S} s:\n{out}\n{err}")
    return process.returncode, out, err


def leases(settings: Settings) -> list[str]:
    client = registry.connect(settings)
    prefix = settings.registry.model_name + registry.LOCK_INFIX
    return [m.name for m in client.search_registered_models(f"name LIKE '{prefix}%'") if m.name.startswith(prefix)]


# ---------------------------------------------------------------- a store that went away


def test_promote_against_a_killed_server_fails_within_its_timeout_and_moves_nothing(
    tmp_path, home, weak_export, strong_export, test_set
):
    server = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    server.start()
    try:
        settings = make_settings(home, name="faulty", tracking_uri=server.url, timeout_seconds=5)
        champion = register(settings, weak_export).version
        assert registry.promote_if_better(settings, champion, *test_set).promoted
        challenger = register(settings, strong_export).version
        before = registry.history(settings)
        server.kill()

        started = time.monotonic()
        rc, out, err = finish(promote(home, settings, challenger))
        elapsed = time.monotonic() - started
        errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
        assert rc != 0, out + err
        assert len(errors) == 1, out + err
        assert server.url in errors[0], errors
        assert "Traceback" not in out + err

        # the library itself, without the CLI around it: an error, never "no champion"
        with pytest.raises(RegistryError, match=f"cannot reach the MLflow store at {server.url}"):
            registry.promote_if_better(settings, challenger, *test_set)
        with pytest.raises(RegistryError, match=f"cannot reach the MLflow store at {server.url}"):
            registry.rollback(settings)

        server.start()  # the same backend store, the same port
        assert registry.alias_version(settings, registry.CHAMPION) == champion
        assert registry.history(settings) == before
        assert "gate.decision" not in registry.connect(settings).get_model_version("faulty", challenger).tags
        assert leases(settings) == []
    finally:
        server.stop()
    print(f"\nfailed promote against a killed server: {elapsed:.1f} s (timeout_seconds 5, process start included)")


# ---------------------------------------------------------------- two promotions at once


def race(home: Path, settings: Settings, better: str, worse: str, better_first: bool) -> None:
    """One round: both versions promoted at once by two processes; then the history must add up."""
    order = [better, worse] if better_first else [worse, better]
    processes = {version: promote(home, settings, version) for version in order}
    for version, process in processes.items():
        rc, out, err = finish(process)
        assert rc == 0, f"promote v{version}: {out}\n{err}"

    client = registry.connect(settings)
    name = settings.registry.model_name
    decided = {v: client.get_model_version(name, v).tags["gate.decision"] for v in (better, worse)}
    events = registry.history(settings)
    champion = registry.alias_version(settings, registry.CHAMPION)
    where = f"round of {name}: decisions {decided}, events {events}, champion {champion}"

    assert [e.seq for e in events] == list(range(1, len(events) + 1)), where
    for version, decision in decided.items():
        moves = [e for e in events if e.kind == "promote" and e.to_version == version]
        assert len(moves) == (1 if decision == "promoted" else 0), where
    assert events and champion == events[-1].to_version, where
    assert decided[champion] == "promoted", where
    # each gate judged against the champion of its moment, so the worse one never ends up on top
    assert champion == better, where
    assert [e.from_version for e in events] == [None, *[e.to_version for e in events[:-1]]], where
    assert leases(settings) == [], where


def rounds(home: Path, tracking_uri: str, better_export: Path, worse_export: Path) -> float:
    started = time.monotonic()
    for round_no in range(ROUNDS):
        # a model of its own per round: no champion yet, so both processes want to promote
        settings = make_settings(home, name=f"race-{round_no}", tracking_uri=tracking_uri, timeout_seconds=10)
        if round_no % 2:
            worse, better = register(settings, worse_export).version, register(settings, better_export).version
        else:
            better, worse = register(settings, better_export).version, register(settings, worse_export).version
        race(home, settings, better, worse, better_first=round_no % 4 < 2)
    return time.monotonic() - started


def test_concurrent_promotions_on_sqlite_keep_a_consistent_history(home, medium_export, strong_export):
    elapsed = rounds(home, f"sqlite:///{home / 'mlflow.db'}", strong_export, medium_export)
    print(f"\n{ROUNDS} rounds of two concurrent promotions on SQLite: {elapsed:.0f} s")


def test_concurrent_promotions_through_a_server_on_postgres_keep_a_consistent_history(
    tmp_path, home, postgres_url, medium_export, strong_export
):
    with running_server(postgres_url, tmp_path) as server:
        elapsed = rounds(home, server.url, strong_export, medium_export)
    print(f"\n{ROUNDS} rounds of two concurrent promotions through mlflow server on PostgreSQL: {elapsed:.0f} s")
