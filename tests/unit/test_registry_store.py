"""The registry's answers about the store itself, on a real SQLite store and a real (dead or silent) socket.

"No champion" is what the store says when the alias does not exist; a store that does not answer,
answers too slowly or is locked is a RegistryError naming it, within ``registry.timeout_seconds``.
The model's promotion lock: a live lease of someone else makes a rollback wait, then give up;
an expired one (a crashed holder) is cleared; leases never show in history or the version list.
"""

from __future__ import annotations

import itertools
import os
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from visionloop import registry
from visionloop.config import Settings
from visionloop.errors import RegistryError

_names = itertools.count(1)


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in [k for k in os.environ if k.startswith(("VISIONLOOP_", "MLFLOW_HTTP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-store")


def settings_for(home: Path, tracking_uri: str = "", timeout_seconds: float = 5.0) -> Settings:
    return Settings(
        home=home,
        registry={
            "model_name": f"unit-{next(_names)}",
            "tracking_uri": tracking_uri,
            "timeout_seconds": timeout_seconds,
        },
    )


@pytest.fixture
def settings(store_home: Path) -> Settings:
    """A registered model of its own in the shared SQLite store, without versions or aliases."""
    settings = settings_for(store_home)
    registry.connect(settings).create_registered_model(settings.registry.model_name)
    return settings


def lease(settings: Settings, lease_seconds: str) -> str:
    """A lease of another contender, as its ``_model_lock`` would have created it."""
    name = f"{settings.registry.model_name}{registry.LOCK_INFIX}0123456789abcdef"
    tags = {registry.LEASE_TAG: lease_seconds, registry.HOLDER_TAG: "build-7 pid 4242"}
    registry.connect(settings).create_registered_model(name, tags=tags)
    return name


def lease_names(settings: Settings) -> list[str]:
    prefix = settings.registry.model_name + registry.LOCK_INFIX
    found = registry.connect(settings).search_registered_models(f"name LIKE '{prefix}%'")
    return sorted(m.name for m in found if m.name.startswith(prefix))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a hung server, not a stopped one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_missing_alias_or_model_is_no_version(settings, store_home):
    assert registry.alias_version(settings, registry.CHAMPION) is None
    assert registry.alias_version(settings, "no-such-alias") is None
    assert registry.aliases_of(settings, "1") == []
    assert registry.alias_version(settings_for(store_home), registry.CHAMPION) is None  # no such model


def test_a_stopped_server_is_a_registry_error_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    settings = settings_for(tmp_path, tracking_uri=uri, timeout_seconds=1)
    with pytest.raises(RegistryError, match=f"^cannot reach the MLflow store at {uri}: Connection refused$"):
        registry.alias_version(settings, registry.CHAMPION)


def test_a_server_that_never_answers_is_a_registry_error_after_the_timeout(tmp_path, silent_port):
    uri = f"http://127.0.0.1:{silent_port}"
    settings = settings_for(tmp_path, tracking_uri=uri, timeout_seconds=1)
    with pytest.raises(RegistryError, match=f"cannot reach the MLflow store at {uri}: read timed out"):
        registry.alias_version(settings, registry.CHAMPION)


def test_a_locked_sqlite_store_is_a_registry_error_not_no_champion(settings):
    database = sqlite3.connect(settings.tracking_uri.removeprefix("sqlite:///"))
    try:
        database.execute("BEGIN EXCLUSIVE")  # another writer in the middle of a long transaction
        quick = settings.model_copy(update={"registry": settings.registry.model_copy(update={"timeout_seconds": 0.5})})
        with pytest.raises(
            RegistryError, match=f"^cannot reach the MLflow store at {settings.tracking_uri}: database is locked$"
        ):
            registry.alias_version(quick, registry.CHAMPION)
    finally:
        database.rollback()
        database.close()
    assert registry.alias_version(settings, registry.CHAMPION) is None


def test_time_bounds_apply_to_one_operation_only(tmp_path, monkeypatch):
    import sqlalchemy

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "77")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}")

    def busy_timeout_ms() -> int:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA busy_timeout = 20000;")  # what MLflow runs in every session
            return connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one()

    with registry._time_bounds(2.5):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"  # MLflow reads whole seconds
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert busy_timeout_ms() == 2500
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "77"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert busy_timeout_ms() == 20000  # once the operation is over, MLflow's own value stands again


def test_a_live_lease_of_another_holder_makes_rollback_give_up(settings):
    theirs = lease(settings, "3600")
    quick = settings.model_copy(update={"registry": settings.registry.model_copy(update={"timeout_seconds": 0.2})})
    with pytest.raises(RegistryError, match=r"is locked by another promotion or rollback \(build-7 pid 4242"):
        registry.rollback(quick)
    assert lease_names(settings) == [theirs]  # theirs stays; the one it tried to take is gone


def test_an_expired_lease_of_a_crashed_holder_is_cleared(settings):
    lease(settings, "0.001")
    with pytest.raises(RegistryError, match="has no champion to roll back"):  # it got the lock, then found no champion
        registry.rollback(settings)
    assert lease_names(settings) == []


def test_leases_never_show_in_history_or_versions(settings):
    lease(settings, "3600")
    assert registry.history(settings) == []
    assert registry.list_versions(settings) == []
    assert registry.alias_version(settings, registry.CHAMPION) is None
