"""Make docs/monitoring-report.png: a drift report on synthetic traffic with a strong shift, shot in Chromium.

Not a benchmark: a helper run by hand when the report's look changes. The data is synthetic (a
five-class flowers model: image statistics, a nearest-centre softmax, 32-d embeddings), but every
test result is the monitor's own (``visionloop.monitoring.drift.detect`` with ``DriftConfig``'s
defaults), for 24 checks five minutes apart; the traffic drifts from check 15 on (brighter, bluer,
larger phone photos, a different class mix). The page then goes through
``visionloop.monitoring.report.write_report`` and headless Chromium.

    .venv/bin/python benchmarks/_report_screenshot.py [--out docs/monitoring-report.png] [--html FILE]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from visionloop.monitoring import drift
from visionloop.monitoring.report import write_report
from visionloop.monitoring.schema import DriftResult, LiveAccuracy, ReferenceInfo, WindowInfo
from visionloop.monitoring.stats import Sample, stat_names

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
CONFIG = drift.DriftConfig()  # the monitor's defaults: p 0.01 over the four detectors, Bonferroni
WINDOW = 200
NOW = 1_796_000_000.0  # a fixed clock, so the picture is the same on every run
rng = np.random.default_rng(7)
CENTRES = rng.normal(0, 1.6, (len(CLASSES), 32))
TINT = rng.uniform(0.3, 0.6, (len(CLASSES), 3))  # each class's typical colour


def traffic(n: int, shift: float, mix: np.ndarray) -> tuple[Sample, np.ndarray]:
    """``n`` images of the flowers model: statistics, a nearest-centre softmax, embeddings, true labels."""
    labels = rng.choice(len(CLASSES), n, p=mix)
    channel = TINT[labels] + rng.normal(0, 0.06, (n, 3)) + shift * np.array([0.12, 0.15, 0.3])
    portrait = rng.random(n) < 0.3
    width = np.where(rng.random(n) < shift, 4032, rng.choice([320, 400, 500], n)) * rng.uniform(0.9, 1.0, n)
    height = np.where(portrait, width * 4 / 3, width * 3 / 4).round()
    stats = {"image_mean": channel.mean(axis=1), "image_std": rng.normal(0.22 - 0.06 * shift, 0.03, n)}
    stats |= {"image_width": width.round(), "image_height": height}
    stats |= {f"channel_mean_{c}": channel[:, c] for c in range(3)}
    embeddings = CENTRES[labels] + rng.normal(0, 1.0 + 0.5 * shift, (n, 32)) + shift * 1.2 * CENTRES[0]
    logits = -0.5 * ((embeddings[:, None, :] - CENTRES[None]) ** 2).sum(axis=2) / 12
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return Sample(stats, probs / probs.sum(axis=1, keepdims=True), embeddings), labels


def check(reference: drift.Reference, window: Sample, at: float) -> DriftResult:
    """One check as the monitor runs it (``drift.detect``), dated ``at``."""
    verdict = drift.detect(reference, window)
    return DriftResult(
        model_name="flowers",
        model_version="7",
        checked_at=at,
        duration_seconds=0.4,
        status="drifted" if verdict.drifted else "ok",
        drifted=verdict.drifted,
        reasons=verdict.reasons,
        window=WindowInfo(
            size=len(window),
            requested=WINDOW,
            max_age_seconds=3600,
            first_time=at - 3300,
            last_time=at - 5,
            span_seconds=3295,
        ),
        reference=ReferenceInfo(
            size=reference.size,
            created_at=NOW - 9 * 86400,
            age_seconds=at - NOW + 9 * 86400,
            origin="export",
            splits=["val", "test"],
        ),
        tests=verdict.tests,
        settings={
            "p_value": CONFIG.p_value,
            "correction": CONFIG.correction,
            "window_size": WINDOW,
            "window_seconds": 3600,
            "min_window": 20,
            "mmd_permutations": CONFIG.permutations,
            "min_accuracy": 0.8,
            "min_feedback": 30,
        },
    )


def screenshot(html: Path, out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y --no-install-recommends chromium")
    with tempfile.TemporaryDirectory() as tmp:
        profile, png = Path(tmp) / "profile", Path(tmp) / "shot.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                "--window-size=1280,6000",
                html.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        page = Image.open(png).convert("RGB")
    rows = np.asarray(page).reshape(page.height, -1)
    used = np.nonzero((rows != rows[-1]).any(axis=1))[0]  # crop the empty page below the footer
    page = page.crop((0, 0, page.width, int(used[-1]) + 24))
    page.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/monitoring-report.png"))
    parser.add_argument("--html", type=Path, help="keep the HTML report here too")
    args = parser.parse_args()
    base_mix = np.full(len(CLASSES), 1 / len(CLASSES))
    reference, _ = traffic(1000, 0.0, base_mix)
    assert list(reference.stats) == stat_names(3)
    prepared = drift.Reference(reference, len(CLASSES), CONFIG)
    history, window, labels = [], reference, np.zeros(0, int)
    for i in range(24):
        shift = 0.0 if i < 14 else min(0.6, (i - 13) / 8)
        mix = (1 - shift) * base_mix + shift * np.array([0.05, 0.45, 0.1, 0.3, 0.1])
        window, labels = traffic(WINDOW, shift, mix)
        history.append(check(prepared, window, NOW + 300 * (i - 23)))
        print(
            f"check {i:2d}: shift {shift:.2f} -> {history[-1].status} ({sum(t.drifted for t in history[-1].tests)} tests drifted)"
        )
    feedback = rng.permutation(len(window))[:42]
    correct = int((window.predicted[feedback] == labels[feedback]).sum())
    accuracy = LiveAccuracy(
        model_version="7", count=42, correct=correct, accuracy=correct / 42, judged=True, below_floor=correct / 42 < 0.8
    )
    latest = history[-1].model_copy(update={"accuracy": [accuracy]})
    with tempfile.TemporaryDirectory() as tmp:
        html = write_report(
            args.html or Path(tmp) / "report.html",
            model_name="flowers",
            model_version="7",
            classes=CLASSES,
            reference=reference,
            window=window,
            latest=latest,
            history=history[:-1],
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(html, args.out)
    print(f"{args.out}: {Image.open(args.out).size}, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
