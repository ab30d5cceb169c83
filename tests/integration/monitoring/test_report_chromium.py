"""The drift report renders in a real browser: headless Chromium screenshots it, offline, and the plots show.

Chromium is a system package (Debian ``chromium``); without it this test skips, and fails under CI=true.
The screenshot is kept under the test's tmp dir (its path is printed: ``pytest -s`` shows it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionloop.monitoring.report import ALARM, REFERENCE, WINDOW, write_report
from visionloop.monitoring.schema import DriftResult, ReferenceInfo, TestResult, WindowInfo
from visionloop.monitoring.stats import Sample, stat_names

WIDTH, HEIGHT = 1280, 4000
NOW = 1_790_000_000.0


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (apt-get install -y --no-install-recommends chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def sample(n: int, shift: float, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    stats = {name: rng.normal(0.4 + shift, 0.1, n) for name in stat_names(3)}
    logits = rng.normal(0, 2, (n, 5)) + np.array([2 * shift, 0, 0, 0, 0])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Sample(stats, probs, rng.normal(shift, 1, (n, 16)), np.linspace(NOW - 600, NOW, n))


def result(at: float, p: float) -> DriftResult:
    detectors = [
        ("ks:image_mean", "image_stats"),
        ("ks:prob:0", "softmax"),
        ("chi2:predicted_class", "class_mix"),
        ("mmd:embedding", "embedding"),
    ]
    tests = [
        TestResult(
            name=n, detector=d, statistic=0.4, p_value=p, adjusted_p_value=p, threshold=0.0025, drifted=p < 0.0025
        )
        for n, d in detectors
    ]
    drifted = p < 0.0025
    return DriftResult(
        model_name="digits",
        model_version="4",
        checked_at=at,
        duration_seconds=0.3,
        status="drifted" if drifted else "ok",
        drifted=drifted,
        reasons=[f"{t.name}: adjusted p {p:.3g} < 0.0025" for t in tests if t.drifted],
        window=WindowInfo(
            size=200, requested=200, max_age_seconds=3600, first_time=at - 600, last_time=at, span_seconds=600
        ),
        reference=ReferenceInfo(
            size=800, created_at=NOW - 7200, age_seconds=at - NOW + 7200, origin="rebuilt", splits=["test"]
        ),
        tests=tests,
        settings={"p_value": 0.01, "correction": "bonferroni"},
    )


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = chromium()
    history = [result(NOW - 300 * i, 10.0 ** -max(0, 8 - i)) for i in range(12, 0, -1)]
    report = write_report(
        tmp_path / "report.html",
        model_name="digits",
        model_version="4",
        classes=list("abcde"),
        reference=sample(800, 0.0, 0),
        window=sample(200, 0.4, 1),
        latest=result(NOW, 1e-9),
        history=history,
    )
    screenshot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    run = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={screenshot}",
            f"--window-size={WIDTH},{HEIGHT}",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(f"report: {report}\nscreenshot: {screenshot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert screenshot.is_file(), run.stderr[-2000:]

    image = Image.open(screenshot)
    assert image.format == "PNG"
    assert image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    assert pixels.std() > 10  # not a blank page
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables and plots, not a few flat fills
    # the plots' colours reach the screen: reference and window bars/points, and the drifted highlights
    for hex_colour in (REFERENCE, WINDOW, ALARM):
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        near = (np.abs(pixels - rgb).max(axis=2) <= 12).sum()
        assert near > 200, f"{hex_colour}: {near} pixels"
