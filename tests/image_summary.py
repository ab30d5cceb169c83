"""The container images a test session built, printed side by side at its end (``make test`` shows the sizes).

tests/deploy/conftest.py records each image it builds in ``BUILT``. Under pytest-xdist the images are built in a
worker, which hands them to the controller (``workeroutput``); the controller, which does not load tests/deploy's
conftest, records them here too. tests/conftest.py prints the summary once, in either case.
"""

from __future__ import annotations

import pytest

from visionloop.delivery import images

BUILT: dict[str, images.ImageInfo] = {}
WORKEROUTPUT_KEY = "visionloop_images"


def write_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not BUILT:
        return
    terminalreporter.section("container images")
    for info in BUILT.values():
        terminalreporter.write_line(f"{info.tag}: {images.format_size(info.size)} (built in {info.seconds:.0f} s)")
    if {"serve", "train"} <= BUILT.keys():
        serve, train = BUILT["serve"], BUILT["train"]
        terminalreporter.write_line(images.size_summary((serve.tag, serve.size), (train.tag, train.size)))
