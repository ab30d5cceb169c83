"""Session fixtures for the delivery tests: a real Docker engine, the images built from this working tree, a local
registry and an MLflow server, each made once per test session and shared by every test in tests/deploy.

- ``docker_engine`` -> str: the docker client's path, once ``docker info`` reaches an engine. A running engine is
  used; otherwise this session starts ``dockerd`` (log in a temporary file) and stops it, by its PID, at the end.
- ``base_image`` -> str: ``visionloop-base:bookworm`` (debootstrap minbase + ``docker import``: no public registry
  is reachable here), kept between sessions when it exists.
- ``serve_image``, ``train_image`` -> str: ``visionloop-serve:<version>``, ``visionloop-train:<version>``, built
  once per session on ``base_image`` from wheelhouses made in a session folder, with ``--network none``.
- ``local_registry`` -> str: "127.0.0.1:5000", Debian's docker-registry with deploy/docker/registry.yml and its
  storage in a session folder.
- ``mlflow_server`` -> str: the URL of a real ``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts served
  from a session folder: --serve-artifacts --artifacts-destination), so containers need no shared folder.

A missing component (docker, dockerd, debootstrap, docker-registry) fails the test under CI=true and skips it
elsewhere. At the end of a run that built the images, both sizes are printed side by side.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from visionloop.delivery import images

ROOT = Path(__file__).resolve().parents[2]
REGISTRY_CONFIG = ROOT / "deploy" / "docker" / "registry.yml"
# the images every test (and other test modules: compose, the smoke tests) shares, recorded for the summary that
# tests/conftest.py prints (tests/image_summary.py)
from image_summary import BUILT, WORKEROUTPUT_KEY  # noqa: E402

sys.path.append(str(ROOT / "tests" / "integration"))  # registry_stores: the real `mlflow server` of the tests
from registry_stores import running_server  # noqa: E402


def missing(message: str) -> None:
    """A component the test needs is not here: a failure on CI (which installs everything), a skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _engine_answers(docker: str) -> bool:
    result = subprocess.run(
        [docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
    )
    return result.returncode == 0 and bool(result.stdout.strip())


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    docker, dockerd = shutil.which("docker"), shutil.which("dockerd")
    if docker is None:
        missing("the docker client is not installed (Debian: apt-get install docker.io)")
    if _engine_answers(docker):
        yield docker
        return
    if dockerd is None:
        missing("no Docker engine runs and dockerd is not installed (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        missing("no Docker engine runs, and starting dockerd needs root")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with log.open("wb") as out:
        process = subprocess.Popen([dockerd], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _engine_answers(docker):
            if process.poll() is not None and not _engine_answers(docker):
                pytest.fail(f"dockerd exited with {process.returncode}:\n{images.tail(log.read_text(), 20)}")
            if time.monotonic() > deadline:
                pytest.fail(f"dockerd did not answer `docker info` within 90 s:\n{images.tail(log.read_text(), 20)}")
            time.sleep(0.5)
        yield docker
    finally:
        if process.poll() is None:  # ours; when another engine won the socket, ours has exited already
            _stop(process)


@pytest.fixture(scope="session")
def base_image(docker_engine: str) -> str:
    # where a public registry is reachable (GitHub's runners: ci.yml pulls it), the Dockerfiles' own kind of base
    public = os.environ.get("VISIONLOOP_TEST_BASE_IMAGE")
    if public:
        if not images.image_exists(public, docker_engine):
            pytest.fail(f"VISIONLOOP_TEST_BASE_IMAGE={public} is not on this machine: docker pull it first")
        return public
    if shutil.which("debootstrap") is None:
        missing("debootstrap is not installed (Debian: apt-get install debootstrap): it makes the base image")
    return images.base_image(images.BASE_TAG, docker=docker_engine)


@pytest.fixture(scope="session")
def wheelhouse_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wheelhouse")


def _image(kind: images.Kind, base: str, wheelhouses: Path, docker: str) -> str:
    started = time.monotonic()
    house = images.wheelhouse(kind, wheelhouses / kind, root=ROOT)
    wheels_seconds = time.monotonic() - started
    info = images.build(kind, images.default_tag(kind), base, house, network="none", root=ROOT, docker=docker)
    BUILT[kind] = info
    print(
        f"\n{info.tag}: wheelhouse {wheels_seconds:.0f} s, build {info.seconds:.0f} s, {images.format_size(info.size)}"
    )
    return info.tag


@pytest.fixture(scope="session")
def serve_image(docker_engine: str, base_image: str, wheelhouse_root: Path) -> str:
    return _image("serve", base_image, wheelhouse_root, docker_engine)


@pytest.fixture(scope="session")
def train_image(docker_engine: str, base_image: str, wheelhouse_root: Path) -> str:
    return _image("train", base_image, wheelhouse_root, docker_engine)


def _registry_answers(address: str) -> bool:
    try:
        images.check_registry(address, timeout=2)
        return True
    except images.ImageError:
        return False


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("docker-registry", path=f"{os.environ.get('PATH', '')}:/usr/bin")
    if server is None:
        missing("docker-registry is not installed (Debian: apt-get install docker-registry)")
    address = images.LOCAL_REGISTRY
    host, port = address.split(":")
    with socket.socket() as probe:
        taken = probe.connect_ex((host, int(port))) == 0
    if taken:
        if not _registry_answers(address):
            pytest.fail(f"{address} is taken by something that is not a container registry: stop it (ss -ltnp)")
        # a registry is there already (another session's, or a developer's): use it, leave it running
        yield address
        return
    root = tmp_path_factory.mktemp("registry")
    log = root / "registry.log"
    env = {**os.environ, "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(root / "storage")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [server, "serve", str(REGISTRY_CONFIG)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while not _registry_answers(address):
            if process.poll() is not None:
                pytest.fail(f"docker-registry exited with {process.returncode}:\n{images.tail(log.read_text(), 20)}")
            if time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not answer GET /v2/ within 30 s:\n{images.tail(log.read_text(), 20)}")
            time.sleep(0.2)
        yield address
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_server(f"sqlite:///{root / 'mlflow.db'}", root) as server:
        yield server.url


def pytest_sessionfinish(session: pytest.Session) -> None:
    # under pytest-xdist (make test) the images are built in a worker: hand them to the controller, which does not
    # load this conftest (tests/conftest.py prints them there)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None and BUILT:
        workeroutput[WORKEROUTPUT_KEY] = [info.to_dict() for info in BUILT.values()]
