"""Generic fixtures shared by every test suite: real files in ``tmp_path``, nothing mocked.

- ``tmp_home``: an empty visionloop home folder (``<tmp_path>/home``), for ``Settings.home`` / ``ingest``.
- ``write_png``: ``write_png(path, size=16, mode="RGB", seed=0) -> Path`` writes a noise PNG
  (``size`` an int or (width, height); ``mode`` L, RGB or RGBA) whose pixels depend on ``seed``
  (an int or a sequence of ints), so different seeds never give accidental duplicates.
- ``make_image_folder``: ``make_image_folder(root=None, classes=("a", "b"), per_class=6, size=16,
  mode="RGB", seed=0) -> Path`` writes ``root/<class>/<class>_<i>.png`` with unique images and
  returns ``root`` (default: a fresh folder under ``tmp_path``).
- ``s3_endpoint``: the URL of a real S3-compatible server on 127.0.0.1 (moto's), one per test module;
  ``s3``: a boto3 client of it, with the test's AWS_* variables pointing there.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import image_summary  # tests/image_summary.py (tests/ is on sys.path)
from localhost import free_port  # tests/localhost.py (tests/ is on sys.path)
from visionloop.delivery import images


def write_noise_png(
    path: Path, size: int | tuple[int, int] = 16, mode: str = "RGB", seed: int | Sequence[int] = 0
) -> Path:
    """Write a PNG of random pixels (``mode`` in L, RGB, RGBA) to ``path``; return ``path``."""
    width, height = (size, size) if isinstance(size, int) else size
    bands = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels)  # mode follows the band count
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# The test files that use the Docker engine (tests/deploy/conftest.py's docker_engine, base_image, serve_image,
# train_image, local_registry): under pytest-xdist they run on one worker, so one dockerd is started and the images
# are built once.
DOCKER_TEST_FILES = {"tests/deploy/test_container_images.py", "tests/deploy/test_compose.py"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``make test`` runs two pytest-xdist workers: a test file's tests stay on one worker, so its module fixtures (a
    trained model, a started server) are made once, and the Docker test files share one worker. (xdist's own
    ``--dist loadgroup`` marks cannot do this with pytest 9: it renames ``item._nodeid``, which pytest 9 no longer
    reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "docker" if path in DOCKER_TEST_FILES else path

    return FileScheduling(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: the images a worker built (tests/deploy/conftest.py), for the summary below."""
    for built in getattr(node, "workeroutput", {}).get(image_summary.WORKEROUTPUT_KEY, []):
        image_summary.BUILT[built["kind"]] = images.ImageInfo(**built)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    image_summary.write_summary(terminalreporter)


@pytest.fixture
def tmp_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


@pytest.fixture
def write_png() -> Callable[..., Path]:
    return write_noise_png


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    counter = itertools.count()

    def make(
        root: Path | None = None,
        classes: Sequence[str] = ("a", "b"),
        per_class: int = 6,
        size: int = 16,
        mode: str = "RGB",
        seed: int = 0,
    ) -> Path:
        root = root if root is not None else tmp_path / f"images{next(counter)}"
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_noise_png(root / name / f"{name}_{i:03d}.png", size, mode, seed=[seed, c, i])
        return root

    return make


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server on 127.0.0.1 (moto's standalone server), one per test module."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.fail("moto_server is not installed (it comes with the dev dependencies)")
    port = free_port()
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert process.poll() is None, "moto_server exited at start"
                assert time.monotonic() < deadline, "moto_server did not listen within 60 s"
                time.sleep(0.1)
        yield endpoint
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "visionloop-test",
        "AWS_SECRET_ACCESS_KEY": "visionloop-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    import boto3
    import s3fs

    # s3fs keeps one filesystem per set of arguments, and reads the endpoint when it makes one: a filesystem
    # cached by an earlier module would still point at that module's (stopped) server
    s3fs.S3FileSystem.clear_instance_cache()
    return boto3.client("s3")
